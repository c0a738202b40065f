"""Client pieces that need no server: backoff numbers, service config, CLI flag checks,
an address where nothing listens."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import wait

import pytest
from speckv_client.channel import ChannelConfig, ReconnectBackoff, RetryPolicy, service_config
from speckv_client.cli import ExitCode, format_summary
from speckv_client.errors import PredictorUnavailable
from speckv_client.predictor import PredictorClient
from speckv_client.types import (
    Compression,
    DecideBatch,
    DraftSignals,
    FeatureRow,
    FinishReason,
    GenerationSummary,
)


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def speckv(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speckv_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_row_batch() -> DecideBatch:
    return DecideBatch(
        rows=(FeatureRow("k", 1, DraftSignals(1.0, 0.7, 2.0, 0.3), Compression.NF4),)
    )


def test_backoff_is_exponential_capped_and_jittered() -> None:
    b = ReconnectBackoff()
    assert [b.delay(n, 0.5) for n in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert b.delay(0, 0.0) == pytest.approx(0.08)
    assert b.delay(30, 0.999999) == pytest.approx(2.4, rel=1e-5)


def test_service_config_retries_only_idempotent_methods_on_unavailable() -> None:
    cfg = json.loads(service_config("svc", ("Predict", "GetModel"), RetryPolicy()))
    (method,) = cfg["methodConfig"]
    assert [n["method"] for n in method["name"]] == ["Predict", "GetModel"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]


def test_summary_line_names_every_number() -> None:
    line = format_summary(
        GenerationSummary(
            new_tokens=40,
            steps=16,
            tokens_per_step=2.5,
            acceptance_rate=0.61,
            mean_gamma=3.5,
            wall_seconds=0.8,
            tokens_per_second=50.0,
            remote_decisions=15,
            fallback_decisions=1,
            finish_reason=FinishReason.LENGTH,
            model_versions={"speckv-mlp16:1": 15},
        )
    )
    assert "\n" not in line
    for part in (
        "50.0 tokens/s",
        "2.50 tokens/step",
        "mean gamma 3.50",
        "acceptance 0.61",
        "remote 15",
        "fallback 1",
        "speckv-mlp16:1x15",
    ):
        assert part in line


def test_decision_stream_to_nothing_fails_fast_and_backs_off() -> None:
    port = free_port()
    client = PredictorClient(f"127.0.0.1:{port}", timeout_s=1.0)
    stream = client.decision_stream(seed=0)
    try:
        time.sleep(1.5)
        assert not stream.connected
        started = time.perf_counter()
        futures = [stream.submit(one_row_batch()) for _ in range(50)]
        submit_s = time.perf_counter() - started
        _done, not_done = wait(futures, timeout=5)
        assert not not_done
        assert all(isinstance(f.exception(), PredictorUnavailable) for f in futures)
        assert submit_s < 0.5, f"submit blocked: {submit_s:.3f} s for 50"
        # Attempts back off 0.1, 0.2, 0.4, 0.8 s (+-20%): a handful in 1.5 s, not hundreds.
        assert 2 <= stream.stats.streams_opened <= 8, stream.stats
    finally:
        stream.close()
        client.close()
    assert stream.submit(one_row_batch()).exception(timeout=1) is not None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["predict", "--predictor", "x:1", "--features", "1,2,3", "--compression", "nf4"],
            "--features needs 4",
        ),
        (
            ["predict", "--predictor", "x:1", "--features", "1,nan,3,4", "--compression", "nf4"],
            "not finite",
        ),
        (
            [
                "predict",
                "--predictor",
                "x:1",
                "--features",
                "1,2,3,4",
                "--compression",
                "nf4",
                "--candidates",
                "2,x",
            ],
            "--candidates",
        ),
        (
            [
                "predict",
                "--predictor",
                "x:1",
                "--features",
                "1,2,3,4",
                "--compression",
                "nf4",
                "--model",
                "m:zero",
            ],
            "NAME:VERSION",
        ),
        (["route", "m", "stable=abc", "--predictor", "x:1"], "TARGET=WEIGHT"),
        (["route", "m", "stable=90", "--alias", "stable", "--predictor", "x:1"], "ALIAS=VERSION"),
        (["generate", "--worker", "x:1", "hi", "--temperature", "-1"], "--temperature"),
        (["models", "load", "m", "v1", "--predictor", "127.0.0.1:1"], "VERSION"),
        (["--timeout", "0", "models", "list", "--predictor", "x:1"], "--timeout"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(args: list[str], needle: str) -> None:
    proc = speckv(*args)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_argparse_errors_exit_2() -> None:
    proc = speckv("predict", "--predictor", "x:1", "--features", "1,2,3,4", "--compression", "q3")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["models", "list"],
        ["predict", "--features", "1,0.5,2,0.2", "--compression", "fp16"],
        ["rollback", "speckv-mlp16"],
    ],
)
def test_unreachable_predictor_exits_3(args: list[str]) -> None:
    proc = speckv(*args, "--predictor", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert proc.returncode == ExitCode.UNREACHABLE, proc.stderr
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_unreachable_worker_exits_3() -> None:
    proc = speckv("generate", "--worker", f"127.0.0.1:{free_port()}", "hello", "--timeout", "2")
    assert proc.returncode == ExitCode.UNREACHABLE, proc.stderr
    assert "worker at 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


def test_tls_ca_file_must_exist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = speckv("--tls-ca", str(tmp_path / "nope.pem"), "models", "list", "--predictor", "x:1")
    assert proc.returncode == ExitCode.USAGE
    assert "nope.pem" in proc.stderr


def test_default_channel_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ChannelConfig().max_message_bytes = 1  # type: ignore[misc]
