"""Local gamma policies, policy specs, and the timing model behind goodput."""

from __future__ import annotations

import pytest

from decode_worker.policies import (
    DecisionSource,
    FixedPolicy,
    HeuristicPolicy,
    PolicyError,
    SequenceInfo,
    parse_local_policy,
)
from decode_worker.timing import TimingModel

SEQ = SequenceInfo("s", "fp16")


def test_heuristic_follows_hf_schedule() -> None:
    seq = HeuristicPolicy().start(SEQ)
    trace = []
    # (accepted of the gamma drafted) per step
    for full in (True, True, False, False, False, False, False, True):
        d = seq.decide(len(trace), None)
        assert d.source == DecisionSource.LOCAL
        trace.append(d.gamma)
        seq.verified(len(trace) - 1, d.gamma, d.gamma if full else 0)
    assert trace == [4, 6, 8, 7, 6, 5, 4, 3]
    assert seq.decide(9, None).gamma == 5
    low = HeuristicPolicy(1).start(SEQ)
    low.verified(0, 1, 0)
    assert low.decide(1, None).gamma == 1  # never below 1


def test_heuristic_state_is_per_sequence() -> None:
    policy = HeuristicPolicy()
    a, b = policy.start(SEQ), policy.start(SEQ)
    a.verified(0, 4, 4)
    assert a.decide(1, None).gamma == 6 and b.decide(0, None).gamma == 4


@pytest.mark.parametrize(
    ("spec", "kind", "gamma"),
    [
        ("fixed:0", FixedPolicy, 0),
        ("fixed:8", FixedPolicy, 8),
        ("heuristic", HeuristicPolicy, 4),
        ("heuristic:2", HeuristicPolicy, 2),
    ],
)
def test_parse(spec: str, kind: type, gamma: int) -> None:
    policy = parse_local_policy(spec)
    assert isinstance(policy, kind) and policy.spec == spec
    assert policy.start(SEQ).decide(0, None).gamma == gamma


@pytest.mark.parametrize("spec", ["fixed", "fixed:-1", "fixed:x", "heuristic:0", "greedy", ""])
def test_parse_refuses(spec: str) -> None:
    with pytest.raises(PolicyError, match=r"policy|gamma"):
        parse_local_policy(spec)


def test_remote_spec_is_not_local() -> None:
    assert parse_local_policy("remote") is None


def test_timing_fit_recovers_a_linear_verify_cost() -> None:
    timing = TimingModel(alpha=0.2)
    assert timing.snapshot() is None
    timing.add_draft(4, 0.004)
    for _ in range(10):
        for g in (0, 2, 4, 8):
            timing.add_verify(g, 0.005 + 0.0004 * g)
    snap = timing.snapshot()
    assert snap is not None
    assert snap.draft_seconds_per_token == pytest.approx(0.001)
    assert snap.verify_base_seconds == pytest.approx(0.005, rel=1e-6)
    assert snap.verify_seconds_per_token == pytest.approx(0.0004, rel=1e-6)
    # Only one gamma from now on: the slope is kept, the intercept follows the data.
    for _ in range(200):
        timing.add_verify(4, 0.010 + 0.0004 * 4)
    snap = timing.snapshot()
    assert snap is not None
    assert snap.verify_seconds_per_token == pytest.approx(0.0004, rel=1e-3)
    assert snap.verify_base_seconds == pytest.approx(0.010, rel=1e-3)
