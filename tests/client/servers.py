"""Real predictor servers for the client tests: in-process (fast) and as a subprocess
(so a test can kill it hard and start it again on the same port)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ADMIN_TOKEN = "client-tests-token"
VENV_BIN = Path(sys.executable).parent


@dataclass
class RunningPredictor:
    address: str
    port: int
    repo: Path


class PredictorProcess:
    """`speckv-predictor serve` as a child process; `kill()` is SIGKILL (no drain)."""

    def __init__(self, repo: Path, log: Path, port: int = 0, grace_s: float = 1.0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SPECKV_ADMIN_TOKEN"}
        self.log = log
        # A file, not a pipe: nobody drains a pipe while the test runs.
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "speckv-predictor"),
                    "serve",
                    "--repo",
                    str(repo),
                    "--port",
                    str(port),
                    "--grace-seconds",
                    str(grace_s),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        self.port = self._wait_serving(timeout_s=60)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_serving(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log.read_text()
            m = re.search(r"listening on [\d.]+:(\d+)", text)
            if m and "serving " in text:
                return int(m.group(1))
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"predictor did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)


class WorkerProcess:
    """`speckv-worker serve` on the tiny pair as a child process."""

    def __init__(
        self, pair_root: Path, predictor: str, log: Path, *extra: str, timeout_s: float = 180
    ) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "speckv-worker"),
                    "serve",
                    "--draft",
                    str(pair_root / "draft"),
                    "--target",
                    str(pair_root / "target"),
                    "--compression",
                    "fp16",
                    "--device",
                    "cpu",
                    "--predictor",
                    predictor,
                    "--policy",
                    "remote",
                    "--port",
                    "0",
                    "--threads",
                    "1",
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on ([\d.]+:\d+)", self.log.read_text())
            if m:
                self.address = m.group(1)
                return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"worker did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
