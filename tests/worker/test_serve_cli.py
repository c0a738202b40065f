"""`speckv-worker serve` as a real process: prints its address, serves, stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from speckv.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

WORKER = str(Path(sys.executable).with_name("speckv-worker"))


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [WORKER, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_generate_and_sigterm(tiny_pair_dir: Path) -> None:
    proc = _serve(
        "--draft", str(tiny_pair_dir / "draft"),
        "--target", str(tiny_pair_dir / "target"),
        "--compression", "fp16", "--device", "cpu", "--policy", "fixed:2",
        "--port", "0", "--threads", "1", "--max-new-tokens-limit", "32",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if m := re.match(r"listening on (\S+)", line):
                address = m.group(1)
                break
            if not line and proc.poll() is not None:
                break
        assert address, f"no address; stderr: {proc.stderr.read() if proc.stderr else ''}"
        with grpc.insecure_channel(address) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            info = stub.GetInfo(decoder_pb2.GetInfoRequest(), timeout=10)
            assert info.compression == common_pb2.COMPRESSION_FP16
            assert "float32" in info.target_dtype and info.policy == "fixed:2"
            events = list(
                stub.Generate(
                    decoder_pb2.GenerateRequest(prompt="def add(a, b):", max_new_tokens=12),
                    timeout=60,
                )
            )
            assert events[-1].summary.new_tokens == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "remote"], "--policy remote needs --predictor"),
        (["--policy", "fixed:x"], "not an integer"),
        (["--fallback-gamma", "-1"], "fallback gamma must be"),
        (["--gamma-candidates", "2,x"], "give integers"),
        (["--predictor", "h:1", "--decision-timeout-ms", "-3"], "decision timeout"),
    ],
)
def test_flags_are_validated_before_loading(args: list[str], message: str) -> None:
    import argparse

    from decode_worker import serve_cli
    from decode_worker.config import ConfigError
    from decode_worker.policies import PolicyError

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    with pytest.raises((ConfigError, PolicyError), match=re.escape(message)):
        serve_cli.build_config(parser.parse_args(["--draft", "d", "--target", "t", *args]))


def test_serve_refuses_a_missing_pair(tmp_path: Path) -> None:
    proc = _serve("--draft", str(tmp_path / "nope"), "--target", str(tmp_path / "nope"),
                  "--policy", "fixed:2")  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in err
