"""benchmarks/batch.py's round bookkeeping, without a model: how a level's requests split
into rounds, the rotated arm order, and the batch-goodput / generate ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BATCH = Path(__file__).resolve().parents[2] / "benchmarks" / "batch.py"


@pytest.fixture(scope="module")
def batch() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_batch", BATCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("n", "clients", "rounds", "sizes"),
    [
        (12, 1, 3, [4, 4, 4]),
        (13, 2, 3, [5, 4, 4]),
        (16, 8, 3, [8, 8]),  # 16 < 3 × 8: two rounds of 8
        (32, 16, 3, [16, 16]),
        (12, 16, 3, [12]),  # fewer requests than clients: one round
        (24, 4, 1, [24]),
    ],
)
def test_split_rounds(
    batch: ModuleType, n: int, clients: int, rounds: int, sizes: list[int]
) -> None:
    got = batch.split_rounds(n, clients, rounds)
    assert [len(r) for r in got] == sizes
    assert [i for r in got for i in r] == list(range(n))  # every request once, in order


def test_rotated(batch: ModuleType) -> None:
    arms = ["a", "b", "c"]
    assert [batch.rotated(arms, k) for k in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_ratios(batch: ModuleType) -> None:
    levels = {
        "batched batch-goodput": {"tokens_per_s": 90.0, "round_tokens_per_s": [80.0, 100.0]},
        "batched fixed:2": {"tokens_per_s": 100.0, "round_tokens_per_s": [100.0, 100.0]},
        "interleaved heuristic": {"tokens_per_s": 50.0, "round_tokens_per_s": [50.0, 50.0]},
        "generate (batched, no speculation)": {
            "tokens_per_s": 50.0,
            "round_tokens_per_s": [50.0, 50.0],
        },
    }
    batch.ratios(levels)
    gp = levels["batched batch-goodput"]
    assert gp["vs_fixed"] == {"batched fixed:2": 0.9}
    assert gp["vs_fixed_rounds"] == {"batched fixed:2": [0.8, 1.0]}
    best = levels["generate (batched, no speculation)"]["best_batched_vs_generate"]
    assert best == {"arm": "batched fixed:2", "ratio": 2.0}
