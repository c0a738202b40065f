"""Load a draft/target pair once: tokenizer check, target compression, device placement.

The same code path loads a production pair (local directory or hub name) and the
project's own tiny pair, so tests exercise what serving runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from speckv.vocabulary import COMP_ENC
from speckv.vocabulary import COMPRESSIONS as COMPRESSIONS
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class PairLoadError(ValueError):
    """A pair could not be loaded; the message says which value was wrong and what to do."""


@dataclass(frozen=True)
class PairConfig:
    """Which pair to load and how to compress the target.

    `draft` and `target` are local directories (as written by `save_pretrained`) or hub
    names such as `meta-llama/Llama-3.2-1B-Instruct`. Hub names need network access or a
    filled hub cache; set `local_files_only` to refuse downloads.
    """

    draft: str
    target: str
    compression: str = "fp16"
    device: str = "auto"
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise PairLoadError(
                f"unknown compression {self.compression!r}; use one of {', '.join(COMPRESSIONS)}"
            )
        if self.device not in DEVICES:
            raise PairLoadError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        for role, name in (("draft", self.draft), ("target", self.target)):
            if not name:
                raise PairLoadError(f"{role} model is empty; give a local directory or hub name")

    @property
    def comp_enc(self) -> int:
        return COMP_ENC[self.compression]


@dataclass
class LoadedPair:
    """A loaded pair: shared tokenizer, draft and target in eval mode with gradients off.

    `vocab_size` is the tokenizer's size; the models' logits may be wider (padded
    embeddings), so compare distributions over `logits[..., :vocab_size]`.
    """

    config: PairConfig
    tokenizer: PreTrainedTokenizerBase
    draft: PreTrainedModel
    target: PreTrainedModel
    device: torch.device
    target_dtype: str
    draft_dtype: str
    vocab_size: int

    @property
    def compression(self) -> str:
        return self.config.compression

    @property
    def comp_enc(self) -> int:
        return self.config.comp_enc

    def describe(self) -> dict[str, str]:
        """What GetInfo reports: names, compression, what it means here, devices, sizes."""
        return {
            "draft_model": self.config.draft,
            "target_model": self.config.target,
            "compression": self.compression,
            "target_dtype": self.target_dtype,
            "draft_dtype": self.draft_dtype,
            "device": str(self.device),
            "draft_parameters": str(_count_parameters(self.draft)),
            "target_parameters": str(_count_parameters(self.target)),
            "vocab_size": str(self.vocab_size),
        }


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PairLoadError(
            "device 'cuda' requested but torch sees no CUDA device; use --device cpu or auto"
        )
    return torch.device(device)


def _check_source(role: str, name: str) -> str:
    """A path-looking name that does not exist is a typo, not a hub name: say so early."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(expanded):
        raise PairLoadError(
            f"{role} model directory {name!r} does not exist or is not a directory; "
            "give a directory written by save_pretrained (e.g. built by "
            "`speckv-tiny-pair --out DIR`, then DIR/target and DIR/draft) or a hub name"
        )
    return name


def _load_tokenizer(role: str, source: str, local_only: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise PairLoadError(
            f"could not load the {role} tokenizer from {source!r}: {err}. "
            "A local directory needs the tokenizer files next to the model; a hub name "
            "needs network access or a filled hub cache"
        ) from err


def check_same_tokenizer(
    draft_tok: PreTrainedTokenizerBase, target_tok: PreTrainedTokenizerBase
) -> None:
    """Speculation compares token ids, so the two vocabularies must be identical."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv != tv:
        only_d = sorted(set(dv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(dv))[:5]
        moved = [t for t in dv if t in tv and dv[t] != tv[t]][:5]
        raise PairLoadError(
            "draft and target tokenizers differ "
            f"(draft {len(dv)} tokens, target {len(tv)}; only in draft e.g. {only_d}, "
            f"only in target e.g. {only_t}, different ids e.g. {moved}); speculative decoding "
            "needs the same vocabulary: pick a draft from the target's model family"
        )
    if draft_tok.eos_token_id != target_tok.eos_token_id:
        raise PairLoadError(
            f"draft and target tokenizers disagree on the end-of-sequence token "
            f"(draft {draft_tok.eos_token_id}, target {target_tok.eos_token_id})"
        )


def _quantization(compression: str, device: torch.device) -> BitsAndBytesConfig | None:
    compute = torch.float16 if device.type == "cuda" else torch.float32
    if compression == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compression == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    return None


def _target_dtype_description(compression: str, device: torch.device) -> str:
    if compression == "fp16":
        if device.type == "cuda":
            return "float16"
        return "float32 (unquantized; fp16 on CPU runs as float32)"
    if compression == "int8":
        return "int8 weights (bitsandbytes LLM.int8), float16 matmul inputs"
    compute = "float16" if device.type == "cuda" else "float32"
    return f"nf4 weights (bitsandbytes 4-bit), {compute} compute"


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes logs the fp32->fp16 cast on every int8 matmul; target_dtype says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _quiet_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in log.filters):
        log.addFilter(_DropInt8CastWarning())


def _load_model(
    role: str,
    source: str,
    device: torch.device,
    quant: BitsAndBytesConfig | None,
    local_only: bool,
) -> PreTrainedModel:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    if quant is not None:
        if quant.load_in_8bit:
            _quiet_int8_cast_warning()
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise PairLoadError(
            f"could not load the {role} model from {source!r}: {err}. "
            "A local directory must hold config.json and weights from save_pretrained; "
            "a hub name needs network access or a filled hub cache"
        ) from err
    if quant is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model


def load_pair(config: PairConfig) -> LoadedPair:
    """Load tokenizer, draft (unquantized) and target (compressed as asked) once."""
    device = resolve_device(config.device)
    draft_src = _check_source("draft", config.draft)
    target_src = _check_source("target", config.target)
    local_only = config.local_files_only
    target_tok = _load_tokenizer("target", target_src, local_only)
    draft_tok = _load_tokenizer("draft", draft_src, local_only)
    check_same_tokenizer(draft_tok, target_tok)
    vocab_size = len(target_tok)
    draft = _load_model("draft", draft_src, device, None, local_only)
    target = _load_model(
        "target", target_src, device, _quantization(config.compression, device), local_only
    )
    for role, model in (("draft", draft), ("target", target)):
        rows = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
        if rows < vocab_size:
            raise PairLoadError(
                f"{role} model has {rows} embedding rows but the tokenizer has {vocab_size} "
                "tokens; the model and tokenizer do not belong together"
            )
    if config.compression == "nf4" and device.type == "cpu":
        _check_nf4_cpu_shapes(target)
    if target_tok.pad_token_id is None:
        target_tok.pad_token = target_tok.eos_token
    draft_dtype = "float16" if device.type == "cuda" else "float32"
    return LoadedPair(
        config=config,
        tokenizer=target_tok,
        draft=draft,
        target=target,
        device=device,
        target_dtype=_target_dtype_description(config.compression, device),
        draft_dtype=draft_dtype,
        vocab_size=vocab_size,
    )


def _check_nf4_cpu_shapes(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks nf4 weights at the first forward and
    needs out_features % 32 == 0 and in_features % blocksize (64) == 0; fail at load time,
    naming the layer, instead of inside the first generation."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            return
        state = getattr(module.weight, "quant_state", None)
        block = int(getattr(state, "blocksize", 64) or 64)
        if module.out_features % 32 or module.in_features % block:
            raise PairLoadError(
                f"target layer {name} ({module.in_features}->{module.out_features}) cannot run "
                "as nf4 on this CPU: bitsandbytes' AVX512-BF16 kernel needs output sizes that "
                f"are multiples of 32 and input sizes that are multiples of {block}; "
                "use --compression int8 or fp16"
            )


def _count_parameters(model: torch.nn.Module) -> int:
    return int(model.num_parameters())  # type: ignore[operator]
