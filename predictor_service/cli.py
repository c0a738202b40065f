"""`speckv-predictor`: train and register a predictor version, or serve a model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    # Subcommand modules import their heavy dependencies inside run(), so a
    # predictor-only install can serve without scikit-learn and vice versa.
    from speckv_client.flags import add_subcommand

    from predictor_service import serve_cli, train_cli

    parser = argparse.ArgumentParser(
        prog="speckv-predictor",
        description="Train, export and serve SpecKV acceptance predictors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub, "train", train_cli, "train a predictor and register it as a new version")
    add_subcommand(sub, "serve", serve_cli, "serve a model repository over gRPC")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from speckv_client.flags import run_subcommand

    return run_subcommand(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
