"""Shared worker fixtures: the real tiny pair, built once per cache and loaded per compression."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from decode_worker.pair import LoadedPair, PairConfig, load_pair
from decode_worker.tiny_pair import TinyPairConfig, ensure_tiny_pair

REPO = Path(__file__).resolve().parents[2]
TINY_PAIR_CACHE = REPO / ".cache" / "tiny-pair" / "test-seed0"


@pytest.fixture(scope="session")
def tiny_pair_dir() -> Path:
    """The `test`-size pair (DIR/draft, DIR/target); built on first use, then reused."""
    pair = ensure_tiny_pair(
        TinyPairConfig(out=TINY_PAIR_CACHE, size="test", seed=0, progress=False)
    )
    return pair.root


@pytest.fixture(scope="session")
def loaded_pair(tiny_pair_dir: Path) -> Callable[[str], LoadedPair]:
    """`loaded_pair("fp16"|"int8"|"nf4")` loads the tiny pair on CPU once per compression."""
    cache: dict[str, LoadedPair] = {}

    def load(compression: str = "fp16") -> LoadedPair:
        if compression not in cache:
            cache[compression] = load_pair(
                PairConfig(
                    draft=str(tiny_pair_dir / "draft"),
                    target=str(tiny_pair_dir / "target"),
                    compression=compression,
                    device="cpu",
                )
            )
        return cache[compression]

    return load
