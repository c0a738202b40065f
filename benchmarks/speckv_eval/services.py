"""Start the project's servers as subprocesses, as a user runs them, for benchmarks and the demo.

Both `speckv-predictor serve` and `speckv-worker serve` print `listening on HOST:PORT` once
they serve; `ServiceProcess` waits for that line (a child that exits first, or stays silent
past the timeout, is reported with the last lines of its stderr), keeps draining stdout so
the child never blocks on a full pipe, and stops the child with SIGTERM (SIGKILL after a
grace).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

LISTENING = re.compile(r"listening on (\S+:\d+)")
BIN = Path(sys.executable).parent


class ServiceProcess:
    """A server subprocess whose bound address is read from its `listening on` line."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str | Path],
        *,
        log_path: Path | None = None,
        timeout_s: float = 180.0,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # Without a log, stderr goes to an unnamed temporary file, so that a server that dies
        # before it listens can be reported with its last lines (and a long run's stderr
        # never fills a pipe).
        self._log: IO[str] = (
            log_path.open("w") if log_path is not None else tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        )
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._listening = threading.Event()
        self._address = ""
        # One reader for stdout from the start: it finds the `listening on` line and then
        # keeps draining, so the wait below can time out even while the child prints nothing.
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.address = self._wait_address(timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not self._listening.is_set():
                match = LISTENING.search(line)
                if match:
                    self._address = match.group(1)
                    self._listening.set()

    def _wait_address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._listening.wait(0.05):
                return self._address
            if self.proc.poll() is not None:
                break
        if self._listening.is_set():  # it listened and exited at once
            return self._address
        code = self.proc.poll()
        self._terminate()
        tail = self._stderr_tail()
        self.stop()
        what = (
            f"{self.name} exited with code {code} before it listened"
            if code is not None
            else f"{self.name} did not start within {timeout_s:g} s"
        )
        where = f"; its log is {self.log_path}" if self.log_path is not None else ""
        raise RuntimeError(f"{what}{where}{tail}")

    def _stderr_tail(self, lines: int = 8) -> str:
        """The last lines of stderr (from the log file when there is one), for errors."""
        try:
            if self.log_path is not None:
                text = self.log_path.read_text(errors="replace")
            else:
                self._log.seek(0)
                text = self._log.read()
        except (OSError, ValueError):  # closed or unreadable: the error says what it can
            return ""
        tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
        return ("; last stderr lines:\n" + "\n".join(tail)) if tail else ""

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the services drain), then SIGKILL after `grace_s`; returns the exit code."""
        self._terminate(grace_s)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def _terminate(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_predictor(
    repo: Path,
    *,
    default_model: str | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    timeout_s: float = 60.0,
) -> ServiceProcess:
    """`speckv-predictor serve --repo REPO --port 0` on loopback."""
    cmd: list[str | Path] = [BIN / "speckv-predictor", "serve", "--repo", repo]
    cmd += ["--host", "127.0.0.1", "--port", "0"]
    if default_model:
        cmd += ["--default-model", default_model]
    return ServiceProcess(
        "speckv-predictor", [*cmd, *extra_args], log_path=log_path, timeout_s=timeout_s
    )


def start_worker(
    pair: Path,
    predictor: str,
    *,
    compression: str = "fp16",
    policy: str = "remote",
    threads: int | None = None,
    shutdown_grace_s: float = 5.0,
    extra_args: Sequence[str | Path] = (),
    log_path: Path | None = None,
    timeout_s: float = 180.0,
) -> ServiceProcess:
    """`speckv-worker serve` on the pair at `pair` (draft/, target/), on loopback, CPU."""
    cmd: list[str | Path] = [BIN / "speckv-worker", "serve", "--draft", pair / "draft"]
    cmd += ["--target", pair / "target", "--compression", compression, "--device", "cpu"]
    cmd += ["--predictor", predictor, "--policy", policy, "--port", "0"]
    cmd += ["--shutdown-grace-s", str(shutdown_grace_s)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return ServiceProcess(
        "speckv-worker", [*cmd, *extra_args], log_path=log_path, timeout_s=timeout_s
    )


def stop_services(
    services: Sequence[ServiceProcess | None], log: Callable[[str], None]
) -> dict[str, int | None]:
    """The end of a script that started services: SIGTERM each one started (in the order
    given, each draining), and log their exit codes in one line."""
    codes = {s.name: s.stop() for s in services if s is not None}
    log("stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()))
    return codes


def exit_status(failures: Sequence[str], log: Callable[[str], None], summary: str) -> int:
    """A script's last words: each failure on stderr, then `summary`; 1 if any failed."""
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    log(summary)
    return 1 if failures else 0


def publish_version(version_dir: Path, repo: Path, model: str) -> Path:
    """Copy a finished version into a served repository atomically (copy, then rename), as
    a CI job publishes next to a running server; returns the published folder."""
    dest = repo / model / version_dir.name
    tmp = repo / model / f".tmp-{version_dir.name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(version_dir, tmp)
    tmp.rename(dest)
    return dest


def load_local_pair(draft: str | Path, target: str | Path, compression: str, device: str) -> Any:
    """The pair as every measurement loads it: from local files only (no machine of this
    project downloads weights), at one compression."""
    from decode_worker.pair import PairConfig, load_pair

    return load_pair(
        PairConfig(
            draft=str(draft),
            target=str(target),
            compression=compression,
            device=device,
            local_files_only=True,
        )
    )


def pair_fingerprint(draft: str | Path, target: str | Path) -> dict[str, object]:
    """Which pair a results file's numbers came from (docs/tiny-pair.md, "Fingerprint"):
    a weights id computed from the files, and the tiny-pair manifest's agreement, cost
    ratio, torch and CPU when that manifest describes those very files. Record it in every
    results JSON; weights are byte-identical only on the same CPU and torch."""
    from decode_worker.pair_manifest import pair_fingerprint as fingerprint

    return fingerprint(draft, target)


def format_pair_fingerprint(fingerprint: dict[str, object]) -> str:
    """The fingerprint as one line (`pair 1a2b...: agreement ... / ..., cost ratio ...`)."""
    from decode_worker.pair_manifest import format_fingerprint

    return format_fingerprint(dict(fingerprint))
