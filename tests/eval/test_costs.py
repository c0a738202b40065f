"""The replay's step-time model: γ = 0 is the measured one-position forward, speculative
steps follow a line fitted over γ ≥ 1 (the jump from 1 to 2 positions must not be charged
to target-only decoding)."""

from __future__ import annotations

import pytest
from speckv_eval.replay import Costs


def test_target_only_step_is_the_measured_forward() -> None:
    # 5 ms for one position, then 8 ms + 0.5 ms per drafted token: an all-γ line would
    # put γ = 0 well above 5 ms.
    verify = (0.005, *(0.008 + 0.0005 * g for g in range(1, 17)))
    c = Costs(0.001, verify)
    assert c.step(0) == pytest.approx(0.005)
    base, per_token = c.speculative_verify()
    assert base == pytest.approx(0.008) and per_token == pytest.approx(0.0005)
    assert c.step(4) == pytest.approx(4 * (0.001 + 0.0005) + 0.008)
    all_gamma_base, _ = c.linear_verify()
    assert all_gamma_base > 0.007  # what the old model charged a γ = 0 step (7.4 ms)


def test_noisy_costs_never_go_negative() -> None:
    c = Costs(0.001, (0.005, 0.009, 0.008, 0.007))  # decreasing: slope clipped at 0
    base, per_token = c.speculative_verify()
    assert per_token == 0.0 and base > 0
    assert all(c.step(g) > 0 for g in range(4))
