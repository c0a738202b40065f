"""`speckv-eval`: reproduce the seed's tables, replay policies on a real pair."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from speckv_client.flags import add_subcommand

    from speckv_eval import log_steps, paper_cli, replay_cli, tune_cli

    parser = argparse.ArgumentParser(
        prog="speckv-eval",
        description="Measure γ policies: the seed's replay and honest counterfactual replay.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(
        sub,
        "paper",
        paper_cli,
        "reproduce the seed's Tables 1-2 and CIs, then the honest variants",
    )
    add_subcommand(
        sub,
        "replay",
        replay_cli,
        "exact counterfactual replay of every γ policy on a draft/target pair",
    )
    add_subcommand(
        sub,
        "log-steps",
        log_steps,
        "log step records of a pair at fixed γ on training prompts (to retrain on)",
    )
    add_subcommand(
        sub,
        "tune-plan",
        tune_cli,
        "tune a draft_plan model's stop-threshold scales on the training prompts",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from speckv_client.flags import run_subcommand

    return run_subcommand(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
