"""Replay must equal real decoding: for each fixed γ (and HF's heuristic), the steps the
replay derives from one target run and one teacher-forced draft pass are the steps the
worker's engine actually takes — same γ, same accepted count, same tokens, same signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speckv_eval.replay import (
    Costs,
    Trace,
    agreeing_runs,
    build_trace,
    oracle_sequence,
    replay_sequence,
)

from decode_worker.config import EngineConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import (
    FixedPolicy,
    HeuristicContextPolicy,
    HeuristicPolicy,
    SequenceInfo,
)
from tests.worker.engine_helpers import random_pair

VOCAB = 64
MAX_NEW = 40


@pytest.fixture(scope="module")
def engine() -> SpeculativeEngine:
    torch.set_num_threads(1)
    # The worker tests' random pair: a sharp target and a noisy copy as the draft.
    return SpeculativeEngine(random_pair(seed=0, vocab=VOCAB), EngineConfig(max_gamma=16))


@pytest.fixture(scope="module")
def traces(engine: SpeculativeEngine) -> list[tuple[list[int], Trace]]:
    return [
        (ids, build_trace(engine, f"p{i}", "test", ids, MAX_NEW))
        for i, ids in enumerate(_prompts(3))
    ]


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (6,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize(
    "policy",
    [
        *(FixedPolicy(g) for g in (1, 2, 3, 4, 6, 8)),
        HeuristicPolicy(),
        HeuristicContextPolicy(),
        HeuristicContextPolicy(min_match=1),
    ],
    ids=lambda p: p.spec,
)
def test_replayed_steps_equal_real_steps(engine: SpeculativeEngine, traces, policy) -> None:
    rejected_somewhere = accepted_somewhere = False
    for i, (ids, trace) in enumerate(traces):
        real = engine.generate(ids, policy, max_new_tokens=MAX_NEW)
        assert list(real.token_ids) == trace.output  # greedy output does not depend on γ
        seq = policy.start(SequenceInfo(f"p{i}", "fp16"))
        replayed = replay_sequence(trace, seq, engine.config.max_gamma)
        assert [s.gamma for s in replayed.steps] == [s.gamma for s in real.steps]
        assert [s.kept for s in replayed.steps] == [len(s.token_ids) for s in real.steps]
        assert [s.accepted for s in replayed.steps] == [s.accepted for s in real.steps]
        assert [s.drafted for s in replayed.steps] == [s.drafted for s in real.steps]
        real_tps = len(real.token_ids) / len(real.steps)
        assert replayed.tokens / len(replayed.steps) == pytest.approx(real_tps)
        # The signals a predictor would see are the worker's, off-path tokens included.
        p = 0
        for rs, ps in zip(real.steps, replayed.steps, strict=True):
            if rs.gamma:
                got = [s for _, s in trace.probe.proposals(p, rs.gamma)]
                np.testing.assert_allclose(
                    [(s.entropy_bits, s.confidence) for s in got],
                    [(s.entropy_bits, s.confidence) for s in rs.token_signals],
                    rtol=1e-3,
                    atol=1e-4,
                )
            p += ps.kept
        rejected_somewhere |= any(s.accepted < s.gamma for s in real.steps)
        accepted_somewhere |= any(s.accepted > 0 for s in real.steps)
    assert rejected_somewhere and accepted_somewhere  # the pair exercises both branches


def test_replayed_draft_plan_equals_real_decoding(
    engine: SpeculativeEngine, traces, plan_repo_template
) -> None:  # type: ignore[no-untyped-def]
    """The draft_plan window: the worker's own RemotePlanSequence, over an in-process
    submitter with the predictor's plan code, takes the same steps in the replay as in the
    engine (same γ, same dropped drafts), given the same timing."""
    from speckv_client.types import Objective, StepTiming, Window
    from speckv_eval.replay import InProcessPlans

    from decode_worker.config import RemotePolicyConfig
    from decode_worker.remote_policy import RemotePolicy
    from predictor_service.repository import load_version

    version = load_version(plan_repo_template / "speckv-instep" / "1")

    class Fixed:
        def snapshot(self) -> StepTiming:
            return StepTiming(0.0012, 0.0116, 0.00025, 0.0078)

    def policy() -> RemotePolicy:
        cfg = RemotePolicyConfig(
            window=Window.DRAFT_PLAN, objective=Objective.GOODPUT, plan_max_gamma=8
        )
        return RemotePolicy(InProcessPlans(version, 0), cfg, Fixed())  # type: ignore[arg-type]

    dropped = zero = 0
    for i, (ids, trace) in enumerate(traces):
        real = engine.generate(ids, policy(), max_new_tokens=MAX_NEW)
        assert list(real.token_ids) == trace.output
        replayed = replay_sequence(
            trace, policy().start(SequenceInfo(f"p{i}", "fp16")), engine.config.max_gamma
        )
        assert [(s.gamma, s.drafted, s.accepted) for s in replayed.steps] == [
            (s.gamma, s.drafted, s.accepted) for s in real.steps
        ]
        dropped += sum(s.drafted - s.gamma for s in real.steps)
        zero += sum(s.gamma == 0 for s in real.steps)
    assert dropped > 0 and zero > 0  # the stop rule cut drafts, γ = 0 included


def test_agreeing_runs() -> None:
    agree = np.array([True, True, False, True, False, False, True])
    assert agreeing_runs(agree).tolist() == [2, 1, 0, 1, 0, 0, 1]


def test_oracle_never_loses_to_a_fixed_gamma(traces) -> None:
    costs = Costs(0.001, tuple(0.005 + 0.0005 * g for g in range(17)))
    for _, trace in traces:
        best = sum(costs.step(s.gamma) for s in oracle_sequence(trace, costs, 16).steps)
        for g in (0, 1, 2, 4, 8):
            seq = FixedPolicy(g).start(SequenceInfo("x", "fp16"))
            fixed = replay_sequence(trace, seq, 16, needs_signals=False)
            assert best <= sum(costs.step(s.gamma) for s in fixed.steps) + 1e-12


def test_replay_equals_decoding_on_the_tiny_test_pair(loaded_pair) -> None:
    """The same check through the production loader on the project's trained test-size pair."""
    pair = loaded_pair("fp16")
    eng = SpeculativeEngine(pair, EngineConfig(max_gamma=16))
    prompts = ["def read_lines(path):\n", "The with statement "]
    for i, text in enumerate(prompts):
        ids = eng.encode(text)
        trace = build_trace(eng, f"t{i}", "code", ids, 24)
        for g in (1, 2, 4, 8):
            real = eng.generate(ids, FixedPolicy(g), max_new_tokens=24)
            assert list(real.token_ids) == trace.output
            seq = FixedPolicy(g).start(SequenceInfo(f"t{i}", "fp16"))
            replayed = replay_sequence(trace, seq, 16, needs_signals=False)
            assert [s.kept for s in replayed.steps] == [len(s.token_ids) for s in real.steps]
            assert replayed.tokens / len(replayed.steps) == pytest.approx(
                real.stats.tokens_per_step
            )
