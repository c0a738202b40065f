"""The tiny pair builder: deterministic for a seed, cached by its manifest, loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decode_worker.tiny_pair import (
    ModelShape,
    TinyPairConfig,
    TinyPairSpec,
    ensure_tiny_pair,
    read_manifest,
)

# A miniature spec: seconds to build, but every stage (tokenizer, target, distillation,
# metrics, save, load-back) runs for real.
MINI = TinyPairSpec(
    code_chars=30_000,
    vocab_size=320,
    seq_len=32,
    batch_size=4,
    target=ModelShape(hidden=32, layers=2, heads=2, intermediate=64),
    draft=ModelShape(hidden=16, layers=1, heads=2, intermediate=32),
    target_steps=8,
    target_lr=3e-3,
    draft_steps=6,
    draft_lr=3e-3,
    eval_windows=4,
    eval_prompts=2,
    eval_new_tokens=6,
)


def _mini(out: Path, seed: int = 0, force: bool = False) -> TinyPairConfig:
    return TinyPairConfig(
        out=out, size="mini", seed=seed, threads=1, progress=False, force=force, spec_override=MINI
    )


@pytest.fixture(scope="module")
def mini_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_pair(_mini(tmp_path_factory.mktemp("a") / "pair")).root


def test_same_seed_gives_identical_weights_and_tokenizer(mini_a: Path, tmp_path: Path) -> None:
    b = ensure_tiny_pair(_mini(tmp_path / "pair"))
    a_manifest = read_manifest(mini_a)
    assert a_manifest is not None
    assert a_manifest["weights_sha256"] == b.manifest["weights_sha256"]
    for role in ("draft", "target"):
        assert (mini_a / role / "tokenizer.json").read_bytes() == (
            b.root / role / "tokenizer.json"
        ).read_bytes()


def test_another_seed_gives_other_weights(mini_a: Path, tmp_path: Path) -> None:
    c = ensure_tiny_pair(_mini(tmp_path / "pair", seed=1))
    a_manifest = read_manifest(mini_a)
    assert a_manifest is not None
    assert a_manifest["weights_sha256"]["target"] != c.manifest["weights_sha256"]["target"]
    assert a_manifest["weights_sha256"]["draft"] != c.manifest["weights_sha256"]["draft"]


def test_matching_cache_is_reused_and_force_or_other_seed_rebuilds(tmp_path: Path) -> None:
    out = tmp_path / "pair"
    first = ensure_tiny_pair(_mini(out))
    assert not first.reused
    weights = out / "target" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = ensure_tiny_pair(_mini(out))
    assert again.reused
    assert weights.stat().st_mtime_ns == stamp
    assert again.manifest == first.manifest
    forced = ensure_tiny_pair(_mini(out, force=True))
    assert not forced.reused
    other = ensure_tiny_pair(_mini(out, seed=3))
    assert not other.reused
    assert read_manifest(out)["key"]["seed"] == 3  # type: ignore[index]


def test_a_changed_spec_invalidates_the_cache(tmp_path: Path) -> None:
    import dataclasses

    out = tmp_path / "pair"
    ensure_tiny_pair(_mini(out))
    changed = dataclasses.replace(MINI, target_steps=MINI.target_steps + 1)
    rebuilt = ensure_tiny_pair(
        TinyPairConfig(out=out, size="mini", threads=1, progress=False, spec_override=changed)
    )
    assert not rebuilt.reused


def test_manifest_carries_the_measured_numbers(mini_a: Path) -> None:
    m = json.loads((mini_a / "manifest.json").read_text())
    assert set(m["key"]) == {"builder_version", "size", "seed", "spec_hash", "corpus_hash"}
    metrics = m["metrics"]
    for name in ("agreement_teacher_forced_heldout", "agreement_target_generated"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["draft_ms_per_token"] > 0 and metrics["target_ms_per_token"] > 0
    assert metrics["cost_ratio_draft_over_target"] == pytest.approx(
        metrics["draft_ms_per_token"] / metrics["target_ms_per_token"], rel=0.01
    )
    assert m["corpus"]["heldout_documents"] > 0 and m["corpus"]["train_documents"] > 0
    assert m["parameters"]["target"] > m["parameters"]["draft"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_tiny_pair(_mini(out))
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_reuses_the_cached_pair(mini_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decode_worker.cli import main

    # The CLI only knows the named sizes; a cached `test` pair is what the fixture built.
    del mini_a
    from tests.conftest import TINY_PAIR_CACHE

    if read_manifest(TINY_PAIR_CACHE) is None:
        pytest.skip("the session's test pair is not built yet")
    assert main(["tiny-pair", "--out", str(TINY_PAIR_CACHE), "--size", "test", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused cached pair" in out
    assert "greedy agreement" in out and "ratio" in out


def test_the_test_size_pair_is_aligned(tiny_pair_dir: Path) -> None:
    """The shared test pair is good enough for speculation to accept drafts."""
    m = read_manifest(tiny_pair_dir)
    assert m is not None and m["size"] == "test"
    assert m["metrics"]["agreement_teacher_forced_heldout"] >= 0.4
    assert m["metrics"]["agreement_target_generated"] >= 0.5


def test_a_killed_build_leaves_no_staging_behind(tmp_path: Path) -> None:
    dead = tmp_path / ".pair.building-4194399"  # above Linux's pid_max: no such process
    dead.mkdir()
    (dead / "partial").write_text("x")
    ensure_tiny_pair(_mini(tmp_path / "pair"))
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
