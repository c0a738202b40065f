"""`speckv-eval log-steps`: step records from a pair, for retraining the predictor on it.

The worker's engine runs each training prompt at several fixed γ and its own `StepRecorder`
writes the records (the seed's schema plus `sequence_id` and `prev_*` signals), so
`speckv-predictor train --data OUT --window previous_step` can fit a model for this pair.
With `--tokens-out` the engine's `TokenRecorder` also writes one row per drafted token
(token features, history, agreement: the data of `--model-kind instep`), and
`--explore-runs K` adds K runs per prompt and compression whose γ is drawn uniformly from
1..8 each step, so every draft length and history state is seen. Sequence ids are
`<prompt id>:<compression>:<policy>`; training holds prompts out by the part before ':'.
The prompts must not be the evaluation prompts: any prompt whose text also appears in an
`--exclude` file is refused, so a model trained here is never scored on its own prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from speckv.vocabulary import DEFAULT_GAMMA_CANDIDATES
from speckv_client.flags import default_of

from decode_worker.pair_manifest import read_manifest
from speckv_eval.replay_run import Prompt, load_prompts
from speckv_eval.services import load_local_pair, pair_fingerprint

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
DEFAULT_TRAIN_PROMPTS = PROMPTS_DIR / "train_prompts.jsonl"
DEFAULT_EXCLUDE = PROMPTS_DIR / "prompts.jsonl"


@dataclass(frozen=True)
class LogConfig:
    """What `speckv-eval log-steps` runs."""

    draft: str
    target: str
    out: Path
    prompts: Path = DEFAULT_TRAIN_PROMPTS
    exclude: tuple[Path, ...] = (DEFAULT_EXCLUDE,)
    corpus_snippets: int = 0  # extra prompts cut from the pair's held-out corpus documents
    code_chars: int = 2_000_000  # the pair's corpus size (manifest spec.code_chars)
    gammas: tuple[int, ...] = DEFAULT_GAMMA_CANDIDATES
    tokens_out: Path | None = None
    explore_runs: int = 0
    compressions: tuple[str, ...] = ("fp16", "int8", "nf4")
    max_new_tokens: int = 64
    device: str = "cpu"
    threads: int = 2
    progress: bool = True


def corpus_snippets(n: int, code_chars: int, chars: int = 240) -> list[Prompt]:
    """`n` prompts cut from the tiny pair's *held-out* corpus documents (the pair never
    trained on them), alternating code and prose, each starting at a line boundary."""
    if n <= 0:
        return []
    # The builder's corpus (speckv_tinypair, not in the worker image): only asked-for snippets
    # need it.
    from speckv_tinypair.corpus import load_corpus

    docs = load_corpus(code_chars).heldout
    code = [d for d in docs if d.name.startswith("code:")]
    prose = [d for d in docs if d.name.startswith("prose:")]
    out: list[Prompt] = []
    for i in range(n):
        pool = code if i % 2 == 0 else prose
        if not pool:
            pool = code or prose
        doc = pool[(i // 2) % len(pool)]
        lines = doc.text.splitlines(keepends=True)
        # Successive snippets of the same document start further in.
        start = (len(lines) * ((i // (2 * len(pool))) + 1)) // 4 % max(len(lines), 1)
        text = "".join(lines[start:])[:chars].strip()
        if not text:
            text = doc.text[:chars].strip()
        task = "stdlib-code" if doc.name.startswith("code:") else "pydoc-prose"
        out.append(Prompt(f"heldout-{i:03d}-{doc.name}", task, text))
    return out


def check_disjoint(prompts: list[Prompt], exclude: tuple[Path, ...]) -> None:
    """Refuse training prompts that are evaluation prompts (same text)."""
    banned: dict[str, str] = {}
    for path in exclude:
        for p in load_prompts(path):
            banned[p.prompt.strip()] = f"{path.name}:{p.id}"
    clash = [(p.id, banned[p.prompt.strip()]) for p in prompts if p.prompt.strip() in banned]
    if clash:
        raise ValueError(
            f"{len(clash)} training prompt(s) are evaluation prompts, e.g. {clash[0][0]} = "
            f"{clash[0][1]}; remove them or pass another --exclude"
        )


def log_steps(cfg: LogConfig) -> dict[str, object]:
    """Run every prompt × γ × compression greedily through the engine, recording steps."""
    import torch
    from tqdm import tqdm

    from decode_worker.config import EngineConfig
    from decode_worker.engine import SpeculativeEngine
    from decode_worker.policies import ExplorePolicy, FixedPolicy, GammaPolicy
    from decode_worker.records import StepRecorder, TokenRecorder

    torch.set_num_threads(cfg.threads)
    prompts = load_prompts(cfg.prompts) if cfg.prompts else []
    prompts += corpus_snippets(cfg.corpus_snippets, cfg.code_chars)
    check_disjoint(prompts, cfg.exclude)
    recorder = StepRecorder(cfg.out)
    token_recorder = TokenRecorder(cfg.tokens_out) if cfg.tokens_out else None
    t0 = time.perf_counter()
    runs = steps = 0
    for comp in cfg.compressions:
        pair = load_local_pair(cfg.draft, cfg.target, comp, cfg.device)
        # One engine per task: the recorder writes EngineConfig.record_task in `task`.
        engines = {
            task: SpeculativeEngine(
                pair,
                EngineConfig(default_max_new_tokens=cfg.max_new_tokens, record_task=task),
                recorder=recorder,
                token_recorder=token_recorder,
            )
            for task in sorted({p.task for p in prompts})
        }
        jobs: list[tuple[Prompt, GammaPolicy, str]] = [
            (p, FixedPolicy(g), f"g{g}") for p in prompts for g in cfg.gammas
        ]
        jobs += [
            (p, ExplorePolicy(8), f"explore{k}") for p in prompts for k in range(cfg.explore_runs)
        ]
        for p, policy, tag in tqdm(jobs, desc=f"{comp}: logging", disable=not cfg.progress):
            eng = engines[p.task]
            res = eng.generate(
                eng.encode(p.prompt),
                policy,
                max_new_tokens=cfg.max_new_tokens,
                request_id=f"{p.id}:{comp}:{tag}",
            )
            runs += 1
            steps += sum(1 for s in res.steps if s.gamma > 0)
    if token_recorder is not None:
        token_recorder.close()
    return {
        "out": str(cfg.out),
        "tokens_out": str(cfg.tokens_out) if cfg.tokens_out else None,
        "prompts": len(prompts),
        "runs": runs,
        "drafted_steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "pair_fingerprint": pair_fingerprint(cfg.draft, cfg.target),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", type=Path, required=True, help="folder with draft/ and target/")
    parser.add_argument("--out", type=Path, required=True, help="step CSV to write (new file)")
    parser.add_argument(
        "--prompts",
        type=Path,
        default=default_of(LogConfig, "prompts"),
        help="JSONL training prompts (default: benchmarks/prompts/train_prompts.jsonl)",
    )
    parser.add_argument(
        "--exclude",
        type=Path,
        action="append",
        default=None,
        help="evaluation prompt file(s) the training prompts must not overlap "
        "(default: benchmarks/prompts/prompts.jsonl)",
    )
    parser.add_argument(
        "--corpus-snippets",
        type=int,
        default=default_of(LogConfig, "corpus_snippets"),
        help="also use N prompts cut from the tiny pair's held-out stdlib/pydoc documents",
    )
    parser.add_argument(
        "--gammas",
        type=int,
        nargs="*",
        default=list(default_of(LogConfig, "gammas")),
        help="fixed γ runs per prompt (none: only --explore-runs)",
    )
    parser.add_argument(
        "--tokens-out",
        type=Path,
        default=None,
        help="also write token records (one per drafted token; instep training data)",
    )
    parser.add_argument(
        "--explore-runs",
        type=int,
        default=default_of(LogConfig, "explore_runs"),
        help="runs per prompt and compression with a random γ in 1..8 per step",
    )
    parser.add_argument(
        "--compression",
        nargs="+",
        default=list(default_of(LogConfig, "compressions")),
        choices=["fp16", "int8", "nf4"],
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=default_of(LogConfig, "max_new_tokens")
    )
    parser.add_argument("--threads", type=int, default=default_of(LogConfig, "threads"))
    parser.add_argument(
        "--device", default=default_of(LogConfig, "device"), choices=["cpu", "cuda", "auto"]
    )


def run(args: argparse.Namespace) -> int:
    for sub in ("draft", "target"):
        if not (args.pair / sub).is_dir():
            raise SystemExit(f"--pair {args.pair}: no {sub}/ inside; build the tiny pair first")
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists; give a new file (records are appended)")
    if any(g < 1 for g in args.gammas):
        raise SystemExit(f"--gammas must all be ≥ 1 (γ=0 steps have no signals), got {args.gammas}")
    if args.explore_runs < 0:
        raise SystemExit(f"--explore-runs must be ≥ 0, got {args.explore_runs}")
    if not args.gammas and not args.explore_runs:
        raise SystemExit("nothing to run: give --gammas and/or --explore-runs")
    if args.tokens_out is not None and args.tokens_out.exists():
        raise SystemExit(f"--tokens-out {args.tokens_out} exists; give a new file")
    code_chars = 2_000_000
    manifest = read_manifest(args.pair)  # tiny-pair.json, or an older pair's manifest.json
    if manifest is not None:
        code_chars = int(manifest.spec["code_chars"])
    cfg = LogConfig(
        draft=str(args.pair / "draft"),
        target=str(args.pair / "target"),
        out=args.out,
        prompts=args.prompts,
        exclude=tuple(args.exclude or [DEFAULT_EXCLUDE]),
        corpus_snippets=args.corpus_snippets,
        code_chars=code_chars,
        gammas=tuple(args.gammas),
        tokens_out=args.tokens_out,
        explore_runs=args.explore_runs,
        compressions=tuple(args.compression),
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        threads=args.threads,
    )
    print(json.dumps(log_steps(cfg)))
    return 0
