"""Read and validate step records in the seed's CSV schema (phase2_step_results.csv).

Training must refuse bad data before it writes anything, and say exactly where the data is
wrong: every error names the column and the 1-based CSV line (line 1 is the header). Extra
columns (the worker's `sequence_id`, `prev_*`, timings) are tolerated and ignored, except
`sequence_id`, which, when present, defines the runs.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor_service.manifest import (
    COMPRESSION_ENCODING,
    DRAFT_SIGNALS,
    FEATURES_BY_WINDOW,
    WINDOW_PREVIOUS_STEP,
    WINDOW_SAME_STEP,
)

REQUIRED_COLUMNS = ("compression", "gamma", "task", "step", "acceptance_rate", *DRAFT_SIGNALS)
SEQUENCE_ID_COLUMN = "sequence_id"


class DataError(ValueError):
    """Step records that cannot be trained on; the message names the file, column and line."""


@dataclass(frozen=True)
class StepRecords:
    """Validated step records, one entry per CSV data row, in file order."""

    path: Path
    sha256: str
    compression: np.ndarray  # [N] str
    task: np.ndarray  # [N] str
    step: np.ndarray  # [N] int64
    gamma: np.ndarray  # [N] int64
    acceptance_rate: np.ndarray  # [N] float64
    signals: np.ndarray  # [N, 4] float64, DRAFT_SIGNALS order
    run_id: np.ndarray  # [N] int64, 0..n_runs-1
    csv_line: np.ndarray  # [N] int64, 1-based line in the CSV
    runs_from: str  # "step_0" or "sequence_id": how runs were delimited

    @property
    def rows(self) -> int:
        return int(self.step.shape[0])

    @property
    def n_runs(self) -> int:
        return int(np.unique(self.run_id).size)

    @property
    def comp_enc(self) -> np.ndarray:  # [N] int64
        return np.array([COMPRESSION_ENCODING[c] for c in self.compression], dtype=np.int64)


@dataclass(frozen=True)
class WindowedData:
    """Model inputs for one decision window; row i came from record `record_index[i]`."""

    window: str
    feature_names: tuple[str, ...]
    x: np.ndarray  # [M, 6] float64
    y: np.ndarray  # [M] float64, this step's acceptance rate
    run_id: np.ndarray  # [M]
    strata: np.ndarray  # [M] str, compression + "_" + task (the seed's stratify key)
    record_index: np.ndarray  # [M] indices into StepRecords


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_step_records(path: str | Path) -> StepRecords:
    """Parse and validate a step CSV; raise `DataError` naming column and line on bad data."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; pass --data with a step CSV in the seed's schema")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise DataError(f"{p}: the file is empty; expected a header with {REQUIRED_COLUMNS}")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{p}: missing column {missing[0]!r} (line 1, the header); a step CSV needs "
                f"{', '.join(REQUIRED_COLUMNS)}"
            )
        has_seq = SEQUENCE_ID_COLUMN in header
        comp: list[str] = []
        task: list[str] = []
        step: list[int] = []
        gamma: list[int] = []
        acc: list[float] = []
        sig: list[list[float]] = []
        seq: list[str] = []
        lines: list[int] = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{p}: line {line} has more fields than the header")

            def cell(col: str, line: int = line, row: dict[str, str] = row) -> str:
                v = row.get(col)
                if v is None:
                    raise DataError(f"{p}: column {col!r}, line {line}: the value is missing")
                return v.strip()

            c = cell("compression")
            if c not in COMPRESSION_ENCODING:
                raise DataError(
                    f"{p}: column 'compression', line {line}: unknown compression {c!r}; "
                    f"expected one of {sorted(COMPRESSION_ENCODING)}"
                )
            comp.append(c)
            task.append(cell("task"))
            step.append(_integer(p, "step", line, cell("step"), minimum=0))
            gamma.append(_integer(p, "gamma", line, cell("gamma"), minimum=1))
            a = _number(p, "acceptance_rate", line, cell("acceptance_rate"))
            if not 0.0 <= a <= 1.0:
                raise DataError(
                    f"{p}: column 'acceptance_rate', line {line}: {a} is outside [0, 1]"
                )
            acc.append(a)
            sig.append([_number(p, s, line, cell(s)) for s in DRAFT_SIGNALS])
            if has_seq:
                s_id = cell(SEQUENCE_ID_COLUMN)
                if not s_id:
                    raise DataError(
                        f"{p}: column {SEQUENCE_ID_COLUMN!r}, line {line}: empty sequence id"
                    )
                seq.append(s_id)
            lines.append(line)
    if not lines:
        raise DataError(f"{p}: no data rows after the header; nothing to train on")
    step_arr = np.asarray(step, dtype=np.int64)
    line_arr = np.asarray(lines, dtype=np.int64)
    if has_seq:
        run_id = _runs_from_sequence_id(p, seq, step_arr, line_arr)
    else:
        run_id = _runs_from_step_zero(p, step_arr, line_arr)
    return StepRecords(
        path=p,
        sha256=file_sha256(p),
        compression=np.asarray(comp, dtype=object),
        task=np.asarray(task, dtype=object),
        step=step_arr,
        gamma=np.asarray(gamma, dtype=np.int64),
        acceptance_rate=np.asarray(acc, dtype=np.float64),
        signals=np.asarray(sig, dtype=np.float64).reshape(len(lines), len(DRAFT_SIGNALS)),
        run_id=run_id,
        csv_line=line_arr,
        runs_from=SEQUENCE_ID_COLUMN if has_seq else "step_0",
    )


def _runs_from_step_zero(p: Path, step: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The seed's runs: consecutive rows, each run starting at step 0 and counting up by 1."""
    for i in range(step.size):
        expected_first = i == 0
        if expected_first and step[i] != 0:
            raise DataError(
                f"{p}: column 'step', line {lines[i]}: the first record has step {step[i]}; "
                "a run is consecutive rows starting at step 0"
            )
        if i > 0 and step[i] != 0 and step[i] != step[i - 1] + 1:
            raise DataError(
                f"{p}: column 'step', line {lines[i]}: step {step[i]} follows step "
                f"{step[i - 1]}; a run is consecutive rows starting at step 0 (add a "
                f"{SEQUENCE_ID_COLUMN!r} column if runs are interleaved)"
            )
    return np.cumsum(step == 0).astype(np.int64) - 1


def _runs_from_sequence_id(
    p: Path, seq: list[str], step: np.ndarray, lines: np.ndarray
) -> np.ndarray:
    """Worker logs: a run is every row with one `sequence_id`; steps in it must be unique."""
    ids: dict[str, int] = {}
    run = np.empty(len(seq), dtype=np.int64)
    seen: set[tuple[int, int]] = set()
    for i, s in enumerate(seq):
        r = ids.setdefault(s, len(ids))
        key = (r, int(step[i]))
        if key in seen:
            raise DataError(
                f"{p}: column 'step', line {lines[i]}: step {step[i]} appears twice for "
                f"{SEQUENCE_ID_COLUMN} {s!r}"
            )
        seen.add(key)
        run[i] = r
    return run


def _number(p: Path, col: str, line: int, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{p}: column {col!r}, line {line}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(
            f"{p}: column {col!r}, line {line}: {text!r} is not a finite number (NaN/inf)"
        )
    return v


def _integer(p: Path, col: str, line: int, text: str, minimum: int) -> int:
    v = _number(p, col, line, text)
    if v != int(v) or v < minimum:
        raise DataError(
            f"{p}: column {col!r}, line {line}: {text!r} must be an integer >= {minimum}"
        )
    return int(v)


def window_data(records: StepRecords, window: str) -> WindowedData:
    """Build model inputs for `window` (features in the manifest's order).

    `same_step`: this step's four signals, comp_enc, gamma -> this step's acceptance rate.
    `previous_step`: the previous step's (step - 1, same run) four signals, this step's
    comp_enc and gamma -> this step's acceptance rate; steps without a previous step in their
    run (each run's first) are dropped.
    """
    comp_enc = records.comp_enc.astype(np.float64)
    gamma = records.gamma.astype(np.float64)
    if window == WINDOW_SAME_STEP:
        idx = np.arange(records.rows)
        sig = records.signals[idx]
    elif window == WINDOW_PREVIOUS_STEP:
        where = {
            (int(r), int(s)): i
            for i, (r, s) in enumerate(zip(records.run_id, records.step, strict=True))
        }
        pairs = [
            (i, where[(int(r), int(s) - 1)])
            for i, (r, s) in enumerate(zip(records.run_id, records.step, strict=True))
            if (int(r), int(s) - 1) in where
        ]
        if not pairs:
            raise DataError(
                f"{records.path}: no step has a previous step in its run, so there is nothing "
                "to train a previous_step model on"
            )
        idx = np.asarray([i for i, _ in pairs], dtype=np.int64)
        prev = np.asarray([j for _, j in pairs], dtype=np.int64)
        sig = records.signals[prev]
    else:
        raise ValueError(f"unknown window {window!r}; expected one of {tuple(FEATURES_BY_WINDOW)}")
    x = np.column_stack([sig, comp_enc[idx], gamma[idx]])
    strata = np.asarray(
        [f"{c}_{t}" for c, t in zip(records.compression[idx], records.task[idx], strict=True)],
        dtype=object,
    )
    return WindowedData(
        window=window,
        feature_names=FEATURES_BY_WINDOW[window],
        x=x,
        y=records.acceptance_rate[idx],
        run_id=records.run_id[idx],
        strata=strata,
        record_index=idx,
    )
