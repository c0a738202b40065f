"""`speckv-eval tune-plan`: tune a draft_plan model's stop-threshold scales on the
*training* prompts by exact replay (docs/design.md, "Draft plans").

Prints one JSON object (the grid, the best pair, the default pair's score). Evaluation
prompts are refused, as in `log-steps`, so nothing about the evaluation set leaks into
the scales; register the tuned model with `speckv-predictor train --model-kind instep
--first-scale F --continue-scale C` (same data and seed: the same weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speckv_client.flags import default_of

from speckv_eval.log_steps import DEFAULT_EXCLUDE, DEFAULT_TRAIN_PROMPTS, check_disjoint
from speckv_eval.replay_run import CONTINUE_SCALES, FIRST_SCALES, ReplayConfig, load_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", type=Path, required=True, help="folder with draft/ and target/")
    parser.add_argument("--model", type=Path, required=True, help="draft_plan version folder")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_TRAIN_PROMPTS)
    parser.add_argument("--exclude", type=Path, action="append", default=None)
    parser.add_argument(
        "--compression", nargs="+", default=["fp16", "int8", "nf4"], choices=["fp16", "int8", "nf4"]
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=default_of(ReplayConfig, "max_new_tokens")
    )
    parser.add_argument("--limit", type=int, default=default_of(ReplayConfig, "limit"))
    parser.add_argument("--first-scales", type=float, nargs="+", default=list(FIRST_SCALES))
    parser.add_argument("--continue-scales", type=float, nargs="+", default=list(CONTINUE_SCALES))
    parser.add_argument("--threads", type=int, default=default_of(ReplayConfig, "threads"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")


def run(args: argparse.Namespace) -> int:
    from speckv_eval.replay_run import tune_plan

    for sub in ("draft", "target"):
        if not (args.pair / sub).is_dir():
            raise SystemExit(f"--pair {args.pair}: no {sub}/ inside; build the tiny pair first")
    if not (args.model / "manifest.json").is_file():
        raise SystemExit(f"--model {args.model}: no manifest.json; pass <repo>/<name>/<version>")
    check_disjoint(load_prompts(args.prompts), tuple(args.exclude or [DEFAULT_EXCLUDE]))
    cfg = ReplayConfig(
        draft=str(args.pair / "draft"),
        target=str(args.pair / "target"),
        prompts=args.prompts,
        compressions=tuple(args.compression),
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        threads=args.threads,
    )
    result = tune_plan(cfg, args.model, args.first_scales, args.continue_scales)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0
