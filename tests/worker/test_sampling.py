"""Speculative rejection sampling preserves the target distribution (chi-square, fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from decode_worker.config import EngineConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import FixedPolicy
from decode_worker.sampling import SamplingParams, make_generator, rejection_verify, warp
from tests.worker.engine_helpers import random_pair

ALPHA = 1e-3


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value; cells with tiny expectation are pooled so the test stays valid."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        assert obs[-1] == 0, "a token with zero target probability was produced"
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_rejection_rule_first_token_matches_target() -> None:
    gen = make_generator(1234)
    vocab = 6
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, vocab) * 1.5, -1)
    q = torch.softmax(torch.randn(2, vocab) * 1.5, -1)
    counts = np.zeros(vocab)
    for _ in range(8_000):
        d = [
            int(torch.multinomial(q[0], 1, generator=gen)),
            int(torch.multinomial(q[1], 1, generator=gen)),
        ]
        verdict = rejection_verify(d, q, p, gen)
        first = d[0] if verdict.accepted >= 1 else verdict.next_token
        counts[first] += 1
    assert _chi2(counts, p[0].numpy()) > ALPHA
    # The same test has power: the draft's own distribution is rejected.
    assert _chi2(counts, q[0].numpy()) < ALPHA


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert probs[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert probs[0, 2] > 0


def test_engine_two_token_distribution_matches_target() -> None:
    """Empirical joint distribution of the first two generated tokens vs the exact target one."""
    torch.set_num_threads(1)
    vocab = 5
    pair = random_pair(seed=3, noise=1.0, vocab=vocab)
    with torch.no_grad():
        pair.target.lm_head.weight.mul_(0.1)  # soften: every cell gets mass
        pair.draft.lm_head.weight.mul_(0.1)
    engine = SpeculativeEngine(pair, EngineConfig())
    temperature, top_p = 0.7, 0.9
    params = SamplingParams(temperature=temperature, top_p=top_p)
    prompt = [1, 3, 2]
    exact = np.zeros((vocab, vocab))
    with torch.no_grad():
        p1 = warp(pair.target(input_ids=torch.tensor([prompt])).logits[0, -1:], params)[0]
        for a in range(vocab):
            p2 = warp(pair.target(input_ids=torch.tensor([[*prompt, a]])).logits[0, -1:], params)[0]
            exact[a] = (p1[a] * p2).numpy()
    counts = np.zeros((vocab, vocab))
    rejected = 0
    for seed in range(1, 801):
        r = engine.generate(
            prompt,
            FixedPolicy(2),
            max_new_tokens=2,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=seed),
        )
        a, b = r.token_ids
        counts[a, b] += 1
        rejected += r.steps[0].accepted < 1
    assert rejected > 50  # the resampling path really ran
    assert counts[exact == 0].sum() == 0  # nothing outside the top-p nucleus
    assert _chi2(counts.ravel(), exact.ravel()) > ALPHA


def test_seeded_sampling_is_reproducible() -> None:
    pair = random_pair(seed=4, noise=0.5)
    engine = SpeculativeEngine(pair, EngineConfig())
    params = SamplingParams(temperature=1.0, seed=7)
    a = engine.generate([1, 2, 3], FixedPolicy(3), max_new_tokens=12, sampling=params)
    b = engine.generate([1, 2, 3], FixedPolicy(3), max_new_tokens=12, sampling=params)
    assert a.token_ids == b.token_ids
