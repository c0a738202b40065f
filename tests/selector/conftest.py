"""A model repository holding the seed's SpecKV-MLP16 versions and a `speckv-instep`
draft_plan model trained on synthetic token records (fast; the real one comes from
`make selector`)."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest

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
