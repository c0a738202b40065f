"""Load the seed's step records and attach the run and prompt each step came from.

The step CSV has no run or prompt column, but its runs are stored in the same order as
`phase2_experiment_results.csv` (a run starts where `step` is 0), so the two join row by
row. The join is checked (settings and step counts) rather than trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# The seed's vocabulary (speckv.vocabulary), under the names the paper code uses.
from speckv.vocabulary import COMP_ENC as COMP_ENC
from speckv.vocabulary import COMPRESSIONS as COMPRESSIONS
from speckv.vocabulary import DEFAULT_GAMMA_CANDIDATES, DRAFT_SIGNALS
from speckv.vocabulary import SEED_FEATURES as SEED_FEATURES

from predictor_service.dataset import (
    PREV_COLUMNS,
    StepRecords,
    previous_signals,
    read_step_records,
)

SEED_GAMMAS = DEFAULT_GAMMA_CANDIDATES
DRAFT_FEATURES = DRAFT_SIGNALS

TASKS: tuple[str, ...] = ("code", "math", "chat", "summarization")


def default_data_dir() -> Path:
    """The project copy of the seed data, shipped inside predictor_service."""
    import predictor_service

    return Path(predictor_service.__file__).resolve().parent / "data" / "speckv-paper"


def _require(data_dir: Path, name: str) -> Path:
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --data must be the seed data folder holding {name} "
            f"(the project copy is {default_data_dir()})"
        )
    return path


def load_steps(data_dir: Path) -> pd.DataFrame:
    """Step records with `comp_enc`, `run_id`, `prev_*`, `prompt_idx` (0..4 within its task)
    and `prompt`: read, validated, split into runs and joined to their previous step by the
    training protocol's own loader (predictor_service.dataset), then joined to the prompts."""
    records = read_step_records(_require(data_dir, "phase2_step_results.csv"))
    runs = pd.read_csv(_require(data_dir, "phase2_experiment_results.csv"))
    steps = records_frame(records)
    run_id = records.run_id
    n_runs = int(run_id.max()) + 1
    if n_runs != len(runs):
        raise ValueError(
            f"{n_runs} runs in the step CSV but {len(runs)} rows in "
            "phase2_experiment_results.csv; the two files must come from the same experiment"
        )
    first = steps.groupby("run_id").first()
    counts = steps.groupby("run_id").size().to_numpy()
    same = (
        (first["compression"].to_numpy() == runs["compression"].to_numpy())
        & (first["gamma"].to_numpy() == runs["gamma"].to_numpy())
        & (first["task"].to_numpy() == runs["task"].to_numpy())
        & (counts == runs["num_steps"].to_numpy())
    )
    if not same.all():
        bad_run = int(np.flatnonzero(~same)[0])
        raise ValueError(f"run {bad_run} of the step CSV does not match its experiment row")
    runs = runs.copy()
    runs["prompt_idx"] = runs.groupby(["compression", "gamma", "task"]).cumcount()
    steps["prompt_idx"] = runs["prompt_idx"].to_numpy()[run_id]
    steps["prompt"] = runs["prompt"].to_numpy()[run_id]
    return steps


def records_frame(records: StepRecords) -> pd.DataFrame:
    """The shared loader's records as a frame: the seed's columns, `comp_enc`, `run_id` and the
    shared previous-step join as `prev_*` (NaN where a step has no previous step)."""
    if records.accepted is None or records.tokens_produced is None:
        raise ValueError(
            f"{records.path}: the paper's judge needs the 'accepted' and 'tokens_produced' columns"
        )
    frame = pd.DataFrame(
        {
            "compression": records.compression,
            "gamma": records.gamma,
            "task": records.task,
            "step": records.step,
            "accepted": records.accepted,
            "acceptance_rate": records.acceptance_rate,
            "tokens_produced": records.tokens_produced,
            **{s: records.signals[:, i] for i, s in enumerate(DRAFT_FEATURES)},
            "comp_enc": records.comp_enc,
            "run_id": records.run_id,
        }
    )
    prev = previous_signals(records)
    for i, col in enumerate(PREV_COLUMNS):
        frame[col] = prev[:, i]
    return frame


def load_runs(data_dir: Path) -> pd.DataFrame:
    """Per-run wall clock (tokens/s, elapsed, steps) from the seed's own timed runs."""
    return pd.read_csv(_require(data_dir, "phase2_experiment_results.csv"))


def load_task_oracle(data_dir: Path) -> dict[tuple[str, str], int]:
    """The seed's per (compression, task) best γ by wall-clock tokens/s."""
    df = pd.read_csv(_require(data_dir, "phase2_optimal_gamma.csv"))
    return {
        (str(r.compression), str(r.task)): int(r.optimal_gamma) for r in df.itertuples(index=False)
    }


def load_paper_tables(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The seed's published Table 1, Table 2 and bootstrap CIs."""
    t1 = pd.read_csv(_require(data_dir, "paper_table1_policy_comparison.csv"))
    t2 = pd.read_csv(_require(data_dir, "paper_table2_detailed_breakdown.csv"))
    ci = pd.read_csv(_require(data_dir, "paper_confidence_intervals.csv"))
    return t1, t2, ci
