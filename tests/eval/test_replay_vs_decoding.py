"""Replay must equal real decoding: for each fixed γ, HF's heuristic and the worker's
`remote` policy in every window (over an in-process predictor), the steps the replay
derives from one target run and one teacher-forced draft pass are the steps the worker's
engine actually takes — same γ, same accepted count, same tokens, same signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speckv_client.types import Objective, StepTiming, Window
from speckv_eval.replay import (
    Costs,
    InProcessPredictor,
    Trace,
    agreeing_runs,
    build_trace,
    oracle_sequence,
    replay_sequence,
)

from decode_worker.config import EngineConfig, RemotePolicyConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import (
    DecisionSource,
    FixedPolicy,
    HeuristicContextPolicy,
    HeuristicPolicy,
    SequenceInfo,
)
from decode_worker.remote_policy import RemotePolicy
from predictor_service.repository import load_version
from tests.conftest import MODEL_NAME, SAME_STEP_MODEL_NAME
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


class FixedTiming:
    """What a worker's TimingModel reports, frozen so both runs see the same costs."""

    def snapshot(self) -> StepTiming:
        return StepTiming(0.0012, 0.0116, 0.00025, 0.0078)


@pytest.mark.parametrize(
    ("model", "window", "objective"),
    [
        ("speckv-instep/1", Window.DRAFT_PLAN, Objective.GOODPUT),
        (f"{MODEL_NAME}/1", Window.PREVIOUS_STEP, Objective.GOODPUT),
        (f"{MODEL_NAME}/1", Window.PREVIOUS_STEP, Objective.TOKENS_PER_STEP),
        (f"{SAME_STEP_MODEL_NAME}/1", Window.PREFIX, Objective.GOODPUT),
    ],
    ids=["draft_plan", "previous_step-goodput", "previous_step-tokens", "prefix-goodput"],
)
def test_replayed_remote_policy_equals_real_decoding(
    engine: SpeculativeEngine, traces, plan_repo_template, model, window, objective
) -> None:  # type: ignore[no-untyped-def]
    """The worker's own RemotePolicy, over an in-process submitter with the predictor's
    decision and plan code, takes the same steps in the replay as in the engine (same γ,
    same dropped drafts, same fallbacks), given the same timing; the outcomes it reports
    reach the submitter step by step in both."""
    version = load_version(plan_repo_template / model)
    gammas = tuple(version.manifest.gamma_candidates)

    def policy() -> tuple[RemotePolicy, InProcessPredictor]:
        cfg = RemotePolicyConfig(
            window=window, objective=objective, plan_max_gamma=8, gamma_candidates=gammas
        )
        sub = InProcessPredictor(version, 0, calibration=[])
        return RemotePolicy(sub, cfg, FixedTiming()), sub  # type: ignore[arg-type]

    sources = set()
    for i, (ids, trace) in enumerate(traces):
        real_policy, real_sub = policy()
        real = engine.generate(ids, real_policy, max_new_tokens=MAX_NEW, request_id=f"p{i}")
        assert list(real.token_ids) == trace.output
        replay_policy, replay_sub = policy()
        replayed = replay_sequence(
            trace, replay_policy.start(SequenceInfo(f"p{i}", "fp16")), engine.config.max_gamma
        )
        assert [(s.gamma, s.drafted, s.accepted, s.kept) for s in replayed.steps] == [
            (s.gamma, s.drafted, s.accepted, len(s.token_ids)) for s in real.steps
        ]
        assert replay_sub.messages == real_sub.messages > 0
        assert replay_sub.outcomes == real_sub.outcomes == len(real.steps)
        # Predicted acceptance from signals the replay recomputes (equal to 1e-3, see above).
        np.testing.assert_allclose(
            np.asarray(replay_sub.calibration).reshape(-1, 3),
            np.asarray(real_sub.calibration).reshape(-1, 3),
            rtol=1e-3,
            atol=1e-3,
        )
        sources |= {s.decision.source for s in real.steps}
    assert DecisionSource.REMOTE in sources
    if window == Window.PREVIOUS_STEP:  # its first step has no signals yet
        assert DecisionSource.FALLBACK in sources


def test_replayed_draft_plan_drops_drafts_and_speculation(
    engine: SpeculativeEngine, traces, plan_repo_template
) -> None:  # type: ignore[no-untyped-def]
    """The draft_plan case above exercises the stop rule: drafts dropped, γ = 0 steps."""
    version = load_version(plan_repo_template / "speckv-instep" / "1")
    cfg = RemotePolicyConfig(
        window=Window.DRAFT_PLAN, objective=Objective.GOODPUT, plan_max_gamma=8
    )
    dropped = zero = 0
    for i, (_, trace) in enumerate(traces):
        seq = RemotePolicy(InProcessPredictor(version, 0), cfg, FixedTiming())  # type: ignore[arg-type]
        replayed = replay_sequence(trace, seq.start(SequenceInfo(f"p{i}", "fp16")), 16)
        dropped += sum(s.drafted - s.gamma for s in replayed.steps)
        zero += sum(s.gamma == 0 for s in replayed.steps)
    assert dropped > 0 and zero > 0


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
