"""`speckv-tiny-pair`: build (or reuse) the tiny draft/target pair and print its numbers.

Not part of the worker (nor its image): the worker serves any pair folder; this builds one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from speckv_client.flags import default_of

from decode_worker.pair_manifest import ManifestError, format_fingerprint
from speckv_tinypair.builder import SIZES, TinyPairConfig, ensure_tiny_pair

_THREADS: int = default_of(TinyPairConfig, "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the pair (default .cache/tiny-pair/<size>-seed<seed>)",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default=default_of(TinyPairConfig, "size"))
    parser.add_argument("--seed", type=int, default=default_of(TinyPairConfig, "seed"))
    parser.add_argument(
        "--threads",
        type=int,
        default=_THREADS,
        help=f"torch CPU threads for training (default {_THREADS})",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when the cached pair matches"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    parser.add_argument(
        "--measure-compressions",
        action="store_true",
        help="also time the draft and the target as fp16, int8 and nf4 on this machine now",
    )


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        print(f"--threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    out = args.out or Path(".cache") / "tiny-pair" / f"{args.size}-seed{args.seed}"
    config = TinyPairConfig(
        out=out,
        size=args.size,
        seed=args.seed,
        threads=args.threads,
        force=args.force,
        progress=not args.quiet,
    )
    try:
        pair = ensure_tiny_pair(config)
    except (FileExistsError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = pair.manifest
    if args.json:
        print(json.dumps(m.to_json(), indent=2, sort_keys=True))
        return 0
    metrics, build = m.metrics, m.build
    state = "reused cached pair" if pair.reused else "built"
    print(f"{state}: {pair.root} (size {m.size}, seed {m.seed})")
    print(f"  target {pair.target_dir}  ({m.parameters.target:,} parameters)")
    print(f"  draft  {pair.draft_dir}  ({m.parameters.draft:,} parameters)")
    print(
        "  greedy agreement: held-out teacher-forced "
        f"{metrics.agreement_teacher_forced_heldout:.3f}, "
        f"target-generated {metrics.agreement_target_generated:.3f}"
    )
    print(
        f"  per-token cost: draft {metrics.draft_ms_per_token:.2f} ms, "
        f"target {metrics.target_ms_per_token:.2f} ms, "
        f"ratio {metrics.cost_ratio_draft_over_target:.3f}"
    )
    print(
        f"  build {build['seconds_total']:.0f} s on {build['threads']} threads "
        f"(load average {build['load_average_at_start']} -> {build['load_average_at_end']})"
    )
    print(f"  fingerprint: {format_fingerprint(m.fingerprint)}")
    print(f"  serve: speckv-worker serve --draft {pair.draft_dir} --target {pair.target_dir}")
    if args.measure_compressions:
        _measure_compressions(pair.draft_dir, pair.target_dir, args.threads)
    return 0


MEASURE_PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser(description="


def _measure_compressions(draft: Path, target: Path, threads: int) -> None:
    """Per-token cost changes with the target's compression; the manifest has fp16 only."""
    import os

    import torch

    from decode_worker.pair import COMPRESSIONS, PairConfig, load_pair
    from speckv_tinypair.pair_metrics import measure_cost

    torch.set_num_threads(threads)
    for compression in COMPRESSIONS:
        pair = load_pair(PairConfig(str(draft), str(target), compression=compression, device="cpu"))
        ids = pair.tokenizer(MEASURE_PROMPT, return_tensors="pt").input_ids[:, :32]
        cost = measure_cost(pair.draft, pair.target, ids, steps=100)
        print(
            f"  {compression}: draft {cost.draft_ms_per_token:.2f} ms/token, target "
            f"{cost.target_ms_per_token:.2f} ms/token, target over {cost.verify_tokens} tokens "
            f"{cost.target_ms_verify:.2f} ms, ratio {cost.ratio:.3f} "
            f"(load average {os.getloadavg()[0]:.2f})"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speckv-tiny-pair",
        description="Build (or reuse) the project's tiny draft/target pair on CPU, "
        "deterministically for a seed, and print its measured numbers (docs/tiny-pair.md).",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
