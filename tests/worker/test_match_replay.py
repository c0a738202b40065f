"""batch-goodput's replay of fixed draft lengths (decode_worker/match_replay.py): the replay
over a row's observed draft/target agreement gives exactly the steps a fixed-γ run of the
same prompt makes, whatever γ the batch really ran (real tiny models, real scheduler)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from decode_worker.batching import BatchScheduler
from decode_worker.config import EngineConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.match_replay import MatchTrack, ReplayYield, replay_steps
from decode_worker.policies import FixedPolicy, GammaDecision, GammaPolicy, SequencePolicy
from tests.worker.engine_helpers import prompts, random_pair


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_replay_steps_counts_leading_matches_and_waits_for_unknown_outcomes() -> None:
    T, F = True, False
    m = [T, T, F, T, F, F, T, T, T]
    # γ = 2: (T T) + bonus → 3 tokens; (T F) → 2; (F) → 1; (T T) + bonus → 3; then nothing.
    assert replay_steps(m, 2, 0) == ([3, 2, 1, 3], 9)
    # γ = 1 and γ = 4 over the same text: other step boundaries, other outcomes.
    assert replay_steps(m, 1, 0) == ([2, 1, 2, 1, 2, 2], 10)
    tokens4, cursor4 = replay_steps(m, 4, 0)
    assert tokens4 == [3, 2, 1] and cursor4 == 6  # (T T T) from 6 may still be extended
    # More matches complete the waiting step.
    assert replay_steps([*m, F], 4, cursor4) == ([4], 10)


def test_match_track_resolves_in_order_and_waits_for_the_draft() -> None:
    track = MatchTrack(start=3, gammas=(1, 2))
    seq = [5, 6, 7, 8, 9, 10]  # prompt 5 6 7, generated 8 9 10
    track.predict(1, 7)  # inside the prompt: ignored
    track.predict(2, 8)  # predicts position 3: a match
    track.predict(4, 0)  # predicts position 5: a miss, but position 4 is not known yet
    track.resolve(seq)
    assert track.matches == [True]
    track.predict(3, 9)
    track.resolve(seq)
    assert track.matches == [True, True, False]
    track.predict(3, 9)  # resolved already: not kept
    assert track.preds == {}


def test_replay_yield_blends_towards_the_prior_and_forgets() -> None:
    y = ReplayYield([1, 2, 3, 4], decay=0.99, prior_steps=4.0)
    prior = [1.0, 1.5, 1.8, 2.0, 2.1, 2.2]
    assert y.expected(prior) == prior  # no steps yet: the prior (γ = 5 is not replayed)
    track = y.track(0)
    track.matches = [True] * 1000  # every draft accepted: γ + 1 tokens per step
    y.advance(track)
    e = y.expected(prior)
    assert e[0] == 1.0 and e[5] == prior[5]
    for g in (1, 2, 3, 4):
        assert e[g] == pytest.approx(g + 1, abs=0.15)  # 4 prior steps against ~100 (decayed)
    track.matches += [False] * 1000  # then nothing accepted: 1 token per step
    y.advance(track)
    e = y.expected(prior)
    assert all(e[g] == pytest.approx(1.0, abs=0.1) for g in (1, 2, 3, 4))
    # The matches every γ has passed are dropped (bounded memory over long rows).
    assert len(track.matches) < 300
    with pytest.raises(ValueError, match="≥ 1"):
        ReplayYield([0, 1], decay=0.99)


def test_row_expected_prices_a_row_by_its_own_text_shrunk_towards_the_pool() -> None:
    y = ReplayYield([1, 2, 3], decay=0.999, prior_steps=4.0)
    pooled = [1.0, 1.7, 2.2, 2.4, 2.5]
    fresh = y.track(0)
    assert ReplayYield.row_expected(fresh, pooled, 4.0) == pooled  # nothing replayed yet
    # Agreement that alternates true/false: γ = 1 always lands on a true (2 tokens per
    # step), γ = 2 and γ = 3 meet the false right after it (2 tokens per step as well).
    periodic = y.track(0)
    periodic.matches = [True, False] * 50
    y.advance(periodic)
    assert (periodic.steps[1], periodic.tokens[1]) == (50, 100)
    e = ReplayYield.row_expected(periodic, pooled, 4.0)
    assert e[0] == 1.0 and e[4] == pooled[4]  # γ = 4 is not replayed: the pooled value
    assert e[1] == pytest.approx((100 + 4 * 1.7) / 54)
    assert e[2] == pytest.approx((100 + 4 * 2.2) / 54)
    # The same row with little text leans on the pool.
    short = y.track(0)
    short.matches = [True, False]
    y.advance(short)
    assert ReplayYield.row_expected(short, pooled, 4.0)[1] == pytest.approx((2 + 4 * 1.7) / 5)


class _Alternate(GammaPolicy):
    """γ = 3, 0, 1, 0, 2, … in turn: the draft skips steps and catches up."""

    spec = "alternate"

    def start(self, seq: Any) -> SequencePolicy:
        class _Seq(SequencePolicy):
            def decide(self, step: int, prefix_signals: Any) -> GammaDecision:
                from decode_worker.policies import DecisionSource

                return GammaDecision([3, 0, 1, 0, 2][step % 5], DecisionSource.LOCAL)

        return _Seq()


class _Keep(BatchScheduler):
    """The real scheduler; each finished row's match track is kept for the test."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.tracks: dict[str, MatchTrack] = {}

    def _end(self, row: Any, err: BaseException | None) -> None:
        if row.track is not None:
            self.tracks[row.run.request_id] = row.track
        super()._end(row, err)


@pytest.mark.timeout(120)
def test_replay_over_a_batched_row_equals_each_fixed_gamma_run() -> None:
    pair = random_pair(seed=4, noise=0.25)
    eng = SpeculativeEngine(pair, EngineConfig(max_gamma=4))
    ps = [p[: 5 + 2 * i] for i, p in enumerate(prompts(4, length=12, seed=9))]
    policies = [FixedPolicy(1), FixedPolicy(2), _Alternate(), FixedPolicy(4)]
    sched = _Keep(eng, max_batch_size=4, max_queue=4)
    try:
        handles = [
            sched.submit(p, pol, max_new_tokens=40, request_id=f"r{i}", record=False)
            for i, (p, pol) in enumerate(zip(ps, policies, strict=True))
        ]
        for h in handles:
            for _ in h:
                pass
    finally:
        sched.close(timeout=10)
    checked = 0
    accepted_and_rejected = set()
    for i, p in enumerate(ps):
        track = sched.tracks[f"r{i}"]
        assert track.start == len(p)
        # The draft saw the true prefix before almost every generated token.
        assert len(track.matches) >= 35
        for g in (1, 2, 3, 4):
            solo = eng.generate(p, FixedPolicy(g), max_new_tokens=40)
            real = [s.accepted + 1 for s in solo.steps if s.gamma == g]
            replayed, _ = replay_steps(track.matches, g, 0)
            n = min(len(real), len(replayed))
            assert n >= len(real) - 2, (i, g)
            assert replayed[:n] == real[:n], (i, g)
            checked += n
            accepted_and_rejected |= {r == g + 1 for r in real}
    assert checked > 100 and accepted_and_rejected == {True, False}
    # The pooled replay saw the rows (no warm-up here), and prices γ from them.
    assert sched.replay.steps(2) > 10
