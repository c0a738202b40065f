"""benchmarks/row_replay_offline.py's paper decoding, without a model: steps at fixed γ over
known agreement sequences, and per-row pricing beating every fixed γ on a mix of rows whose
text rewards different draft lengths (docs/design.md, "The batch's draft length")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def offline() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # it imports batch.py from beside itself
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_row_replay_offline", BENCH / "row_replay_offline.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_step_tokens_follow_the_agreement(offline: ModuleType) -> None:
    m = [True, True, False, True, True, True]
    assert offline.step_tokens(m, 0, 0) == 1
    assert offline.step_tokens(m, 0, 1) == 2  # one draft accepted
    assert offline.step_tokens(m, 0, 3) == 3  # two accepted, the third rejected
    assert offline.step_tokens(m, 3, 3) == 4  # all three accepted
    assert offline.step_tokens(m, 4, 3) is None  # m ends before the step's outcome
    assert offline.step_tokens(m, 6, 1) is None


def test_per_row_pricing_beats_every_fixed_gamma_on_rows_that_differ(
    offline: ModuleType,
) -> None:
    # Alternating agreement: γ = 1 makes 2 tokens per step, as γ = 2 does, for less; full
    # agreement: every drafted token is accepted, so the longest draft pays.
    alternating = [i % 2 == 0 for i in range(64)]
    agreeing = [True] * 64
    seqs = [alternating, agreeing] * 4
    costs = {0: 10.0, 1: 15.0, 2: 18.0, 3: 21.0}  # ms per step at one row
    pooled = offline.pooled_expected(seqs, [1, 2, 3])
    assert pooled[1] == pytest.approx(2.0)  # both kinds make 2 tokens per γ = 1 step
    fixed = {g: offline.run_batch(seqs, 1, costs, offline.fixed(g)) for g in costs}
    per_row = offline.run_batch(seqs, 1, costs, offline.per_row(pooled, costs, 4.0))
    assert per_row > 1.05 * max(fixed.values()), (per_row, fixed)
    # With both kinds in one batch of 2 the rows share G, and per-row pricing can at best
    # match the best fixed G.
    fixed2 = {g: offline.run_batch(seqs, 2, costs, offline.fixed(g)) for g in costs}
    both = offline.run_batch(seqs, 2, costs, offline.per_row(pooled, costs, 4.0))
    assert both >= 0.97 * max(fixed2.values()), (both, fixed2)
