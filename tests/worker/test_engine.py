"""The speculative loop on small random Llama pairs: greedy equality, caches, stops."""

from __future__ import annotations

import pytest
import torch

from decode_worker.config import EngineConfig
from decode_worker.engine import FinishReason, RequestError, SpeculativeEngine
from decode_worker.policies import FixedPolicy, GammaPolicy, HeuristicPolicy
from tests.worker.engine_helpers import ForwardCounter, prompts, random_pair, target_greedy

NEW = 24


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return random_pair(seed=0, noise=0.3)


@pytest.fixture(scope="module")
def engine(pair):  # type: ignore[no-untyped-def]
    return SpeculativeEngine(pair, EngineConfig())


POLICIES: list[GammaPolicy] = [
    FixedPolicy(0),
    FixedPolicy(1),
    FixedPolicy(2),
    FixedPolicy(8),
    HeuristicPolicy(),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.spec)
def test_greedy_output_equals_target_generate(pair, engine, policy) -> None:  # type: ignore[no-untyped-def]
    accepted = drafted = 0
    for prompt in prompts(6):
        expected = target_greedy(pair.target, prompt, NEW)
        result = engine.generate(prompt, policy, max_new_tokens=NEW)
        assert list(result.token_ids) == expected, f"{policy.spec} diverged on {prompt}"
        assert result.finish_reason == FinishReason.LENGTH
        accepted += result.stats.num_accepted_tokens
        drafted += result.stats.num_draft_tokens
    if policy.spec != "fixed:0":
        # Both accepted and rejected drafts happened, so the crop path was exercised.
        assert 0 < accepted < drafted


def test_caches_follow_the_accepted_prefix_and_prompt_is_encoded_once(pair, engine) -> None:  # type: ignore[no-untyped-def]
    prompt = prompts(1, length=9, seed=5)[0]
    t_count, d_count = ForwardCounter(pair.target), ForwardCounter(pair.draft)
    try:
        result = engine.generate(prompt, FixedPolicy(4), max_new_tokens=30)
    finally:
        t_count.remove()
        d_count.remove()
    total = len(prompt)
    rejections = 0
    for step in result.steps:
        total += len(step.token_ids)
        # Target cache holds everything but the last committed token.
        assert step.target_cache_len == total - 1
        if step.accepted < step.gamma:
            rejections += 1
            assert step.draft_cache_len == total - 1
        else:
            assert step.draft_cache_len == total - 2
    assert rejections > 0
    # Independent count (forward hooks): prefill once, then γ+1 positions per verify.
    assert t_count.calls == [len(prompt) - 1] + [s.gamma + 1 for s in result.steps]
    assert d_count.calls[0] == len(prompt) - 1
    assert max(d_count.calls[1:]) <= 2  # never re-encodes the prompt
    assert sum(t_count.calls) == result.stats.target_tokens_processed
    assert sum(d_count.calls) == result.stats.draft_tokens_processed


def test_gamma_zero_steps_let_the_draft_catch_up(pair) -> None:  # type: ignore[no-untyped-def]
    """A run alternating γ=0 and γ=3 stays exact; the draft catches up in one forward."""

    class Alternate(FixedPolicy):
        def start(self, seq):  # type: ignore[no-untyped-def]
            from decode_worker.policies import DecisionSource, GammaDecision, SequencePolicy

            class S(SequencePolicy):
                def decide(self, step, prefix_signals):  # type: ignore[no-untyped-def]
                    return GammaDecision(0 if step % 3 else 3, DecisionSource.LOCAL)

            return S()

    engine = SpeculativeEngine(pair, EngineConfig())
    prompt = prompts(1, seed=9)[0]
    result = engine.generate(prompt, Alternate(0), max_new_tokens=NEW)
    assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
    assert max(s.draft_tokens_processed for s in result.steps) >= 3


def test_stops_at_eos_like_generate(pair) -> None:  # type: ignore[no-untyped-def]
    prompt = prompts(1, seed=3)[0]
    free = target_greedy(pair.target, prompt, NEW)
    eos = free[7]
    saved = pair.target.generation_config.eos_token_id
    pair.target.generation_config.eos_token_id = eos
    try:
        engine = SpeculativeEngine(pair, EngineConfig())
        result = engine.generate(prompt, FixedPolicy(4), max_new_tokens=NEW)
    finally:
        pair.target.generation_config.eos_token_id = saved
    cut = free.index(eos) + 1
    assert list(result.token_ids) == free[:cut]
    assert result.finish_reason == FinishReason.EOS


def test_max_new_tokens_is_exact_and_caps_gamma(engine) -> None:  # type: ignore[no-untyped-def]
    for n in (1, 2, 5, 9):
        result = engine.generate(prompts(1)[0], FixedPolicy(8), max_new_tokens=n)
        assert len(result.token_ids) == n
        produced = 0
        for step in result.steps:
            assert step.gamma <= n - produced - 1
            produced += len(step.token_ids)


def test_cancellation_stops_between_steps(engine) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    result = engine.generate(prompts(1)[0], FixedPolicy(2), max_new_tokens=NEW, cancelled=cancelled)
    assert result.finish_reason == FinishReason.CANCELLED
    assert 0 < len(result.token_ids) < NEW


def test_refuses_bad_requests(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError, match="empty"):
        engine.start([], FixedPolicy(2))
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.start([1, 2], FixedPolicy(2), max_new_tokens=10_000)
    with pytest.raises(RequestError, match="positions"):
        engine.start([1] * 250, FixedPolicy(2), max_new_tokens=10)
