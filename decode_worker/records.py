"""Optional step-record log: the seed's CSV schema plus what live traffic adds.

The first eleven columns are exactly `phase2_step_results.csv`'s, so the foundation's
`speckv-predictor train` reads the file as it reads the seed's; the extra columns are the
sequence id, the previous step's signals (for `previous_step` models; empty on a
sequence's first drafted step) and the measured draft and verify seconds. Steps with
gamma 0 drafted nothing and have no signals, so they are not written.
"""

from __future__ import annotations

import csv
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from speckv_client.types import DraftSignals

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
)
COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS


@dataclass(frozen=True)
class StepRecord:
    sequence_id: str
    task: str
    compression: str
    step: int
    gamma: int
    accepted: int
    tokens_produced: int
    signals: DraftSignals
    prev_signals: DraftSignals | None
    draft_seconds: float
    verify_seconds: float

    def row(self) -> list[str]:
        s, p = self.signals, self.prev_signals
        prev = (
            ["", "", "", ""]
            if p is None
            else [
                _f(p.mean_draft_entropy),
                _f(p.mean_draft_confidence),
                _f(p.max_draft_entropy),
                _f(p.min_draft_confidence),
            ]
        )
        return [
            self.compression,
            str(self.gamma),
            self.task,
            str(self.step),
            str(self.accepted),
            _f(self.accepted / self.gamma),
            str(self.tokens_produced),
            _f(s.mean_draft_entropy),
            _f(s.mean_draft_confidence),
            _f(s.max_draft_entropy),
            _f(s.min_draft_confidence),
            self.sequence_id,
            *prev,
            f"{self.draft_seconds:.6g}",
            f"{self.verify_seconds:.6g}",
        ]


def _f(x: float) -> str:
    return f"{x:.6g}"


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
    """Appends step records (gamma > 0) to a CSV file, flushed row by row."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, COLUMNS, "step", flush_each=True)

    def write(self, record: StepRecord) -> None:
        if record.gamma > 0:
            self._write_row(record.row())


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
