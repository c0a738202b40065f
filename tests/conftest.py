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
- `tiny_pair_dir` (session) -> Path: the `test`-size tiny pair (DIR/draft, DIR/target), built
  by the real builder into `<repo>/.cache/tiny-pair/test-seed0` on first use, then reused.
- `loaded_pair` (session) -> `load(compression="fp16") -> LoadedPair`, loaded on CPU once per
  compression.

The model names are `MODEL_NAME` ("speckv-mlp16") and `SAME_STEP_MODEL_NAME`
("speckv-mlp16-same-step"); `from tests.conftest import MODEL_NAME` works, or repeat the strings.
Measured: building the template takes about 4.5 s (2-core machine), once per session.
"""

from __future__ import annotations

import csv
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from decode_worker.pair import LoadedPair

MODEL_NAME = "speckv-mlp16"
SAME_STEP_MODEL_NAME = "speckv-mlp16-same-step"
REPO = Path(__file__).resolve().parents[1]
TINY_PAIR_CACHE = REPO / ".cache" / "tiny-pair" / "test-seed0"
SEED_CSV = REPO / "predictor_service" / "data" / "speckv-paper" / "phase2_step_results.csv"


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


# The worker fixtures import torch lazily, so predictor-only tests never pay for it.
@pytest.fixture(scope="session")
def tiny_pair_dir() -> Path:
    """The `test`-size pair (DIR/draft, DIR/target); built on first use, then reused."""
    from speckv_tinypair.builder import TinyPairConfig, ensure_tiny_pair

    pair = ensure_tiny_pair(
        TinyPairConfig(out=TINY_PAIR_CACHE, size="test", seed=0, progress=False)
    )
    return pair.root


@pytest.fixture(scope="session")
def loaded_pair(tiny_pair_dir: Path) -> Callable[[str], LoadedPair]:
    """`loaded_pair("fp16"|"int8"|"nf4")` loads the tiny pair on CPU once per compression."""
    from decode_worker.pair import PairConfig, load_pair

    cache: dict[str, LoadedPair] = {}

    def load(compression: str = "fp16") -> LoadedPair:
        if compression not in cache:
            cache[compression] = load_pair(
                PairConfig(
                    draft=str(tiny_pair_dir / "draft"),
                    target=str(tiny_pair_dir / "target"),
                    compression=compression,
                    device="cpu",
                )
            )
        return cache[compression]

    return load


# --- a draft_plan model (speckv-instep) beside the seed models (tests/selector, worker) ---

INSTEP = "speckv-instep"


def write_token_csv(path: Path, rows: int = 3000, seed: int = 0) -> Path:
    """Token records whose agreement depends on the context match and the history."""
    from decode_worker.records import TOKEN_COLUMNS

    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TOKEN_COLUMNS)
        for i in range(rows):
            m = rng.choice([0, 0, 1, 2, 3, 4])
            conf = rng.random()
            ent = rng.random() * 6
            full = rng.choice([0.0, 1.0])
            ema = rng.random()
            p = min(0.95, 0.1 + 0.18 * m + 0.3 * ema + 0.05 * full)
            comp = ("fp16", "int8", "nf4")[i % 3]
            w.writerow(
                [
                    f"p{i % 20}:{comp}:explore0",
                    "code",
                    comp,
                    i % 30,
                    1 + i % 5,
                    4,
                    5,
                    m,
                    f"{conf:.4f}",
                    f"{ent:.4f}",
                    full,
                    f"{ema:.4f}",
                    int(rng.random() < p),
                ]
            )
    return path


@pytest.fixture(scope="session")
def plan_repo_template(tmp_path_factory: pytest.TempPathFactory, model_repo_template: Path) -> Path:
    from predictor_service.plan_training import PlanTrainConfig, train_plan_model

    repo = tmp_path_factory.mktemp("plan-repo")
    shutil.copytree(model_repo_template, repo, dirs_exist_ok=True)
    data = write_token_csv(repo.parent / "tokens.csv")
    train_plan_model(
        PlanTrainConfig(
            repo=repo, name=INSTEP, data=data, version=1, refresh_steps=6, progress=False
        )
    )
    return repo


@pytest.fixture
def plan_repo(plan_repo_template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "plan-repo"
    shutil.copytree(plan_repo_template, dest)
    return dest
