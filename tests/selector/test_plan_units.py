"""The draft plan's pieces: context n-grams, sequence history, the plan runner, thresholds."""

from __future__ import annotations

import math

import pytest
from speckv.draft_plan import (
    DraftPlan,
    PlanAxis,
    PlanRunner,
    check_axes,
    goodput_thresholds,
    grid_inputs,
)

from decode_worker.features import ContextIndex, SequenceHistory


def brute_match(context: list[int], before: list[int], token: int, max_n: int = 4) -> int:
    """The definition, by scanning: longest n whose n-gram ending at `token` is in context."""
    seq = context + before
    best = 0
    for n in range(1, max_n + 1):
        if n - 1 > len(seq):
            break
        gram = ([*seq[len(seq) - (n - 1) :]] if n > 1 else []) + [token]
        if any(context[i : i + n] == gram for i in range(len(context) - n + 1)):
            best = n
    return best


def test_context_match_length_equals_a_brute_force_scan() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        ctx = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
        idx = ContextIndex()
        # Committed in pieces, as steps commit them.
        i = 0
        while i < len(ctx):
            k = rng.randrange(1, 4)
            idx.add(ctx[i : i + k])
            i += k
        drafted = [rng.randrange(6) for _ in range(rng.randrange(0, 3))]
        tok = rng.randrange(6)
        assert idx.match_length(drafted, tok) == brute_match(ctx, drafted, tok)


def test_context_match_sees_prompt_spans() -> None:
    idx = ContextIndex()
    idx.add([1, 2, 3, 4, 5])
    idx.add([9, 1, 2])
    assert idx.match_length([], 3) == 3  # "1 2 3" occurred
    assert idx.match_length([3], 4) == 4  # "1 2 3 4" occurred
    assert idx.match_length([], 7) == 0


def test_history_counts_probes_and_survives_gamma_zero_steps() -> None:
    h = SequenceHistory()
    assert h.prev_full == 0.0 and h.accept_ema == 0.5
    # 3 drafted, all kept: a full step.
    assert h.observe([5, 6, 7], 3, 3, 8) == [1, 1, 1]
    assert h.prev_full == 1.0
    ema = h.accept_ema
    # 2 verified of 3 drafted (a stop rule dropped one); both kept; the probe disagreed.
    assert h.observe([5, 6, 7], 2, 2, 9) == [1, 1, 0]
    assert h.prev_full == 0.0
    # γ = 0 with a probe that agreed with the target: history moves up again.
    assert h.observe([4], 0, 0, 4) == [1]
    assert h.prev_full == 1.0
    # Nothing drafted: no event, nothing changes.
    before = (h.prev_full, h.accept_ema)
    assert h.observe([], 0, 0, 4) == []
    assert (h.prev_full, h.accept_ema) == before
    assert 0 < ema < 1


def plan(first: float = 0.3, keep: float = 0.1, max_gamma: int = 6) -> DraftPlan:
    axes = (PlanAxis("match_length", (1.0, 2.0)), PlanAxis("prev_full", (0.5,)))
    # cells: (match bin, prev_full bin) in C order
    acc = (0.1, 0.2, 0.5, 0.6, 0.9, 0.95)
    return DraftPlan(axes, acc, max_gamma, first, keep, 16)


def test_plan_lookup_is_c_order_over_axes() -> None:
    r = PlanRunner(plan())
    assert r.estimate({"match_length": 0, "prev_full": 0}) == 0.1
    assert r.estimate({"match_length": 0, "prev_full": 1}) == 0.2
    assert r.estimate({"match_length": 1, "prev_full": 0}) == 0.5
    assert r.estimate({"match_length": 4, "prev_full": 1}) == 0.95


def test_plan_runner_stop_rule() -> None:
    r = PlanRunner(plan(first=0.3, keep=0.5))
    r.start_step()
    assert r.after_token(1, 0.2, cap=6) == 0  # first token below the first threshold: γ = 0
    r.start_step()
    assert r.after_token(1, 0.9, cap=6) is None  # S·p = 0.81 ≥ 0.5: draft on
    assert r.after_token(2, 0.7, cap=6) == 2  # S = 0.63, S·p = 0.441 < 0.5: verify 2
    r.start_step()
    assert r.after_token(1, 0.95, cap=2) is None
    assert r.after_token(2, 0.95, cap=2) == 2  # the cap ends the draft


def test_plan_problems_are_named() -> None:
    assert plan().problem() is None
    bad = DraftPlan(plan().axes, (0.5,) * 5, 6, 0.3, 0.1, 16)
    assert "6-cell" in (bad.problem() or "")
    assert "outside" in (DraftPlan(plan().axes, (0.5,) * 6, 0, 0.3, 0.1, 16).problem() or "")
    assert "unknown" in (check_axes([PlanAxis("nope", ())]) or "")
    assert "increasing" in (check_axes([PlanAxis("accept_ema", (0.5, 0.2))]) or "")


def test_grid_inputs_enumerate_cells_in_c_order() -> None:
    axes = (PlanAxis("match_length", (1.0,)), PlanAxis("prev_full", (0.5,)))
    x = grid_inputs(axes, 2.0)
    assert x.tolist() == [[0, 0, 2], [0, 1, 2], [1, 0, 2], [1, 1, 2]]


def test_goodput_thresholds_follow_the_costs() -> None:
    # Plain step 7 ms, speculative line 9 ms + 0.2 ms/token, draft 0.6 ms/token.
    t = goodput_thresholds(0.0006, 0.009, 0.0002, 0.007)
    assert t.first == pytest.approx((0.0092 - 0.007) / 0.007)
    assert t.keep_going == pytest.approx(0.0008 / 0.007)
    # Unknown target-only cost: γ = 0 costs the intercept (old workers).
    t2 = goodput_thresholds(0.0006, 0.009, 0.0002, 0.0)
    assert t2.first == pytest.approx(0.0002 / 0.009)
    assert all(math.isfinite(v) for v in (t.first, t.keep_going, t2.first))
