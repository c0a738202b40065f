"""Step and token records: the CSV rows the trainers read, and the files that hold them.

Step records keep the seed's schema first: the first eleven columns are exactly
`phase2_step_results.csv`'s, so `speckv-predictor train` reads a worker's records as it
reads the seed's. The columns after them are what live traffic adds: the sequence id, the
signals of the sequence's previous drafted step (what a `previous_step` model was sent for
this step; empty before its first drafted step), the measured draft and verify seconds,
draft forwards, the sequence's history before the step (`prev_full`, `accept_ema`,
docs/design.md "Features") and the decision (source, model, version, arm, wait).

A γ = 0 step drafted nothing: its `acceptance_rate` and signal cells are empty and the
trainer skips it as a target, but it is recorded (its tokens and seconds are real work).

Two writers share the row format:
- `StepRecorder` appends to one file (`--log-steps FILE`, `speckv-eval log-steps`) and
  writes drafted steps only, as it always did;
- `RotatingStepRecorder` (`--record-steps DIR`) writes every step to rotating files, each
  complete or absent: rows go to a hidden temp file that is fsynced and linked to its final
  name `steps-<utc>-<pid>-<n>.csv` only when it is closed (size, age or shutdown). A failed
  write (full disk) drops that record, counts it and never raises into the engine.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from speckv_client.types import DraftSignals

if TYPE_CHECKING:
    from decode_worker.config import RecordConfig
    from decode_worker.engine import StepResult

log = logging.getLogger(__name__)

SEED_COLUMNS = (
    "compression",
    "gamma",
    "task",
    "step",
    "accepted",
    "acceptance_rate",
    "tokens_produced",
    "mean_draft_entropy",
    "mean_draft_confidence",
    "max_draft_entropy",
    "min_draft_confidence",
)
EXTRA_COLUMNS = (
    "sequence_id",
    "prev_mean_draft_entropy",
    "prev_mean_draft_confidence",
    "prev_max_draft_entropy",
    "prev_min_draft_confidence",
    "draft_seconds",
    "verify_seconds",
    "drafted",
    "prev_full",
    "accept_ema",
    "source",
    "model_name",
    "model_version",
    "arm",
    "decision_wait_seconds",
)
COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS

_EMPTY_SIGNALS = ["", "", "", ""]


@dataclass(frozen=True)
class StepRecord:
    """One step of one sequence as recorded: the engine's `StepResult` (the step's own
    numbers) plus what the sequence knew before the step."""

    sequence_id: str
    task: str
    compression: str
    result: StepResult
    # The signals of the sequence's latest drafted step before this one (None: none yet).
    prev_signals: DraftSignals | None
    # The sequence's history before this step (SequenceHistory.prev_full / accept_ema).
    prev_full: float
    accept_ema: float

    @property
    def gamma(self) -> int:
        return self.result.gamma

    def row(self) -> list[str]:
        r = self.result
        d = r.decision
        return [
            self.compression,
            str(r.gamma),
            self.task,
            str(r.step),
            str(r.accepted),
            _f(r.accepted / r.gamma) if r.gamma else "",
            str(len(r.token_ids)),
            *_signals(r.signals),
            self.sequence_id,
            *_signals(self.prev_signals),
            f"{r.draft_seconds:.6g}",
            f"{r.verify_seconds:.6g}",
            str(r.drafted),
            _f(self.prev_full),
            _f(self.accept_ema),
            d.source.value,
            d.model_name,
            str(d.model_version) if d.model_name else "",
            d.arm,
            f"{d.wait_seconds:.6g}",
        ]


def _signals(s: DraftSignals | None) -> list[str]:
    if s is None:
        return _EMPTY_SIGNALS
    return [
        _f(s.mean_draft_entropy),
        _f(s.mean_draft_confidence),
        _f(s.max_draft_entropy),
        _f(s.min_draft_confidence),
    ]


def _f(x: float) -> str:
    return f"{x:.6g}"


class StepSink(Protocol):
    """Where the engine sends step records (`StepRecorder`, `RotatingStepRecorder`)."""

    def write(self, record: StepRecord) -> None: ...

    def close(self) -> None: ...


class _CsvLog:
    """Appends rows to a CSV file with a fixed header (written once; an existing file must
    have the same header); safe across threads. `flush_each` flushes after every row."""

    def __init__(
        self, path: str | os.PathLike[str], columns: tuple[str, ...], kind: str, flush_each: bool
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with self.path.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != columns:
                raise ValueError(
                    f"{kind} log {self.path} exists with other columns ({header[:4]}...); "
                    "give a new file or move the old one away"
                )
        self._fh: TextIO = self.path.open("a", newline="")
        self._writer = csv.writer(self._fh)
        self._lock = threading.Lock()
        self._flush_each = flush_each
        if new:
            self._writer.writerow(columns)
            self._fh.flush()

    def _write_row(self, row: list[str]) -> None:
        with self._lock:
            self._writer.writerow(row)
            if self._flush_each:
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class StepRecorder(_CsvLog):
    """Appends step records of drafted steps (γ > 0) to one CSV file, flushed row by row
    (`--log-steps FILE`, `speckv-eval log-steps`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, COLUMNS, "step", flush_each=True)

    def write(self, record: StepRecord) -> None:
        if record.gamma > 0:
            self._write_row(record.row())


# --- rotating files (`--record-steps DIR`) ---

FINAL_PREFIX = "steps-"
# steps-<utc>-<pid>-<n>.csv; names sort by the time the file was opened.
FINAL_NAME = re.compile(r"^steps-\d{8}T\d{6}Z-\d+-\d{6,}\.csv$")
# .steps-<host>-<pid>-<n>.csv.tmp: hidden and not *.csv, so no reader takes it for records.
TEMP_NAME = re.compile(r"^\.steps-(?P<host>.*)-(?P<pid>\d+)-(?P<n>\d+)\.csv\.tmp$")
# One log line per this many seconds about dropped records.
DROP_LOG_INTERVAL_S = 60.0
# After a failed open or write, records are dropped without touching the disk for this long.
RETRY_AFTER_S = 1.0
# Temp files of other hosts untouched this long are removed: twice the largest
# --record-max-seconds (RecordConfig), after which their writer would have closed them.
OTHER_HOST_STALE_S = 2 * 86400.0

Opener = Callable[[str], int]


def _open_exclusive(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def complete_record_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The complete step-record files in `directory`, oldest first (temp files excluded)."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if FINAL_NAME.match(p.name) and p.is_file())


def _header_bytes() -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(COLUMNS)
    return buf.getvalue().encode()


_HEADER = _header_bytes()


@dataclass
class _OpenFile:
    fd: int
    temp: Path
    opened_utc: str
    opened_at: float  # monotonic
    size: int
    rows: int


class RotatingStepRecorder:
    """Writes every step record to rotating CSV files in `config.directory`.

    A file is written under a hidden temp name and becomes `steps-<utc>-<pid>-<n>.csv` —
    fsynced, then linked without replacing anything — only when it is closed: before a row
    would take it past `max_bytes`, once it is `max_seconds` old (a background timer, so an
    idle worker's records become readable too), and on `close()` (SIGTERM). Then the oldest
    complete files beyond `max_files` are deleted. Disk use is bounded by about
    `max_files × max_bytes` plus the open file.

    Nothing raises into the engine: a record that cannot be written (open, write or rename
    fails, e.g. a full disk) is dropped and counted (`dropped`, `on_drop`), logged at most
    once per `DROP_LOG_INTERVAL_S`, and for `RETRY_AFTER_S` after a failure records are
    dropped without touching the disk. A row is written with one `write` call; if it fails
    the file is truncated back to its last complete row (or abandoned, its rows counted as
    dropped, if even that fails).

    At start, temp files left by earlier processes of this host (a dead pid, or this pid:
    a restarted container) are deleted — their rows were never complete files, and a reader
    never sees them. Temp files of other hosts sharing the directory are deleted only once
    untouched for `OTHER_HOST_STALE_S` (their pod is gone). One recorder per directory per
    process: a second one would take the first's open file for a stale one.
    """

    def __init__(
        self,
        config: RecordConfig,
        *,
        on_drop: Callable[[int], None] | None = None,
        opener: Opener = _open_exclusive,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.directory = Path(config.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"--record-steps {self.directory}: cannot create the directory: {err}"
            ) from err
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise OSError(f"--record-steps {self.directory}: the directory is not writable")
        self._on_drop = on_drop
        self._opener = opener
        self._clock = clock
        self._host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._file: _OpenFile | None = None
        self._n = 0
        self._retry_at = 0.0
        self._closed = False
        # Counters (read without the lock; for metrics and tests).
        self.written = 0
        self.dropped = 0
        self.files_completed = 0
        self.files_deleted = 0
        self._drops_unlogged = 0
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        self._last_error = ""
        self.stale_removed = self._remove_stale_temps()
        self._stop = threading.Event()
        self._timer = threading.Thread(
            target=self._rotate_by_age, name="speckv-records", daemon=True
        )
        self._timer.start()

    # -- the engine's side

    def write(self, record: StepRecord) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerow(record.row())
        data = buf.getvalue().encode()
        done: _OpenFile | None = None
        with self._lock:
            if self._closed:
                self._drop_locked(1, "the recorder is closed")
                return
            now = self._clock()
            f = self._file
            if f is not None and (
                f.size + len(data) > self.config.max_bytes
                or now - f.opened_at >= self.config.max_seconds
            ):
                done, self._file = f, None
            self._append_locked(data, now)
        if done is not None:
            self._finish(done)

    def close(self) -> None:
        """Close the open file (it becomes a complete file) and stop the timer; later
        writes are dropped. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            done, self._file = self._file, None
        self._stop.set()
        if done is not None:
            self._finish(done)
        if threading.current_thread() is not self._timer:
            self._timer.join(5.0)
        with self._lock:
            self._log_drops_locked(force=True)

    def rotate(self) -> None:
        """Close the open file now (it becomes readable); the next record opens a new one."""
        with self._lock:
            done, self._file = self._file, None
        if done is not None:
            self._finish(done)

    # -- internals

    def _append_locked(self, data: bytes, now: float) -> None:
        if now < self._retry_at:
            self._drop_locked(1, self._last_error or "an earlier write failed")
            return
        f = self._file
        if f is None:
            f = self._open_locked(now)
            if f is None:
                return
        try:
            written = os.write(f.fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as err:
            self._retry_at = now + RETRY_AFTER_S
            self._drop_locked(1, f"write to {f.temp.name} failed: {err}")
            try:
                os.ftruncate(f.fd, f.size)  # drop any part of the row that reached the file
            except OSError:
                self._file = None
                self._abandon_locked(f)
            return
        f.size += len(data)
        f.rows += 1
        self.written += 1

    def _open_locked(self, now: float) -> _OpenFile | None:
        self._n += 1
        temp = self.directory / f".steps-{self._host}-{self._pid}-{self._n}.csv.tmp"
        fd = -1
        try:
            fd = self._opener(str(temp))
            written = os.write(fd, _HEADER)
            if written != len(_HEADER):
                raise OSError(f"short write ({written} of {len(_HEADER)} bytes)")
        except OSError as err:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            self._retry_at = now + RETRY_AFTER_S
            self._drop_locked(1, f"cannot start a record file in {self.directory}: {err}")
            return None
        utc = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._file = _OpenFile(fd, temp, utc, now, len(_HEADER), 0)
        return self._file

    def _finish(self, f: _OpenFile) -> None:
        """fsync, close and publish a file under its final name; then apply max_files.
        Runs outside the lock (the fsync must not stall other sequences' steps)."""
        if f.rows == 0:
            self._abandon(f)
            return
        try:
            os.fsync(f.fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.close(f.fd)
            self._lost(f, f"fsync of {f.temp.name} failed: {err}")
            return
        os.close(f.fd)
        n = int(TEMP_NAME.match(f.temp.name).group("n"))  # type: ignore[union-attr]
        while True:
            final = self.directory / f"{FINAL_PREFIX}{f.opened_utc}-{self._pid}-{n:06d}.csv"
            try:
                published = _publish(f.temp, final)
            except OSError as err:
                self._lost(f, f"publishing {final.name} failed: {err}")
                return
            if published:
                break
            n += 1_000_000  # the name is taken (another process with our pid shares DIR)
        with self._lock:
            self.files_completed += 1
        self._prune()

    def _lost(self, f: _OpenFile, why: str) -> None:
        with contextlib.suppress(OSError):
            f.temp.unlink()
        with self._lock:
            self.written -= f.rows
            self._drop_locked(f.rows, why)

    def _abandon(self, f: _OpenFile) -> None:
        with self._lock:
            self._abandon_locked(f)

    def _abandon_locked(self, f: _OpenFile) -> None:
        with contextlib.suppress(OSError):
            os.close(f.fd)
        with contextlib.suppress(OSError):
            f.temp.unlink()
        if f.rows:
            self.written -= f.rows
            self._drop_locked(f.rows, f"abandoned {f.temp.name} after a failed write")

    def _prune(self) -> None:
        try:
            files = complete_record_files(self.directory)
        except OSError as err:
            log.warning("step records: cannot list %s: %s", self.directory, err)
            return
        for old in files[: max(0, len(files) - self.config.max_files)]:
            try:
                old.unlink()
            except FileNotFoundError:
                continue  # another worker sharing the directory deleted it first
            except OSError as err:
                log.warning("step records: cannot delete %s: %s", old, err)
                continue
            with self._lock:
                self.files_deleted += 1

    def _drop_locked(self, n: int, why: str) -> None:
        if n <= 0:
            return
        self.dropped += n
        self._drops_unlogged += n
        self._last_error = why
        if self._on_drop is not None:
            self._on_drop(n)
        self._log_drops_locked(force=False)

    def _log_drops_locked(self, force: bool) -> None:
        now = self._clock()
        if self._drops_unlogged and (force or now - self._last_drop_log >= DROP_LOG_INTERVAL_S):
            log.warning(
                "step records: dropped %d record(s) (%d in all) in %s: %s",
                self._drops_unlogged,
                self.dropped,
                self.directory,
                self._last_error,
            )
            self._drops_unlogged = 0
            self._last_drop_log = now

    def _rotate_by_age(self) -> None:
        period = min(1.0, self.config.max_seconds / 4)
        while not self._stop.wait(period):
            with self._lock:
                f = self._file
                if f is None or self._clock() - f.opened_at < self.config.max_seconds:
                    self._log_drops_locked(force=False)
                    continue
                self._file = None
            self._finish(f)

    def _remove_stale_temps(self) -> int:
        removed = 0
        now = time.time()
        for p in self.directory.iterdir():
            m = TEMP_NAME.match(p.name)
            if m is None:
                continue
            if m.group("host") != self._host:
                # Another host's (pod's) file: its writer may be alive; one untouched for
                # longer than any writer keeps a file open is not (its pod is gone).
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime < OTHER_HOST_STALE_S:
                        continue
            elif int(m.group("pid")) != self._pid and _alive(int(m.group("pid"))):
                continue
            with contextlib.suppress(OSError):
                size = p.stat().st_size
                p.unlink()
                removed += 1
                log.warning(
                    "step records: removed %s (%d bytes) left by a process that did not "
                    "close it (its records never became a complete file)",
                    p.name,
                    size,
                )
        return removed


# link() errors meaning "this filesystem has no hard links": publish with rename() instead.
_NO_LINKS = (errno.EPERM, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EMLINK)


def _publish(temp: Path, final: Path) -> bool:
    """Give the complete file `temp` the name `final` without replacing an existing file;
    False if `final` exists. link() is atomic and never replaces; where the filesystem has
    no hard links, rename() after an existence check (good enough for one writer per pid)."""
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        if final.exists():
            return False
        os.rename(temp, final)
        return True
    with contextlib.suppress(OSError):
        temp.unlink()
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# One row per drafted token whose agreement with the target is known: the training data
# of `draft_plan` models (docs/design.md, "Draft plans"). `agreed` is 1 for a token the
# target kept, 0 for the first one it rejected, and for the first drafted token past the
# verified ones (a stop rule's probe) whether it equals the target's token. Features are
# the token's (match_length, draft_confidence, draft_entropy) and the sequence's history
# before the step (prev_full, accept_ema).
TOKEN_COLUMNS = (
    "sequence_id",
    "task",
    "compression",
    "step",
    "position",
    "gamma",
    "drafted",
    "match_length",
    "draft_confidence",
    "draft_entropy",
    "prev_full",
    "accept_ema",
    "agreed",
)


@dataclass(frozen=True)
class TokenRecord:
    sequence_id: str
    task: str
    compression: str
    step: int
    position: int  # 1-based place in the step's draft
    gamma: int  # tokens verified this step
    drafted: int  # tokens drafted this step
    match_length: int
    draft_confidence: float
    draft_entropy: float
    prev_full: float
    accept_ema: float
    agreed: int

    def row(self) -> list[str]:
        return [
            self.sequence_id,
            self.task,
            self.compression,
            str(self.step),
            str(self.position),
            str(self.gamma),
            str(self.drafted),
            str(self.match_length),
            _f(self.draft_confidence),
            _f(self.draft_entropy),
            _f(self.prev_full),
            _f(self.accept_ema),
            str(self.agreed),
        ]


class TokenRecorder(_CsvLog):
    """Appends token records to a CSV file (buffered: many rows a step)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, TOKEN_COLUMNS, "token", flush_each=False)

    def write(self, record: TokenRecord) -> None:
        self._write_row(record.row())
