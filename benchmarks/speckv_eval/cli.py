"""`speckv-eval`: reproduce the seed's tables, replay policies on a real pair."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from speckv_eval import log_steps, paper_cli, replay_cli, tune_cli

    parser = argparse.ArgumentParser(
        prog="speckv-eval",
        description="Measure γ policies: the seed's replay and honest counterfactual replay.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    paper = sub.add_parser(
        "paper", help="reproduce the seed's Tables 1-2 and CIs, then the honest variants"
    )
    paper_cli.add_arguments(paper)
    paper.set_defaults(run=paper_cli.run)
    replay = sub.add_parser(
        "replay", help="exact counterfactual replay of every γ policy on a draft/target pair"
    )
    replay_cli.add_arguments(replay)
    replay.set_defaults(run=replay_cli.run)
    logs = sub.add_parser(
        "log-steps",
        help="log step records of a pair at fixed γ on training prompts (to retrain on)",
    )
    log_steps.add_arguments(logs)
    logs.set_defaults(run=log_steps.run)
    tune = sub.add_parser(
        "tune-plan",
        help="tune a draft_plan model's stop-threshold scales on the training prompts",
    )
    tune_cli.add_arguments(tune)
    tune.set_defaults(run=tune_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
