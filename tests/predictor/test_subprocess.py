"""The real `speckv-predictor serve` process: SIGTERM drain, /metrics, and no torch."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from tests.predictor.helpers import MODEL, request

# Runs the CLI's own main() and reports afterwards what the serving process had imported.
WRAPPER = (
    "import sys\n"
    "from predictor_service.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules)\n"
    "print('heavy-modules:', ','.join(heavy) or 'none', flush=True)\n"
    "sys.exit(rc)\n"
)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(
    q: queue.Queue[str], pattern: str, seen: list[str], timeout: float = 60
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r}; output so far: {seen}")


def test_sigterm_drains_streams_and_the_process_never_imports_torch(model_repo: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        WRAPPER,
        "serve",
        "--repo",
        str(model_repo),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--default-model",
        MODEL,
        "--grace-seconds",
        "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: list[str] = []
    try:
        q = _lines(proc)
        port = int(_wait_for(q, r"listening on 127\.0\.0\.1:(\d+)", seen).group(1))
        metrics_port = int(_wait_for(q, r"metrics on http://127\.0\.0\.1:(\d+)/", seen).group(1))
        _wait_for(q, r"serving 3 model version", seen)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PredictorServiceStub(ch)
            requests: queue.Queue[object] = queue.Queue()
            responses = stub.Decide(iter(requests.get, None), timeout=30)
            requests.put(request(1, ["a", "b"]))
            first = next(responses)
            assert first.request_id == 1 and len(first.decisions) == 2
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            text = scrape.read().decode()
            assert (
                'speckv_predictor_decisions_total{arm="v2",model="speckv-mlp16",version="2"} 2.0'
                in text
            )
            proc.send_signal(signal.SIGTERM)
            notice = next(responses)
            assert notice.reconnect and not notice.decisions
            requests.put(request(2, ["a"]))  # in flight during the grace period: answered
            late = next(responses)
            assert late.request_id == 2 and late.decisions and late.reconnect
            requests.put(None)  # the worker closes its stream and reconnects elsewhere
            assert list(responses) == []
        t0 = time.monotonic()
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 5
        _wait_for(q, r"heavy-modules: none$", seen, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
