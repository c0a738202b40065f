"""load_pair: all three target compressions on CPU, tokenizer check, actionable errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from decode_worker.pair import LoadedPair, PairConfig, PairLoadError, load_pair

PROSE = "The for statement is used to iterate over the elements of a sequence"


@pytest.mark.parametrize("compression", ["fp16", "int8", "nf4"])
def test_each_compression_loads_and_runs_a_forward(
    loaded_pair: Callable[[str], LoadedPair], compression: str
) -> None:
    import bitsandbytes as bnb

    pair = loaded_pair(compression)
    ref = loaded_pair("fp16")
    assert pair.compression == compression
    assert pair.comp_enc == {"fp16": 0, "int8": 1, "nf4": 2}[compression]
    assert not pair.target.training and not pair.draft.training
    assert all(not p.requires_grad for p in pair.target.parameters())
    linear = pair.target.model.layers[0].mlp.down_proj
    expected = {"fp16": torch.nn.Linear, "int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
    assert type(linear) is expected[compression]
    ids = pair.tokenizer(PROSE, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = pair.target(input_ids=ids).logits[..., : pair.vocab_size]
        ref_logits = ref.target(input_ids=ids).logits[..., : pair.vocab_size]
        draft_logits = pair.draft(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], pair.vocab_size)
    assert torch.isfinite(logits).all() and torch.isfinite(draft_logits).all()
    # Quantization perturbs the target, it does not replace it: greedy mostly unchanged.
    same = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    assert same >= 0.7, f"{compression} target agrees with fp16 on only {same:.2f} of positions"
    info = pair.describe()
    assert info["compression"] == compression and info["device"] == "cpu"
    if compression == "fp16":
        assert "float32" in pair.target_dtype and "unquantized" in pair.target_dtype
    else:
        assert compression in pair.target_dtype


def test_describe_names_the_pair(loaded_pair: Callable[[str], LoadedPair]) -> None:
    info = loaded_pair("fp16").describe()
    assert info["draft_model"].endswith("draft") and info["target_model"].endswith("target")
    assert int(info["target_parameters"]) > int(info["draft_parameters"]) > 0
    assert int(info["vocab_size"]) == len(loaded_pair("fp16").tokenizer)


def _other_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["zebra quagga okapi"] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    fast.save_pretrained(directory)


def test_tokenizer_mismatch_is_a_clear_error(tiny_pair_dir: Path, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_pair_dir / "draft", draft)
    _other_tokenizer(draft)
    with pytest.raises(PairLoadError, match="draft and target tokenizers differ") as err:
        load_pair(PairConfig(draft=str(draft), target=str(tiny_pair_dir / "target"), device="cpu"))
    assert "same vocabulary" in str(err.value)


def test_missing_local_directory_is_named(tiny_pair_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PairLoadError, match=r"draft model directory .* does not exist"):
        load_pair(PairConfig(draft=str(missing), target=str(tiny_pair_dir / "target")))


def test_hub_name_goes_through_from_pretrained(tiny_pair_dir: Path) -> None:
    """Offline, a hub name that is not in the cache fails with an actionable message."""
    with pytest.raises(PairLoadError, match="hub name needs network access"):
        load_pair(
            PairConfig(
                draft="speckv-nonexistent-org/no-such-draft",
                target=str(tiny_pair_dir / "target"),
                device="cpu",
                local_files_only=True,
            )
        )


def test_bad_config_values_are_refused() -> None:
    with pytest.raises(PairLoadError, match="unknown compression 'fp8'"):
        PairConfig(draft="d", target="t", compression="fp8")
    with pytest.raises(PairLoadError, match="unknown device 'tpu'"):
        PairConfig(draft="d", target="t", device="tpu")
    with pytest.raises(PairLoadError, match="draft model is empty"):
        PairConfig(draft="", target="t")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_an_error_not_a_fallback(tiny_pair_dir: Path) -> None:
    with pytest.raises(PairLoadError, match="no CUDA device"):
        load_pair(
            PairConfig(
                draft=str(tiny_pair_dir / "draft"),
                target=str(tiny_pair_dir / "target"),
                device="cuda",
            )
        )


def test_nf4_shapes_the_cpu_kernel_cannot_run_are_refused_at_load(
    tiny_pair_dir: Path, tmp_path: Path
) -> None:
    """bitsandbytes' AVX512-BF16 nf4 path fails at the first forward on such shapes."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir / "target")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    odd = tmp_path / "odd"
    model.save_pretrained(odd)
    tokenizer.save_pretrained(odd)
    config = PairConfig(draft=str(odd), target=str(odd), compression="nf4", device="cpu")
    probe = bnb.nn.Linear4bit(64, 64)
    if getattr(probe, "support_avx512bf16_for_cpu", False):
        with pytest.raises(
            PairLoadError, match=r"multiples of 32 and input sizes.*use --compression int8"
        ):
            load_pair(config)
    else:  # other CPUs take bitsandbytes' generic path, which runs any shape
        pair = load_pair(config)
        ids = torch.tensor([[1, 5, 9]])
        with torch.inference_mode():
            assert torch.isfinite(pair.target(input_ids=ids).logits).all()
