"""`speckv-eval tune-plan`: scales tuned by exact replay on training prompts only."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_tune_plan_replays_the_grid_and_picks_the_best(
    tiny_pair_dir: Path, plan_repo_template: Path
) -> None:  # type: ignore[no-untyped-def]
    from speckv_eval.log_steps import DEFAULT_TRAIN_PROMPTS
    from speckv_eval.replay_run import ReplayConfig, tune_plan

    cfg = ReplayConfig(
        draft=str(tiny_pair_dir / "draft"),
        target=str(tiny_pair_dir / "target"),
        prompts=DEFAULT_TRAIN_PROMPTS,
        compressions=("fp16",),
        max_new_tokens=24,
        limit=2,
        threads=1,
        progress=False,
    )
    out = tune_plan(cfg, plan_repo_template / "speckv-instep" / "1", (0.5, 1.0), (1.0,))
    scores = {
        (g["first_scale"], g["continue_scale"]): g["speedup_vs_target_geomean"] for g in out["grid"]
    }
    assert set(scores) == {(0.5, 1.0), (1.0, 1.0)}
    best = (out["best"]["first_scale"], out["best"]["continue_scale"])
    assert scores[best] == pytest.approx(max(scores.values()), abs=1e-4)
    assert all(s > 0 for s in scores.values())


def test_tune_plan_refuses_evaluation_prompts(tmp_path: Path, plan_repo_template: Path) -> None:
    import subprocess
    import sys

    from speckv_eval.log_steps import DEFAULT_EXCLUDE

    pair = tmp_path / "pair"
    (pair / "draft").mkdir(parents=True)
    (pair / "target").mkdir()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "speckv-eval"),
            "tune-plan",
            "--pair",
            str(pair),
            "--model",
            str(plan_repo_template / "speckv-instep" / "1"),
            "--prompts",
            str(DEFAULT_EXCLUDE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "evaluation prompts" in proc.stderr
