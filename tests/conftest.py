"""Shared test fixtures (owned by the training engineer; names are stable, others rely on them).

- `seed_csv` -> Path: the project's copy of the seed's phase2_step_results.csv.
- `model_repo_template` (session) -> Path: a model repository trained ONCE per test session
  by the real training API (`train_and_register`), never written to by tests:
    speckv-mlp16/1            window previous_step, MLP seed 42
    speckv-mlp16/2            window previous_step, MLP seed 7 (so its predictions differ)
    speckv-mlp16-same-step/1  window same_step, MLP seed 42 (the seed's protocol)
  The held-out-runs evaluation is skipped for these (manifest `heldout_runs: null`) to keep
  the session start short; everything else is exactly what `speckv-predictor train` writes.
- `model_repo` -> Path: a fresh copy of that template in `tmp_path`, free to modify.

The model names are `MODEL_NAME` ("speckv-mlp16") and `SAME_STEP_MODEL_NAME`
("speckv-mlp16-same-step"); `from tests.conftest import MODEL_NAME` works, or repeat the strings.
Measured: building the template takes about 4.5 s (2-core machine), once per session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MODEL_NAME = "speckv-mlp16"
SAME_STEP_MODEL_NAME = "speckv-mlp16-same-step"
SEED_CSV = (
    Path(__file__).resolve().parents[1]
    / "predictor_service"
    / "data"
    / "speckv-paper"
    / "phase2_step_results.csv"
)


@pytest.fixture(scope="session")
def seed_csv() -> Path:
    assert SEED_CSV.is_file(), f"the project's seed copy is missing: {SEED_CSV}"
    return SEED_CSV


@pytest.fixture(scope="session")
def model_repo_template(tmp_path_factory: pytest.TempPathFactory, seed_csv: Path) -> Path:
    from predictor_service.training import TrainConfig, train_and_register

    repo = tmp_path_factory.mktemp("model-repo-template")
    for name, window, version, seed in (
        (MODEL_NAME, "previous_step", 1, 42),
        (MODEL_NAME, "previous_step", 2, 7),
        (SAME_STEP_MODEL_NAME, "same_step", 1, 42),
    ):
        train_and_register(
            TrainConfig(
                repo=repo,
                name=name,
                window=window,
                data=seed_csv,
                version=version,
                seed=seed,
                heldout_runs=False,
                progress=False,
            )
        )
    return repo


@pytest.fixture
def model_repo(model_repo_template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model-repo"
    shutil.copytree(model_repo_template, dest)
    return dest
