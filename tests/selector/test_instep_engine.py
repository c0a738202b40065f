"""In-step decisions in the engine: exact greedy output, counted wasted drafts, token records."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from speckv.draft_plan import DraftPlan, PlanAxis, PlanRunner
from speckv_client.types import DraftSignals

from decode_worker.config import EngineConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import (
    DecisionSource,
    GammaDecision,
    GammaPolicy,
    HeuristicContextPolicy,
    SequenceInfo,
    SequencePolicy,
)
from decode_worker.records import TOKEN_COLUMNS, StepRecorder, TokenRecorder
from tests.worker.engine_helpers import prompts, random_pair, target_greedy

NEW = 24


class _PlanSeq(SequencePolicy):
    in_step = True

    def __init__(self, plan: DraftPlan, seen: list[dict[str, float]]) -> None:
        self.runner = PlanRunner(plan)
        self.seen = seen

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        self.runner.start_step()
        return GammaDecision(self.runner.plan.max_gamma, DecisionSource.LOCAL)

    def after_token(self, step: int, j: int, features: Mapping[str, float], cap: int) -> int | None:
        self.seen.append(dict(features))
        return self.runner.after_token(j, self.runner.estimate(features), cap)


class PlanPolicy(GammaPolicy):
    """A fixed plan applied locally (what RemotePlanSequence does with a received plan)."""

    def __init__(self, plan: DraftPlan) -> None:
        self.plan = plan
        self.spec = "plan"
        self.seen: list[dict[str, float]] = []

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        return _PlanSeq(self.plan, self.seen)


def a_plan(first: float, keep: float) -> DraftPlan:
    axes = (
        PlanAxis("match_length", (1.0, 2.0)),
        PlanAxis("draft_confidence", (0.5,)),
        PlanAxis("accept_ema", (0.5,)),
    )
    acc = tuple(0.1 + 0.1 * i for i in range(12))
    return DraftPlan(axes, acc, 6, first, keep, 8)


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return random_pair(seed=0, noise=0.3)


@pytest.mark.parametrize(
    "policy",
    [
        HeuristicContextPolicy(),
        HeuristicContextPolicy(min_match=1),
        PlanPolicy(a_plan(0.5, 0.2)),
        PlanPolicy(a_plan(0.0, 0.0)),
        PlanPolicy(a_plan(1.0, 1.0)),
    ],
    ids=["ctx2", "ctx1", "plan", "plan-never-stop", "plan-always-stop"],
)
def test_in_step_policies_keep_greedy_output_exact(pair, policy) -> None:  # type: ignore[no-untyped-def]
    engine = SpeculativeEngine(pair, EngineConfig())
    wasted = zero_steps = probes = 0
    for prompt in prompts(5):
        expected = target_greedy(pair.target, prompt, NEW)
        result = engine.generate(prompt, policy, max_new_tokens=NEW)
        assert list(result.token_ids) == expected
        wasted += result.stats.wasted_draft_tokens
        zero_steps += sum(1 for s in result.steps if s.gamma == 0)
        probes += sum(1 for s in result.steps if s.gamma == 0 and s.drafted == 1)
        for s in result.steps:
            assert s.drafted >= s.gamma
            assert result.stats.draft_forwards >= result.stats.num_draft_tokens
    if isinstance(policy, PlanPolicy) and policy.plan.first_threshold == 1.0:
        # Every first token dropped: all steps are plain target steps, each with one
        # wasted draft (but the last, where no draft fits under max_new_tokens).
        assert zero_steps > 0 and wasted == probes >= zero_steps - 5
    if isinstance(policy, PlanPolicy) and policy.plan.first_threshold == 0.0:
        assert wasted == 0


def test_in_step_features_hold_token_and_history_values(pair) -> None:  # type: ignore[no-untyped-def]
    engine = SpeculativeEngine(pair, EngineConfig())
    policy = PlanPolicy(a_plan(0.0, 0.0))
    engine.generate(prompts(1)[0], policy, max_new_tokens=NEW)
    assert policy.seen
    for f in policy.seen:
        assert set(f) == {
            "match_length",
            "draft_confidence",
            "draft_entropy",
            "prev_full",
            "accept_ema",
        }
        assert 0 <= f["match_length"] <= 4 and 0 <= f["draft_confidence"] <= 1
        assert f["prev_full"] in (0.0, 1.0) and 0 < f["accept_ema"] < 1
    # History moves once outcomes are seen.
    assert len({f["accept_ema"] for f in policy.seen}) > 1


def test_token_records_label_agreement(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from decode_worker.policies import ExplorePolicy, FixedPolicy

    tokens = TokenRecorder(tmp_path / "tokens.csv")
    engine = SpeculativeEngine(
        pair, EngineConfig(), recorder=StepRecorder(tmp_path / "steps.csv"), token_recorder=tokens
    )
    res = engine.generate(
        prompts(1)[0], FixedPolicy(4), max_new_tokens=NEW, request_id="p1:fp16:g4"
    )
    engine.generate(prompts(1)[0], ExplorePolicy(8), max_new_tokens=NEW, request_id="p1:fp16:x")
    tokens.close()
    with (tmp_path / "tokens.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == TOKEN_COLUMNS
    fixed = [r for r in rows if r["sequence_id"] == "p1:fp16:g4"]
    # Per drafted step: accepted tokens are 1, then one 0 where a token was rejected.
    for s in res.steps:
        if s.gamma == 0:
            continue
        mine = [int(r["agreed"]) for r in fixed if int(r["step"]) == s.step]
        assert mine == [1] * s.accepted + ([0] if s.accepted < s.gamma else [])
    assert {r["sequence_id"] for r in rows} == {"p1:fp16:g4", "p1:fp16:x"}
