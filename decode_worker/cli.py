"""`speckv-worker`: build the tiny model pair, or serve a draft/target pair over gRPC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from decode_worker import serve_cli, tiny_pair_cli

    parser = argparse.ArgumentParser(
        prog="speckv-worker",
        description="Speculative decoding worker for SpecKV.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-pair", help="build (or reuse) the embedded tiny draft/target pair")
    tiny_pair_cli.add_arguments(tiny)
    tiny.set_defaults(run=tiny_pair_cli.run)
    serve = sub.add_parser("serve", help="load a pair once and serve Generate over gRPC")
    serve_cli.add_arguments(serve)
    serve.set_defaults(run=serve_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
