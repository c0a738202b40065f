"""Build the project's own tiny draft/target pair on CPU, deterministically, and cache it.

Tests and the demo must not download weights, so the project trains a byte-level BPE
tokenizer and two Llama-architecture models on text that ships with Python. The target is
trained on next-token loss; the draft is distilled from the target's logits (KL), which
aligns it with the target far better than training it separately (docs/tiny-pair.md). The pair is
saved with `save_pretrained` and read back through `load_pair`, the production code path.

Layout of DIR: `target/` and `draft/` (each a model plus the shared tokenizer) and
`tiny-pair.json` (`decode_worker.pair_manifest`), written last, so a directory with it is a
finished pair. Folders built before that name hold the same content as `manifest.json`; they
are reused as they are, and `tiny-pair.json` is written beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from decode_worker.pair_manifest import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    ManifestError,
    PairKey,
    PairMetrics,
    ParameterCounts,
    TinyPairManifest,
    WeightsSha256,
    read_manifest,
    write_manifest,
)
from speckv_tinypair.corpus import SNAPSHOT, Corpus, load_corpus, read_snapshot

# Part of every pair's key: bump it only when the same spec and corpus would give other
# weights (a change to training), never for a change to the manifest's format.
BUILDER_VERSION = 1
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


@dataclass(frozen=True)
class ModelShape:
    """Target widths are multiples of 64: bitsandbytes' nf4 CPU kernel (AVX512-BF16) needs it."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class TinyPairSpec:
    """Everything that determines the weights (with the seed and the corpus)."""

    code_chars: int  # stdlib source characters (all of pydoc_data.topics is always used)
    vocab_size: int
    seq_len: int
    batch_size: int
    target: ModelShape
    draft: ModelShape
    target_steps: int
    target_lr: float
    draft_steps: int
    draft_lr: float
    eval_windows: int  # held-out windows of seq_len for teacher-forced agreement
    eval_prompts: int  # target-generated continuations for agreement on generated text
    eval_new_tokens: int

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


SIZES: dict[str, TinyPairSpec] = {
    # Seconds on 2 cores: for tests that need real, aligned models but not good ones.
    "test": TinyPairSpec(
        code_chars=400_000,
        vocab_size=1024,
        seq_len=64,
        batch_size=16,
        target=ModelShape(hidden=128, layers=4, heads=4, intermediate=384),
        draft=ModelShape(hidden=64, layers=1, heads=2, intermediate=172),
        target_steps=250,
        target_lr=3e-3,
        draft_steps=150,
        draft_lr=3e-3,
        eval_windows=32,
        eval_prompts=8,
        eval_new_tokens=32,
    ),
    # Minutes on 2 cores: a deep target and a one-layer draft so drafting is cheap.
    "demo": TinyPairSpec(
        code_chars=2_000_000,
        vocab_size=4096,
        seq_len=128,
        batch_size=16,
        target=ModelShape(hidden=256, layers=8, heads=8, intermediate=704),
        draft=ModelShape(hidden=128, layers=1, heads=4, intermediate=344),
        target_steps=350,
        target_lr=2e-3,
        draft_steps=300,
        draft_lr=3e-3,
        eval_windows=64,
        eval_prompts=16,
        eval_new_tokens=64,
    ),
}


@dataclass(frozen=True)
class TinyPairConfig:
    out: Path
    size: str = "test"
    seed: int = 0
    threads: int = 2
    force: bool = False
    progress: bool = True
    # Replaces the named size's spec (tests build a miniature pair to check determinism).
    spec_override: TinyPairSpec | None = None

    @property
    def spec(self) -> TinyPairSpec:
        if self.spec_override is not None:
            return self.spec_override
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {', '.join(SIZES)}")
        return SIZES[self.size]


@dataclass(frozen=True)
class TinyPair:
    """A built (or reused) pair: where it is and what its manifest says."""

    root: Path
    manifest: TinyPairManifest
    reused: bool

    @property
    def draft_dir(self) -> Path:
        return self.root / "draft"

    @property
    def target_dir(self) -> Path:
        return self.root / "target"


def cache_key(config: TinyPairConfig, corpus_digest: str) -> PairKey:
    return PairKey(
        builder_version=BUILDER_VERSION,
        size=config.size,
        seed=config.seed,
        spec_hash=config.spec.digest(),
        corpus_hash=corpus_digest,
    )


def _is_complete(root: Path) -> bool:
    return all(
        (root / role / name).is_file()
        for role in ("draft", "target")
        for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def _remove_abandoned_staging(root: Path) -> None:
    """A killed build leaves `.NAME.building-PID`; remove those whose process is gone."""
    for stale in root.parent.glob(f".{root.name}.building-*"):
        try:
            os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def _reuse(root: Path, manifest: TinyPairManifest) -> TinyPair:
    """A matching pair as it is; a legacy folder (`manifest.json` only) also gets its
    `tiny-pair.json`, when the folder is writable (a read-only image keeps reading the old)."""
    if not (root / MANIFEST_NAME).is_file():
        with contextlib.suppress(OSError):
            write_manifest(root, manifest)
    return TinyPair(root=root, manifest=manifest, reused=True)


def ensure_tiny_pair(config: TinyPairConfig) -> TinyPair:
    """Reuse the pair in `config.out` when its manifest's key matches; otherwise build it there.

    The manifest is `tiny-pair.json`, or `manifest.json` in a folder built before that name
    (same content, reused the same way). An invalid manifest is an error, never a rebuild.
    """
    spec = config.spec
    corpus = load_corpus(spec.code_chars)
    key = cache_key(config, corpus.digest())
    root = Path(config.out)
    existing = read_manifest(root)
    if not config.force and existing is not None and existing.key == key and _is_complete(root):
        return _reuse(root, existing)
    if root.exists() and any(root.iterdir()) and existing is None:
        raise FileExistsError(
            f"{root} exists, is not empty and holds no {MANIFEST_NAME} (nor a legacy "
            f"{LEGACY_MANIFEST_NAME}); refusing to overwrite it: pass an empty or new --out "
            "directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root)
    staging = root.with_name(f".{root.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _build(config, spec, corpus, key, staging)
        # Another process (a parallel test session) may have finished the same pair first:
        # keep its files rather than deleting a directory someone may be loading.
        try:
            finished = read_manifest(root)
        except ManifestError:
            finished = None
        if not config.force and finished is not None and finished.key == key and _is_complete(root):
            return _reuse(root, finished)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Read back through the production loader so a pair that cannot be served never caches.
    from decode_worker.pair import PairConfig, load_pair

    load_pair(PairConfig(draft=str(root / "draft"), target=str(root / "target"), device="cpu"))
    return TinyPair(root=root, manifest=manifest, reused=False)


# --------------------------------------------------------------------------- building


def _train_tokenizer(corpus: Corpus, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in corpus.train), trainer=trainer)
    # Prompts start with <s> like the training documents do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4 * 128,
    )


def _token_stream(tokenizer: Any, docs: Any) -> torch.Tensor:
    """Documents as `<s> text </s>` back to back, in the corpus's fixed order."""
    ids: list[int] = []
    enc = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    for e in enc:
        ids.append(1)
        ids.extend(e.ids)
        ids.append(2)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def _llama(shape: ModelShape, vocab_size: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=4 * 128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(windows: torch.Tensor, steps: int, batch: int, seed: int) -> Any:
    """A fixed, seeded order of training windows (epochs reshuffled from the same generator)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > order.numel():
            order, pos = torch.randperm(windows.shape[0], generator=gen), 0
        yield windows[order[pos : pos + batch]]
        pos += batch


def _train(
    model: Any,
    windows: torch.Tensor,
    steps: int,
    peak_lr: float,
    batch: int,
    seed: int,
    desc: str,
    progress: bool,
    teacher: Any = None,
) -> float:
    """Next-token loss, or KL(teacher || model) over the full distribution when distilling."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    ema: float | None = None
    bar = tqdm(_batches(windows, steps, batch, seed), total=steps, desc=desc, disable=not progress)
    for step, ids in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, peak_lr)
        logits = model(input_ids=ids).logits[:, :-1].float()
        if teacher is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
            logp = F.log_softmax(logits, -1)
            loss = F.kl_div(
                logp.reshape(-1, logp.shape[-1]),
                t_logp.reshape(-1, t_logp.shape[-1]),
                log_target=True,
                reduction="batchmean",
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    model.requires_grad_(False)
    return float(ema or 0.0)


@torch.inference_mode()
def _heldout_loss(model: Any, windows: torch.Tensor, batch: int = 16) -> float:
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        out = model(input_ids=ids, labels=ids)
        total += float(out.loss) * ids.shape[0]
        n += ids.shape[0]
    return total / max(n, 1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _build(
    config: TinyPairConfig, spec: TinyPairSpec, corpus: Corpus, key: PairKey, root: Path
) -> TinyPairManifest:
    import tokenizers
    import transformers

    from speckv_tinypair.pair_metrics import generated_agreement, measure_cost
    from speckv_tinypair.pair_metrics import teacher_forced_agreement as tf_agreement

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # Refuse (raise) rather than silently use a kernel torch knows to be nondeterministic.
    # On CPU this changes no result here; it guards the build if an op or device changes.
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        t0 = time.perf_counter()
        tokenizer = _train_tokenizer(corpus, spec.vocab_size)
        train_stream = _token_stream(tokenizer, corpus.train)
        heldout_stream = _token_stream(tokenizer, corpus.heldout)
        train_w = _windows(train_stream, spec.seq_len)
        heldout_w = _windows(heldout_stream, spec.seq_len)
        # Spread evaluation windows over all held-out documents (prose and code).
        stride = max(1, heldout_w.shape[0] // spec.eval_windows)
        eval_w = heldout_w[::stride][: spec.eval_windows]
        t_tok = time.perf_counter() - t0

        torch.manual_seed(config.seed)
        target = _llama(spec.target, len(tokenizer))
        torch.manual_seed(config.seed + 1)
        draft = _llama(spec.draft, len(tokenizer))

        t0 = time.perf_counter()
        target_loss = _train(
            target,
            train_w,
            spec.target_steps,
            spec.target_lr,
            spec.batch_size,
            config.seed,
            "target",
            config.progress,
        )
        t_target = time.perf_counter() - t0
        t0 = time.perf_counter()
        draft_kl = _train(
            draft,
            train_w,
            spec.draft_steps,
            spec.draft_lr,
            spec.batch_size,
            config.seed + 1,
            "draft (distil)",
            config.progress,
            teacher=target,
        )
        t_draft = time.perf_counter() - t0

        t0 = time.perf_counter()
        vocab = len(tokenizer)
        agree_tf = tf_agreement(draft, target, eval_w, vocab)
        prompt_w = eval_w[:: max(1, eval_w.shape[0] // spec.eval_prompts)][: spec.eval_prompts]
        agree_gen = generated_agreement(
            draft, target, prompt_w[:, :16], spec.eval_new_tokens, vocab
        )
        cost = measure_cost(draft, target, eval_w[:1, :32])
        t_eval = time.perf_counter() - t0

        for role, model in (("target", target), ("draft", draft)):
            model.generation_config.pad_token_id = 0
            model.generation_config.bos_token_id = 1
            model.generation_config.eos_token_id = 2
            model.save_pretrained(root / role)
            tokenizer.save_pretrained(root / role)
        metrics = PairMetrics(
            agreement_teacher_forced_heldout=round(agree_tf, 4),
            agreement_target_generated=round(agree_gen, 4),
            draft_ms_per_token=round(cost.draft_ms_per_token, 3),
            target_ms_per_token=round(cost.target_ms_per_token, 3),
            target_ms_verify_5_tokens=round(cost.target_ms_verify, 3),
            cost_ratio_draft_over_target=round(cost.ratio, 4),
            measured_with="KV-cached forwards at 32 tokens of context, median, "
            f"torch threads {config.threads}, float32 CPU",
        )
        manifest = TinyPairManifest(
            key=key,
            size=config.size,
            seed=config.seed,
            spec=dataclasses.asdict(spec),
            corpus={
                "source": "Python stdlib *.py (name order) + pydoc_data.topics, from the "
                "snapshot shipped in benchmarks/speckv_tinypair/data; every 10th document "
                "held out",
                "snapshot": f"benchmarks/speckv_tinypair/data/{SNAPSHOT.name}",
                "python": read_snapshot()["python"],
                "train_documents": len(corpus.train),
                "heldout_documents": len(corpus.heldout),
                "train_chars": corpus.chars("train"),
                "heldout_chars": corpus.chars("heldout"),
                "train_tokens": int(train_stream.numel()),
                "heldout_tokens": int(heldout_stream.numel()),
            },
            tokenizer={"vocab_size": vocab, "pad": 0, "bos": 1, "eos": 2},
            parameters=ParameterCounts(
                target=int(target.num_parameters()), draft=int(draft.num_parameters())
            ),
            training={
                "target_final_loss": round(target_loss, 4),
                "draft_final_kl": round(draft_kl, 4),
                "target_heldout_loss": round(_heldout_loss(target, eval_w), 4),
                "draft_heldout_loss": round(_heldout_loss(draft, eval_w), 4),
            },
            metrics=metrics,
            build={
                "seconds_total": round(time.perf_counter() - started, 1),
                "seconds_tokenizer_and_data": round(t_tok, 1),
                "seconds_target": round(t_target, 1),
                "seconds_draft": round(t_draft, 1),
                "seconds_eval": round(t_eval, 1),
                "threads": config.threads,
                "load_average_at_start": round(load_before, 2),
                "load_average_at_end": round(os.getloadavg()[0], 2)
                if hasattr(os, "getloadavg")
                else None,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu": cpu_model(),
                # The instruction set torch's own CPU kernels dispatch to (AVX2, AVX512, ...).
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "deterministic_algorithms": True,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            weights_sha256=WeightsSha256(
                target=_sha256(root / "target" / "model.safetensors"),
                draft=_sha256(root / "draft" / "model.safetensors"),
            ),
        )
        write_manifest(root, manifest)
        # Read back through the validating reader, so an invalid manifest never caches.
        written = read_manifest(root)
        assert written == manifest, "tiny-pair.json does not read back as written"
        return manifest
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_deterministic, warn_only=prev_warn_only)
