"""The one training/data protocol: loader, previous-step join, held-out folds, MLP factory.

Both `speckv-predictor train` (predictor_service/training.py, plan_training.py) and
`speckv-eval paper` (speckv_eval/paper_data.py, paper.py) use these functions, so a step
record means the same thing, a "previous step" is the same step and "held out" keeps the
same rows out of training in both (docs/training.md, "The protocol").

Step records in the seed's CSV schema (phase2_step_results.csv): training must refuse bad
data before it writes anything, and say exactly where the data is wrong: every error names
the file, the column and the 1-based CSV line (line 1 is the header). Extra columns (the
worker's timings, decision, history) are tolerated and ignored, except:
- `sequence_id`, which, when present, defines the runs (across files: a sequence's records
  may span two files of a worker's `--record-steps` directory);
- `prev_mean_draft_entropy`, `prev_mean_draft_confidence`, `prev_max_draft_entropy`,
  `prev_min_draft_confidence` (all four): the signals of the sequence's previous *drafted*
  step, exactly what the worker sent a `previous_step` model for this step. When present
  they are the `previous_step` features; without them (the seed's file) the previous step is
  found by joining step - 1 of the same run;
- `accepted`, `tokens_produced` (the seed's and the worker's): kept when present, for the
  paper's judge of observed outcomes.

A path may be a directory: every `*.csv` file in it (not hidden), sorted by name, read as
one data set — the worker's `--record-steps DIR` (its files being written are hidden temp
files and never read). Rows with gamma 0 (a step that drafted nothing: no signals, no
acceptance) are skipped.
"""

from __future__ import annotations

import csv
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from speckv.vocabulary import COMP_ENC as COMPRESSION_ENCODING
from speckv.vocabulary import (
    DRAFT_SIGNALS,
    FEATURES_BY_WINDOW,
    WINDOW_PREVIOUS_STEP,
    WINDOW_SAME_STEP,
)

from predictor_service.manifest import SplitMetrics

REQUIRED_COLUMNS = ("compression", "gamma", "task", "step", "acceptance_rate", *DRAFT_SIGNALS)
SEQUENCE_ID_COLUMN = "sequence_id"
PREV_COLUMNS = tuple(f"prev_{s}" for s in DRAFT_SIGNALS)
OUTCOME_COLUMNS = ("accepted", "tokens_produced")  # kept when every file has them


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
    # [N, 4] float64, the previous drafted step's signals (NaN: none before it), when the
    # data has the four PREV_COLUMNS; None otherwise (previous_step then joins step - 1).
    prev_signals: np.ndarray | None = None
    files: tuple[Path, ...] = ()  # the CSV files read, in order
    file_index: np.ndarray | None = None  # [N] int64 index into `files`
    skipped_undrafted: int = 0  # gamma-0 rows skipped
    accepted: np.ndarray | None = None  # [N] int64 drafted tokens accepted, when present
    tokens_produced: np.ndarray | None = None  # [N] int64, when present

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


def step_record_files(path: str | Path) -> list[Path]:
    """The CSV files `path` names: itself, or every `*.csv` in a directory (sorted by name,
    hidden files excluded: the worker writes records under hidden temp names first)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".csv" and not f.name.startswith("."))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(
                f"{p}: no step-record files (*.csv) in this directory; a worker started with "
                f"`speckv-worker serve --record-steps {p}` writes them (a file appears once it "
                "is complete: at --record-max-bytes, --record-max-seconds or shutdown)"
            )
        return files
    if not p.is_file():
        raise DataError(
            f"{p}: no such file or directory; pass --data with a step CSV in the seed's "
            "schema or a directory of the worker's step records"
        )
    return [p]


@dataclass
class _FileRows:
    has_seq: bool
    has_prev: bool
    has_outcome: bool
    comp: list[str]
    task: list[str]
    step: list[int]
    gamma: list[int]
    acc: list[float]
    sig: list[list[float]]
    prev: list[list[float]]
    seq: list[str]
    lines: list[int]
    skipped: int
    outcome: list[tuple[int, int]]


_NAN4 = [math.nan] * 4


def _read_file(p: Path) -> _FileRows:
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
        has_prev = all(c in header for c in PREV_COLUMNS)
        has_outcome = all(c in header for c in OUTCOME_COLUMNS)
        out = _FileRows(has_seq, has_prev, has_outcome, [], [], [], [], [], [], [], [], [], 0, [])
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{p}: line {line} has more fields than the header")

            def cell(col: str, line: int = line, row: dict[str, str] = row) -> str:
                v = row.get(col)
                if v is None:
                    raise DataError(f"{p}: column {col!r}, line {line}: the value is missing")
                return v.strip()

            g = _integer(p, "gamma", line, cell("gamma"), minimum=0)
            if g == 0:  # drafted nothing: no signals, no acceptance to learn
                out.skipped += 1
                continue
            c = cell("compression")
            if c not in COMPRESSION_ENCODING:
                raise DataError(
                    f"{p}: column 'compression', line {line}: unknown compression {c!r}; "
                    f"expected one of {sorted(COMPRESSION_ENCODING)}"
                )
            out.comp.append(c)
            out.task.append(cell("task"))
            out.step.append(_integer(p, "step", line, cell("step"), minimum=0))
            out.gamma.append(g)
            a = _number(p, "acceptance_rate", line, cell("acceptance_rate"))
            if not 0.0 <= a <= 1.0:
                raise DataError(
                    f"{p}: column 'acceptance_rate', line {line}: {a} is outside [0, 1]"
                )
            out.acc.append(a)
            out.sig.append([_number(p, s, line, cell(s)) for s in DRAFT_SIGNALS])
            if has_outcome:
                out.outcome.append(
                    (
                        _integer(p, "accepted", line, cell("accepted"), minimum=0),
                        _integer(p, "tokens_produced", line, cell("tokens_produced"), minimum=0),
                    )
                )
            if has_prev:
                texts = [cell(col) for col in PREV_COLUMNS]
                if not any(texts):
                    out.prev.append(_NAN4)
                elif all(texts):
                    out.prev.append(
                        [
                            _number(p, col, line, t)
                            for col, t in zip(PREV_COLUMNS, texts, strict=True)
                        ]
                    )
                else:
                    col = PREV_COLUMNS[texts.index("")]
                    raise DataError(
                        f"{p}: column {col!r}, line {line}: empty while other prev_* columns "
                        "are set; the four are all empty (no drafted step before) or all set"
                    )
            if has_seq:
                s_id = cell(SEQUENCE_ID_COLUMN)
                if not s_id:
                    raise DataError(
                        f"{p}: column {SEQUENCE_ID_COLUMN!r}, line {line}: empty sequence id"
                    )
                out.seq.append(s_id)
            out.lines.append(line)
    return out


def read_step_records(path: str | Path) -> StepRecords:
    """Parse and validate a step CSV, or every step CSV of a directory as one data set;
    raise `DataError` naming file, column and line on bad data."""
    p = Path(path)
    files = step_record_files(p)
    parts = [_read_file(f) for f in files]
    for f, part in zip(files, parts, strict=True):
        if part.has_seq != parts[0].has_seq:
            raise DataError(
                f"{f}: has{'' if part.has_seq else ' no'} {SEQUENCE_ID_COLUMN!r} column but "
                f"{files[0]} has{'' if parts[0].has_seq else ' no'}; the files of one data set "
                "must share the schema"
            )
    has_seq = parts[0].has_seq
    has_prev = all(part.has_prev for part in parts)
    lines = [x for part in parts for x in part.lines]
    skipped = sum(part.skipped for part in parts)
    if not lines:
        what = f"{p}" if len(files) == 1 else f"{p} ({len(files)} files)"
        extra = f" ({skipped} rows with gamma 0 are skipped)" if skipped else ""
        raise DataError(f"{what}: no data rows after the header{extra}; nothing to train on")
    step_arr = np.asarray([x for part in parts for x in part.step], dtype=np.int64)
    line_arr = np.asarray(lines, dtype=np.int64)
    file_arr = np.concatenate(
        [np.full(len(part.lines), i, dtype=np.int64) for i, part in enumerate(parts)]
    )
    if has_seq:
        seq = [x for part in parts for x in part.seq]
        # With the prev_* columns no step is joined to another, so a sequence id that two
        # requests shared (ids come from clients) only merges them into one run.
        run_id = _runs_from_sequence_id(files, file_arr, seq, step_arr, line_arr, not has_prev)
    else:
        run_id = _runs_from_step_zero(files, file_arr, step_arr, line_arr)
    n = len(lines)
    prev = None
    if has_prev:
        prev = np.asarray([x for part in parts for x in part.prev], dtype=np.float64)
        prev = prev.reshape(n, len(DRAFT_SIGNALS))
    outcome = None
    if all(part.has_outcome for part in parts):
        outcome = np.asarray([x for part in parts for x in part.outcome], dtype=np.int64)
        outcome = outcome.reshape(n, len(OUTCOME_COLUMNS))
    return StepRecords(
        path=p,
        sha256=file_sha256(files[0]) if len(files) == 1 and files[0] == p else files_sha256(files),
        compression=np.asarray([x for part in parts for x in part.comp], dtype=object),
        task=np.asarray([x for part in parts for x in part.task], dtype=object),
        step=step_arr,
        gamma=np.asarray([x for part in parts for x in part.gamma], dtype=np.int64),
        acceptance_rate=np.asarray([x for part in parts for x in part.acc], dtype=np.float64),
        signals=np.asarray([x for part in parts for x in part.sig], dtype=np.float64).reshape(
            n, len(DRAFT_SIGNALS)
        ),
        run_id=run_id,
        csv_line=line_arr,
        runs_from=SEQUENCE_ID_COLUMN if has_seq else "step_0",
        prev_signals=prev,
        files=tuple(files),
        file_index=file_arr,
        skipped_undrafted=skipped,
        accepted=None if outcome is None else outcome[:, 0],
        tokens_produced=None if outcome is None else outcome[:, 1],
    )


def files_sha256(files: list[Path]) -> str:
    """One digest of a data set of several files: over each file's name and digest."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {file_sha256(f)}\n".encode())
    return h.hexdigest()


def _runs_from_step_zero(
    files: list[Path], file_idx: np.ndarray, step: np.ndarray, lines: np.ndarray
) -> np.ndarray:
    """The seed's runs: consecutive rows of a file, each run starting at step 0 and counting
    up by 1."""
    for i in range(step.size):
        p = files[int(file_idx[i])]
        first_of_file = i == 0 or file_idx[i] != file_idx[i - 1]
        if first_of_file and step[i] != 0:
            raise DataError(
                f"{p}: column 'step', line {lines[i]}: the first record has step {step[i]}; "
                "a run is consecutive rows starting at step 0"
            )
        if not first_of_file and step[i] != 0 and step[i] != step[i - 1] + 1:
            raise DataError(
                f"{p}: column 'step', line {lines[i]}: step {step[i]} follows step "
                f"{step[i - 1]}; a run is consecutive rows starting at step 0 (add a "
                f"{SEQUENCE_ID_COLUMN!r} column if runs are interleaved)"
            )
    return np.cumsum(step == 0).astype(np.int64) - 1


def _runs_from_sequence_id(
    files: list[Path],
    file_idx: np.ndarray,
    seq: list[str],
    step: np.ndarray,
    lines: np.ndarray,
    unique_steps: bool,
) -> np.ndarray:
    """Worker logs: a run is every row with one `sequence_id`; with `unique_steps` (the
    previous step is found by joining step - 1) a step may appear once per run."""
    ids: dict[str, int] = {}
    run = np.empty(len(seq), dtype=np.int64)
    seen: set[tuple[int, int]] = set()
    for i, s in enumerate(seq):
        r = ids.setdefault(s, len(ids))
        if unique_steps:
            key = (r, int(step[i]))
            if key in seen:
                raise DataError(
                    f"{files[int(file_idx[i])]}: column 'step', line {lines[i]}: step "
                    f"{step[i]} appears twice for {SEQUENCE_ID_COLUMN} {s!r}"
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


def previous_signals(records: StepRecords) -> np.ndarray:
    """The previous-step join: [N, 4] signals of each record's previous drafted step (NaN where
    there is none, e.g. a run's first step), in DRAFT_SIGNALS order.

    With the records' `prev_*` columns those are the signals the worker sent for this step
    (its latest drafted step's, even across gamma-0 steps); without them (the seed), the
    signals of step - 1 of the same run.
    """
    if records.prev_signals is not None:
        return records.prev_signals
    where = {
        (int(r), int(s)): i
        for i, (r, s) in enumerate(zip(records.run_id, records.step, strict=True))
    }
    out = np.full((records.rows, len(DRAFT_SIGNALS)), np.nan)
    for i, (r, s) in enumerate(zip(records.run_id, records.step, strict=True)):
        j = where.get((int(r), int(s) - 1))
        if j is not None:
            out[i] = records.signals[j]
    return out


def window_data(records: StepRecords, window: str) -> WindowedData:
    """Build model inputs for `window` (features in the manifest's order).

    `same_step`: this step's four signals, comp_enc, gamma -> this step's acceptance rate.
    `previous_step`: the previous drafted step's four signals (`previous_signals`), this
    step's comp_enc and gamma -> this step's acceptance rate. Steps without a previous
    drafted step (each run's first) are dropped.
    """
    comp_enc = records.comp_enc.astype(np.float64)
    gamma = records.gamma.astype(np.float64)
    if window == WINDOW_SAME_STEP:
        idx = np.arange(records.rows)
        sig = records.signals[idx]
    elif window == WINDOW_PREVIOUS_STEP:
        prev = previous_signals(records)
        idx = np.flatnonzero(~np.isnan(prev).any(axis=1))
        if idx.size == 0:
            raise DataError(
                f"{records.path}: no step has a previous drafted step in its run (a run's "
                "first step has none; with prev_* columns, every prev_* cell is empty), so "
                "there is nothing to train a previous_step model on"
            )
        sig = prev[idx]
    else:
        raise ValueError(f"unknown window {window!r}; expected one of {tuple(FEATURES_BY_WINDOW)}")
    x = np.column_stack([sig, comp_enc[idx], gamma[idx]])
    return WindowedData(
        window=window,
        feature_names=FEATURES_BY_WINDOW[window],
        x=x,
        y=records.acceptance_rate[idx],
        run_id=records.run_id[idx],
        strata=strata_of(records.compression[idx], records.task[idx]),
        record_index=idx,
    )


def strata_of(compression: Any, task: Any) -> np.ndarray:
    """The seed's stratify key per row: compression + "_" + task."""
    return np.asarray(
        [f"{c}_{t}" for c, t in zip(compression, task, strict=True)],
        dtype=object,
    )


# ---------------------------------------------------------------- splits and folds

SPLIT_RANDOM_STATE = 42  # the seed's split; fixed so metrics stay comparable across --seed
TEST_SIZE = 0.2
HELDOUT_FOLDS = 5  # one fold of 5 = 20% of the groups held out

HeldOutAssignment = Literal["stratified", "index_mod", "balanced"]


def seed_split(strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seed's split of rows (not a held-out one: steps of a run fall on both sides):
    `train_test_split(test_size=0.2, random_state=42, stratify=compression_task)`.
    Returns sorted-as-sklearn-returns (train, test) row indices."""
    from sklearn.model_selection import train_test_split

    labels, counts = np.unique(strata, return_counts=True)
    if counts.min() < 2:
        raise DataError(
            f"stratum {labels[counts.argmin()]!r} (compression_task) has only {counts.min()} "
            "record; the seed's stratified split needs at least 2 per stratum"
        )
    idx = np.arange(len(strata))
    try:
        tr, te = train_test_split(
            idx, test_size=TEST_SIZE, random_state=SPLIT_RANDOM_STATE, stratify=strata
        )
    except ValueError as e:
        raise DataError(f"the seed's stratified 80/20 split is impossible on this data: {e}") from e
    return tr, te


def heldout_folds(
    groups: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    n_folds: int = HELDOUT_FOLDS,
    assignment: HeldOutAssignment = "stratified",
) -> np.ndarray:
    """The held-out definition: the fold (0..n_folds-1) of every row, such that all rows of
    one group (a run, a sequence, a prompt) share a fold. Fold k held out = train on the
    rows whose fold is not k; no group is on both sides.

    `assignment` (how groups are dealt to folds; the definition above is the same):
    - "stratified" (`speckv-predictor train`, groups = runs): `StratifiedGroupKFold(
      n_folds, shuffle=True, random_state=42)` with classes = `strata` (compression_task),
      so each fold is about 1/n_folds of the groups, balanced over compression and task;
    - "index_mod" (`speckv-eval paper`, groups = the seed's prompt index 0..4 within its
      task): fold = group mod n_folds, so fold k holds out the k-th prompt of every task —
      the folds the honest ladder in docs/results.md was measured with;
    - "balanced" (the draft_plan model, groups = prompt ids): `GroupKFold(n_folds)`,
      groups dealt by size, no shuffling.
    """
    groups = np.asarray(groups)
    n_groups = np.unique(groups).size
    if n_groups < n_folds:
        raise DataError(
            f"held-out metrics need at least {n_folds} groups (runs or prompts), the data has "
            f"{n_groups}; add runs or skip that evaluation"
        )
    if assignment == "index_mod":
        return (groups.astype(np.int64) % n_folds).astype(np.int64)
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    fold = np.full(groups.shape[0], -1, dtype=np.int64)
    x = np.zeros((groups.shape[0], 1))
    if assignment == "stratified":
        if strata is None:
            raise ValueError("the 'stratified' assignment needs strata")
        folds = StratifiedGroupKFold(
            n_splits=n_folds, shuffle=True, random_state=SPLIT_RANDOM_STATE
        )
        with warnings.catch_warnings():
            # It warns when a stratum has fewer groups than folds; the split is still by group.
            warnings.simplefilter("ignore", UserWarning)
            splits = list(folds.split(x, strata, groups=groups))
    elif assignment == "balanced":
        splits = list(GroupKFold(n_splits=n_folds).split(x, groups=groups))
    else:
        raise ValueError(f"unknown held-out assignment {assignment!r}")
    for k, (_, te) in enumerate(splits):
        fold[te] = k
    return fold


def heldout_split(
    groups: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    fold: int = 0,
    n_folds: int = HELDOUT_FOLDS,
    assignment: HeldOutAssignment = "stratified",
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices with fold `fold` of `heldout_folds` held out."""
    f = heldout_folds(groups, strata, n_folds=n_folds, assignment=assignment)
    return np.flatnonzero(f != fold), np.flatnonzero(f == fold)


# ---------------------------------------------------------------- the model

MLP16_HIDDEN = (16,)
MLP16_MAX_ITER = 500


def make_mlp16(seed: int = 42) -> Any:
    """SpecKV-MLP16 (the seed's "fast" predictor, exactly as its notebook builds it):
    `MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=seed)`."""
    from sklearn.neural_network import MLPRegressor

    return MLPRegressor(hidden_layer_sizes=MLP16_HIDDEN, max_iter=MLP16_MAX_ITER, random_state=seed)


def estimator_repr(seed: int) -> str:
    """The manifest's `estimator`: how `make_mlp16(seed)` is built."""
    return (
        f"MLPRegressor(hidden_layer_sizes={MLP16_HIDDEN}, max_iter={MLP16_MAX_ITER}, "
        f"random_state={seed})"
    )


def fit_quiet(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    """Fit without the MLP's ConvergenceWarning (the seed's 500 iterations need not
    converge; the metrics say how good the fit is)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def fit_mlp16(x: np.ndarray, y: np.ndarray, seed: int = 42) -> Any:
    return fit_quiet(make_mlp16(seed), x, y)


def score(model: Any, x: np.ndarray, y: np.ndarray, n_train: int) -> SplitMetrics:
    """MSE and Pearson correlation of clip(prediction, 0, 1) against `y` (the seed clips
    before scoring; the server clips too)."""
    pred = np.clip(model.predict(x), 0.0, 1.0)
    mse = float(np.mean((pred - y) ** 2))
    corr = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else 0.0
    return SplitMetrics(mse=mse, corr=corr, n_train=n_train, n_test=int(y.size))
