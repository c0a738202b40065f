"""`speckv-predictor train` and `speckv-eval paper` share one training/data protocol
(predictor_service/dataset.py): the same loader, previous-step join, splits and folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from speckv_eval.paper import _fold_of, previous_step_context
from speckv_eval.paper_data import default_data_dir, load_steps

from predictor_service.dataset import (
    DataError,
    heldout_folds,
    heldout_split,
    read_step_records,
    seed_split,
    strata_of,
    window_data,
)
from predictor_service.training import heldout_runs_split


@pytest.fixture(scope="module")
def both(seed_csv: Path):
    return read_step_records(seed_csv), load_steps(default_data_dir())


def test_the_paper_reads_the_seed_through_the_training_loader(both) -> None:
    records, steps = both
    assert len(steps) == records.rows == 5112
    np.testing.assert_array_equal(steps["run_id"].to_numpy(), records.run_id)
    np.testing.assert_array_equal(steps["comp_enc"].to_numpy(), records.comp_enc)
    np.testing.assert_array_equal(steps["acceptance_rate"].to_numpy(), records.acceptance_rate)
    assert records.accepted is not None
    np.testing.assert_array_equal(steps["accepted"].to_numpy(), records.accepted)


def test_previous_step_is_the_same_join_in_both(both) -> None:
    records, steps = both
    prev = window_data(records, "previous_step")
    ctx, has_prev = previous_step_context(steps)
    np.testing.assert_array_equal(np.flatnonzero(has_prev), prev.record_index)
    np.testing.assert_array_equal(ctx[has_prev], prev.x[:, :5])
    assert has_prev.sum() == 5112 - 240  # every run's first step has none


def test_the_seed_split_and_heldout_runs_are_the_same_for_both_loaders(both) -> None:
    records, steps = both
    data = window_data(records, "same_step")
    paper_strata = strata_of(steps["compression"], steps["task"])
    for a, b in zip(seed_split(data.strata), seed_split(paper_strata), strict=True):
        np.testing.assert_array_equal(a, b)
    tr, te = heldout_runs_split(data)
    ptr, pte = heldout_split(steps["run_id"].to_numpy(), paper_strata)
    np.testing.assert_array_equal(tr, ptr)
    np.testing.assert_array_equal(te, pte)
    assert not set(data.run_id[tr]) & set(data.run_id[te])
    assert 0.15 < te.size / data.y.size < 0.25


def test_paper_folds_hold_out_whole_prompts(both) -> None:
    _, steps = both
    fold = _fold_of(steps, 5)
    np.testing.assert_array_equal(
        fold, heldout_folds(steps["prompt_idx"].to_numpy(), assignment="index_mod")
    )
    per_prompt = steps.assign(fold=fold).groupby(["task", "prompt"])["fold"].nunique()
    assert (per_prompt == 1).all()  # no prompt on both sides of any fold
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("assignment", ["stratified", "index_mod", "balanced"])
def test_every_assignment_keeps_groups_whole(assignment: str) -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 23, size=400)
    strata = np.asarray([f"s{g % 3}" for g in groups], dtype=object)
    fold = heldout_folds(groups, strata, assignment=assignment)  # type: ignore[arg-type]
    assert set(fold) == {0, 1, 2, 3, 4}
    for g in np.unique(groups):
        assert np.unique(fold[groups == g]).size == 1, g
    tr, te = heldout_split(groups, strata, fold=2, assignment=assignment)  # type: ignore[arg-type]
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(400))
    assert not set(groups[tr]) & set(groups[te])


def test_too_few_groups_is_refused() -> None:
    with pytest.raises(DataError, match="at least 5 groups"):
        heldout_folds(np.array([0, 0, 1, 2, 3]), np.array(["a"] * 5, dtype=object))
