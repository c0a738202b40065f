"""`speckv-predictor`: train and register a predictor version, or serve a model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    # Subcommand modules import their heavy dependencies inside run(), so a
    # predictor-only install can serve without scikit-learn and vice versa.
    from predictor_service import serve_cli, train_cli

    parser = argparse.ArgumentParser(
        prog="speckv-predictor",
        description="Train, export and serve SpecKV acceptance predictors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a predictor and register it as a new version")
    train_cli.add_arguments(train)
    train.set_defaults(run=train_cli.run)
    serve = sub.add_parser("serve", help="serve a model repository over gRPC")
    serve_cli.add_arguments(serve)
    serve.set_defaults(run=serve_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
