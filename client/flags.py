"""Command-line value checks and subcommand plumbing shared by `speckv`, `speckv-worker`,
`speckv-predictor` and `speckv-eval`.

Each factory returns an argparse `type=` callable: a bad value becomes an argparse error,
which names the flag ("argument --port: ..."), states the allowed range and exits 2.
Standard library only, so a server's `--help` never needs gRPC.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1
PORT_MAX = 65535
MAX_THREADS = 1024
MAX_SECONDS = 86_400.0
"""The longest --timeout/--deadline/grace the tools accept: one day. gRPC turns far larger
deadlines (1e300) into an immediate DEADLINE_EXCEEDED, which reads as "no answer in time"."""


def _span(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}"


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi] (decimal)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be an integer in [{lo}, {hi}], got {text!r}"
            ) from None
        return value

    parse.__name__ = "integer"  # argparse's fallback message names the type
    return parse


def float_range(
    lo: float | None, hi: float | None, *, lo_open: bool = False
) -> Callable[[str], float]:
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`); None leaves a side open."""
    span = _span(lo, hi, lo_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def port(*, allow_zero: bool) -> Callable[[str], int]:
    """A TCP port to bind: [0, 65535] where 0 picks a free one, else [1, 65535]."""
    return int_range(0 if allow_zero else 1, PORT_MAX)


_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+)$")


def check_target(text: str, *, required: bool = True) -> str:
    """A gRPC dial target: HOST:PORT, [IPV6]:PORT, dns:///HOST:PORT, unix:PATH, ...

    Returns the text unchanged; raises ValueError saying what is wrong. gRPC itself takes
    PORT modulo 65536 (99999 dials 34463) and reports an empty target only in a log line.
    """
    if not text:
        if required:
            raise ValueError("must be HOST:PORT (PORT in [1, 65535]), got ''")
        return text
    if any(c.isspace() for c in text):
        raise ValueError(f"must be HOST:PORT without spaces, got {text!r}")
    if text.startswith(_SCHEMES):
        if not text.split(":", 1)[1].strip("/"):
            raise ValueError(f"names no address after the scheme: {text!r}")
        return text
    rest = text
    if rest.startswith("dns:"):
        rest = rest[len("dns:") :]
        if rest.startswith("//"):  # dns://[authority]/host:port
            rest = rest[2:].partition("/")[2]
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not _HOST.match(host):
        raise ValueError(f"must be HOST:PORT (PORT in [1, 65535]), got {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= PORT_MAX:
        raise ValueError(f"port must be an integer in [1, {PORT_MAX}], got {text!r}")
    return text


def target(*, required: bool = True) -> Callable[[str], str]:
    """argparse type for a dial target (see `check_target`)."""

    def parse(text: str) -> str:
        try:
            return check_target(text, required=required)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "address"
    return parse


def bind_host(text: str) -> str:
    """A host or IP address to bind: not empty, no spaces, no port."""
    if not text or not _HOST.match(text):
        raise argparse.ArgumentTypeError(
            f"must be a host name or IP address (e.g. 127.0.0.1, 0.0.0.0, [::]), got {text!r}"
        )
    return text


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of the dataclass `config`: a flag's default read from the
    configuration it fills, so the two cannot drift (`default_factory` fields are built)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise AttributeError(f"{config.__name__} has no field {name!r}")


class Subcommand(Protocol):
    """A subcommand module: `add_arguments(parser)` and `run(args) -> exit code`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def add_subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    module: Subcommand,
    help_text: str,
) -> argparse.ArgumentParser:
    """`PROG NAME`: the module's flags, run by `run_subcommand`."""
    parser = sub.add_parser(name, help=help_text)
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)
    return parser


def run_subcommand(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv` and run the chosen subcommand's `run`; its exit code."""
    args = parser.parse_args(argv)
    return int(args.run(args))
