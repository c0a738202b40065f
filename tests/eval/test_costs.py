"""The one cost model (speckv.costs), pinned once: t(γ) = γ·t_draft + t_verify(γ) with
t_verify(γ ≥ 1) on a line fitted over γ ≥ 1 and γ = 0 the measured plain step; goodput =
expected tokens / t(γ). Every user — the worker's timing report, the predictor's goodput
objective and draft-plan thresholds, the replay, the paper path — goes through it, and no
other module writes a cost or goodput formula (the grep check at the end)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from speckv.costs import CostModel, expected_tokens
from speckv.draft_plan import goodput_thresholds
from speckv_eval.replay import Costs, CostsTiming

from decode_worker.timing import TimingModel
from predictor_service.decisions import Objective, StepTiming, scores

REPO = Path(__file__).resolve().parents[2]

# 5 ms for one position, then 8 ms + 0.5 ms per drafted token; 1 ms per draft forward.
MODEL = CostModel(0.001, 0.008, 0.0005, 0.005)


def test_step_seconds() -> None:
    assert MODEL.step_seconds(0) == pytest.approx(0.005)  # the measured plain step
    assert MODEL.step_seconds(4) == pytest.approx(4 * (0.001 + 0.0005) + 0.008)
    # A stop rule that drafted 6 and verified 4 pays two more draft forwards.
    assert MODEL.step_seconds(4, drafted=6) == pytest.approx(MODEL.step_seconds(4) + 0.002)
    assert MODEL.step_seconds(0, drafted=1) == pytest.approx(0.005 + 0.001)
    np.testing.assert_allclose(
        MODEL.step_seconds(np.array([0, 1, 8])), [0.005, 0.0095, 0.008 + 8 * 0.0015]
    )
    # Unmeasured plain step (an older worker): γ = 0 costs the line's base.
    assert CostModel(0.001, 0.008, 0.0005).step_seconds(0) == pytest.approx(0.008)


def test_goodput_is_expected_tokens_over_step_seconds() -> None:
    g = np.array([0.0, 2.0, 4.0])
    acc = np.array([[0.0, 0.9, 0.5]])
    tokens = expected_tokens(acc, g)
    np.testing.assert_allclose(tokens, [[1.0, 2.8, 3.0]])
    np.testing.assert_allclose(
        MODEL.goodput(tokens, g), [[1 / 0.005, 2.8 / 0.011, 3.0 / 0.014]], rtol=1e-12
    )
    # The predictor's goodput objective is exactly this.
    t = StepTiming(*MODEL.timing_fields())
    np.testing.assert_array_equal(
        scores(acc, g, Objective.GOODPUT, t), MODEL.goodput(expected_tokens(acc, g), g)
    )


def test_fit_excludes_the_plain_step_from_the_line() -> None:
    verify = (0.005, *(0.008 + 0.0005 * g for g in range(1, 17)))
    m = CostModel.fit(0.001, verify)
    assert m.verify_base_seconds == pytest.approx(0.008)
    assert m.verify_seconds_per_token == pytest.approx(0.0005)
    assert m.target_only_seconds == 0.005
    # A line through every γ would charge a plain step 7.4 ms instead of 5.
    _, all_gamma_base = np.polyfit(np.arange(17), verify, 1)
    assert all_gamma_base > 0.007 and m.step_seconds(0) == pytest.approx(0.005)


def test_noisy_costs_never_go_negative() -> None:
    m = CostModel.fit(0.001, (0.005, 0.009, 0.008, 0.007))  # decreasing: slope clipped at 0
    assert m.verify_seconds_per_token == 0.0 and m.verify_base_seconds > 0
    assert all(m.step_seconds(g) > 0 for g in range(4))


def test_a_table_of_measured_seconds_is_an_input() -> None:
    """The seed's wall clock: whole steps by γ (drafting included), t_draft = 0."""
    seed = CostModel.tabulated({2: 0.041, 4: 0.063, 8: 0.104})
    np.testing.assert_array_equal(seed.step_seconds(np.array([2, 8, 4])), [0.041, 0.104, 0.063])
    assert seed.step_seconds(4, drafted=5) == 0.063  # no draft cost outside the table
    with pytest.raises(KeyError, match="6"):
        seed.step_seconds(6)
    with_draft = CostModel.tabulated({0: 0.005, 3: 0.009}, draft_seconds_per_token=0.001)
    assert with_draft.step_seconds(3) == pytest.approx(0.012)
    assert with_draft.step_seconds(0) == 0.005


def test_every_user_reads_the_same_model() -> None:
    # The worker's moving averages are the model's parameters, reported as StepTiming.
    tm = TimingModel(alpha=1.0)
    tm.add_draft(4, 0.004)
    tm.add_verify(0, 0.005)
    tm.add_verify(2, 0.009)
    tm.add_verify(4, 0.010)
    model = tm.costs()
    snap = tm.snapshot()
    assert model is not None and snap is not None
    assert CostModel.of(snap) == model
    # The replay's measured forwards → CostModel.fit, and its timing for the remote
    # policy is that model.
    costs = Costs(0.001, (0.005, *(0.008 + 0.0005 * g for g in range(1, 17))))
    assert costs.model == CostModel.fit(0.001, costs.verify)
    assert costs.step(3, drafted=4) == costs.model.step_seconds(3, 4)
    assert CostModel.of(CostsTiming(costs).snapshot()) == costs.model
    # The draft-plan stop thresholds: keeping the first token costs t_verify(1) − t(0),
    # each further one t_draft + per_token, both in units of a plain step.
    t = goodput_thresholds(*MODEL.timing_fields())
    assert t.first == pytest.approx((0.0085 - 0.005) / 0.005)
    assert t.keep_going == pytest.approx(0.0015 / 0.005)


# --------------------------------------------------------- one place (grep check)

# Arithmetic on a cost field, or an "(acceptance · γ + 1) / seconds" goodput.
_FIELDS = (
    r"(draft_seconds_per_token|verify_base_seconds|verify_seconds_per_token"
    r"|target_only_seconds|draft_per_token)"
)
FORMULA = [
    re.compile(_FIELDS + r"\s*[-+*/]"),
    re.compile(r"(?<!1e3 )[-+*/]\s*[A-Za-z_.]*" + _FIELDS + r"\b"),
    re.compile(r"\*\s*\w*g(amma)?\w*\s*\+\s*1(\.0)?\s*\)\s*/"),
]
HOME = REPO / "protos" / "speckv" / "costs.py"


DISPLAY = re.compile(r"\{[^}]*:\.\d+f\}")  # a number formatted for print: not a formula


def _formula_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if any(p.search(line) for p in FORMULA) and not DISPLAY.search(line)
    ]


def test_the_check_finds_the_formulas_it_guards_against() -> None:
    # What the predictor, the replay, the draft-plan thresholds and the paper wrote before.
    for line in (
        "    per_token = timing.draft_seconds_per_token + timing.verify_seconds_per_token",
        "    cost = gamma_array * per_token + timing.verify_base_seconds",
        "        return gamma * (self.draft_per_token + per_token) + base + extra",
        "    t1 = verify_base_seconds + verify_seconds_per_token",
        "    score = (acc * g + 1.0) / secs",
    ):
        assert _formula_lines(line), line
    assert not _formula_lines('    print(f"{1e3 * c.draft_per_token:.2f} ms")')
    assert not _formula_lines('    print(f"{c.draft_per_token / c.verify[0]:.2f}")')
    assert _formula_lines(HOME.read_text(encoding="utf-8"))


def test_cost_and_goodput_formulas_are_written_in_one_place() -> None:
    roots = ["decode_worker", "predictor_service", "client", "protos/speckv", "benchmarks"]
    found = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            if path == HOME or path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            lines = _formula_lines(path.read_text(encoding="utf-8"))
            if lines:
                found[str(path.relative_to(REPO))] = lines
    assert found == {}, "cost formulas outside speckv/costs.py"
