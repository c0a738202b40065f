"""Every bad flag value of `speckv`, `speckv-worker serve` and `speckv-predictor serve` is
exit 2 with the flag and its allowed range named (issue 12, item 10), as subprocesses.

The `speckv` cases run against a healthy predictor, so a value that slips through
parsing shows up as what it used to be: "did not answer in time" (exit 3), a raw gRPC
log line, or "Value out of range: N" from protobuf with no flag named.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from speckv_client.cli import ExitCode

from tests.client.servers import VENV_BIN, RunningPredictor

# A line of gRPC's C-core log: "I1202 16:37:34.394981 4669 file.cc:123] ..."
GRPC_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def _env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in ("SPECKV_ADMIN_TOKEN", "GRPC_VERBOSITY")
    }


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())


def speckv(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "speckv_client.cli", *args)


def assert_flag_refused(proc: subprocess.CompletedProcess[str], flag: str, allowed: str) -> None:
    assert proc.returncode == ExitCode.USAGE, (proc.returncode, proc.stderr)
    assert flag in proc.stderr and allowed in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not GRPC_LOG_LINE.search(proc.stderr), proc.stderr
    assert 1 <= len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


U32 = "[0, 4294967295]"
U64 = "[0, 18446744073709551615]"
I64 = "[1, 9223372036854775807]"
SECONDS = "(0, 86400]"

# (arguments after the subcommand's address flag, flag named, allowed range named)
PREDICT = ("predict", "--features", "1,0.5,2,0.1", "--compression", "fp16")
SPECKV_CASES: list[tuple[tuple[str, ...], str, str]] = [
    (("models", "list", "--timeout", "nan"), "--timeout", SECONDS),
    (("models", "list", "--timeout", "inf"), "--timeout", SECONDS),
    (("models", "list", "--timeout", "1e300"), "--timeout", SECONDS),
    (("--timeout", "-1", "models", "list"), "--timeout", SECONDS),
    (("generate", "hi", "--deadline", "nan"), "--deadline", SECONDS),
    (("generate", "hi", "--deadline", "-1"), "--deadline", SECONDS),
    (("generate", "hi", "--deadline", "1e300"), "--deadline", SECONDS),
    (("generate", "hi", "--max-new-tokens", str(2**33)), "--max-new-tokens", U32),
    (("generate", "hi", "--max-new-tokens", "-1"), "--max-new-tokens", U32),
    (("generate", "hi", "--seed", str(2**64)), "--seed", U64),
    (("generate", "hi", "--temperature", "nan"), "--temperature", ">= 0"),
    (("generate", "hi", "--top-p", "inf"), "--top-p", "[0, 1]"),
    ((*PREDICT, "--step", "-1"), "--step", U64),
    ((*PREDICT, "--step", str(2**64)), "--step", U64),
    ((*PREDICT, "--candidates", f"2,{2**32}"), "--candidates", U32),
    (("route", "m", "a=1", "--shadow", str(2**63)), "--shadow", "[0, 9223372036854775807]"),
    (("route", "m", "a=1", "--alias", f"stable={2**63}"), "--alias", I64),
    ((*PREDICT, "--model", f"m:{2**63}"), "--model", I64),
    (("models", "load", "m", str(2**63)), "VERSION", I64),
]


def _with_address(args: tuple[str, ...], address: str) -> list[str]:
    flag = "--worker" if "generate" in args else "--predictor"
    return [*args, flag, address]


@pytest.mark.parametrize(
    ("args", "flag", "allowed"), SPECKV_CASES, ids=[" ".join(c[0]) for c in SPECKV_CASES]
)
def test_speckv_out_of_range_values_name_the_flag(
    predictor: RunningPredictor, args: tuple[str, ...], flag: str, allowed: str
) -> None:
    assert_flag_refused(speckv(*_with_address(args, predictor.address)), flag, allowed)


@pytest.mark.parametrize(
    ("command", "address", "allowed"),
    [
        (("models", "list"), "", "HOST:PORT"),
        (("models", "list"), "127.0.0.1:99999", "[1, 65535]"),
        (("models", "list"), "127.0.0.1", "HOST:PORT"),
        (("rollback", "m"), "dns:///:50061", "HOST:PORT"),
        (("generate", "hi"), "", "HOST:PORT"),
        (("generate", "hi"), "localhost:99999", "[1, 65535]"),
    ],
)
def test_speckv_bad_addresses_are_usage_errors(
    command: tuple[str, ...], address: str, allowed: str
) -> None:
    flag = "--worker" if "generate" in command else "--predictor"
    assert_flag_refused(speckv(*_with_address(command, address)), flag, allowed)


def test_speckv_good_edge_values_still_work(predictor: RunningPredictor) -> None:
    ok = speckv("models", "list", "--predictor", predictor.address, "--timeout", "86400")
    assert ok.returncode == 0, ok.stderr
    ok = speckv("models", "list", "--predictor", f"dns:///{predictor.address}")
    assert ok.returncode == 0, ok.stderr


def test_tls_against_a_plaintext_server_is_one_error_without_grpc_log_lines(
    predictor: RunningPredictor,
) -> None:
    proc = speckv("models", "list", "--predictor", predictor.address, "--tls", "--timeout", "3")
    assert proc.returncode == ExitCode.UNREACHABLE, proc.stderr
    assert not GRPC_LOG_LINE.search(proc.stderr), proc.stderr
    assert "--tls" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr


PREDICTOR_CASES: list[tuple[tuple[str, ...], str, str]] = [
    (("--port", "99999"), "--port", "[0, 65535]"),
    (("--port", "-1"), "--port", "[0, 65535]"),
    (("--metrics-port", "70000"), "--metrics-port", "[0, 65535]"),
    (("--grace-seconds", "nan"), "--grace-seconds", "[0, 86400]"),
    (("--poll-seconds", "nan"), "--poll-seconds", SECONDS),
    (("--max-connection-age-seconds", "-1"), "--max-connection-age-seconds", SECONDS),
    (("--max-connection-age-seconds", "inf"), "--max-connection-age-seconds", SECONDS),
    (("--max-batch-rows", str(2**32)), "--max-batch-rows", "[1, 2147483647]"),
    (("--host", ""), "--host", "host name or IP address"),
]


@pytest.mark.parametrize(
    ("args", "flag", "allowed"), PREDICTOR_CASES, ids=[" ".join(c[0]) for c in PREDICTOR_CASES]
)
def test_predictor_serve_flags(
    tmp_path: Path, args: tuple[str, ...], flag: str, allowed: str
) -> None:
    proc = run(str(VENV_BIN / "speckv-predictor"), "serve", "--repo", str(tmp_path), *args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert f"argument {flag}:" in proc.stderr and allowed in proc.stderr, proc.stderr


WORKER_CASES: list[tuple[tuple[str, ...], str, str]] = [
    (("--port", "99999"), "--port", "[0, 65535]"),
    (("--predictor", "127.0.0.1:99999"), "--predictor", "[1, 65535]"),
    (("--shutdown-grace-s", "nan"), "--shutdown-grace-s", "[0, 86400]"),
    (("--threads", "-1"), "--threads", "[0, 1024]"),
    (("--max-concurrent-requests", str(2**32)), "--max-concurrent-requests", "[1, 2147483647]"),
    (("--max-new-tokens-limit", str(2**33)), "--max-new-tokens-limit", "[1, 4294967295]"),
]


@pytest.mark.parametrize(
    ("args", "flag", "allowed"), WORKER_CASES, ids=[" ".join(c[0]) for c in WORKER_CASES]
)
def test_worker_serve_flags(tmp_path: Path, args: tuple[str, ...], flag: str, allowed: str) -> None:
    proc = run(
        str(VENV_BIN / "speckv-worker"),
        "serve",
        "--draft",
        str(tmp_path / "no-draft"),
        "--target",
        str(tmp_path / "no-target"),
        "--device",
        "cpu",
        *args,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert f"argument {flag}:" in proc.stderr and allowed in proc.stderr, proc.stderr
