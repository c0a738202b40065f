"""Draft signals against a hand computation and a direct (uncached) draft forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decode_worker.config import EngineConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.features import aggregate, token_signals
from decode_worker.policies import FixedPolicy
from tests.worker.engine_helpers import prompts, random_pair


def test_hand_checked_step() -> None:
    # Token 1: p = (1/2, 1/4, 1/4) → H = 1.5 bits, c = 0.5.
    # Token 2: p = (1, 0, 0) (masked logits) → H = 0 bits, c = 1.
    logits = torch.tensor(
        [
            [math.log(0.5), math.log(0.25), math.log(0.25)],
            [0.0, float("-inf"), float("-inf")],
        ]
    )
    toks = token_signals(logits)
    assert toks[0].entropy_bits == pytest.approx(1.5, abs=1e-6)
    assert toks[0].confidence == pytest.approx(0.5, abs=1e-6)
    assert toks[1].entropy_bits == pytest.approx(0.0, abs=1e-6)
    assert toks[1].confidence == pytest.approx(1.0, abs=1e-6)
    step = aggregate(toks)
    assert step.mean_draft_entropy == pytest.approx(0.75, abs=1e-6)
    assert step.mean_draft_confidence == pytest.approx(0.75, abs=1e-6)
    assert step.max_draft_entropy == pytest.approx(1.5, abs=1e-6)
    assert step.min_draft_confidence == pytest.approx(0.5, abs=1e-6)


def test_uniform_entropy_is_log2_vocab() -> None:
    toks = token_signals(torch.zeros(1, 1024))
    assert toks[0].entropy_bits == pytest.approx(10.0, abs=1e-4)
    assert toks[0].confidence == pytest.approx(1 / 1024, rel=1e-5)


def test_aggregate_refuses_an_empty_step() -> None:
    with pytest.raises(ValueError, match="without drafted tokens"):
        aggregate([])


def test_engine_signals_equal_a_direct_uncached_computation() -> None:
    torch.set_num_threads(1)
    pair = random_pair(seed=2, noise=0.2)
    engine = SpeculativeEngine(pair, EngineConfig())
    prompt = prompts(1, seed=4)[0]
    result = engine.generate(prompt, FixedPolicy(4), max_new_tokens=5)
    step = result.steps[0]
    assert step.gamma == 4 and len(step.token_signals) == 4
    # The drafted tokens we know are the accepted ones; check each position they fix.
    known = list(step.token_ids[: step.accepted])
    for i in range(len(known) + 1 if step.accepted < 4 else 4):
        ids = torch.tensor([prompt + known[:i]])
        with torch.no_grad():
            logits = pair.draft(input_ids=ids).logits[0, -1].double().numpy()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        h = float(-(p * np.log2(np.where(p > 0, p, 1.0))).sum())
        assert step.token_signals[i].entropy_bits == pytest.approx(h, abs=1e-4)
        assert step.token_signals[i].confidence == pytest.approx(float(p.max()), abs=1e-5)
    agg = aggregate(step.token_signals)
    assert step.signals == agg
