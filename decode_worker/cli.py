"""`speckv-worker`: serve a draft/target pair over gRPC.

The tiny-pair builder is not part of the worker: it is `speckv-tiny-pair` (the `tinypair`
extra, docs/tiny-pair.md), so the worker package and image carry no training code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

MOVED = {
    "tiny-pair": "the tiny-pair builder is now its own command: `speckv-tiny-pair` (same flags; "
    "install the `tinypair` extra), e.g. `speckv-tiny-pair --size demo`",
}


def build_parser() -> argparse.ArgumentParser:
    from speckv_client.flags import add_subcommand

    from decode_worker import serve_cli

    parser = argparse.ArgumentParser(
        prog="speckv-worker",
        description="Speculative decoding worker for SpecKV.",
        epilog="The tiny draft/target pair is built by `speckv-tiny-pair`, not by this command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub, "serve", serve_cli, "load a pair once and serve Generate over gRPC")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOVED:
        print(f"speckv-worker: error: no command {argv[0]!r}: {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    from speckv_client.flags import run_subcommand

    return run_subcommand(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
