"""The tiny pair builder (`speckv_tinypair`): deterministic for a seed, cached by its manifest
(`tiny-pair.json`, or an older folder's `manifest.json`), loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from speckv_tinypair.builder import ModelShape, TinyPairConfig, TinyPairSpec, ensure_tiny_pair

from decode_worker.pair_manifest import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    SCHEMA,
    ManifestError,
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
    assert a_manifest.weights_sha256 == b.manifest.weights_sha256
    for role in ("draft", "target"):
        assert (mini_a / role / "tokenizer.json").read_bytes() == (
            b.root / role / "tokenizer.json"
        ).read_bytes()


def test_another_seed_gives_other_weights(mini_a: Path, tmp_path: Path) -> None:
    c = ensure_tiny_pair(_mini(tmp_path / "pair", seed=1))
    a_manifest = read_manifest(mini_a)
    assert a_manifest is not None
    assert a_manifest.weights_sha256.target != c.manifest.weights_sha256.target
    assert a_manifest.weights_sha256.draft != c.manifest.weights_sha256.draft


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
    rebuilt = read_manifest(out)
    assert rebuilt is not None and rebuilt.key.seed == 3


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
    assert not (mini_a / LEGACY_MANIFEST_NAME).exists()  # new pairs write tiny-pair.json only
    m = json.loads((mini_a / MANIFEST_NAME).read_text())
    assert m["schema"] == SCHEMA == "speckv.tiny-pair/1"
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


def test_cli_reuses_the_cached_pair(
    tiny_pair_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from speckv_tinypair.cli import main

    # The CLI only knows the named sizes; the cached `test` pair is what the fixture built.
    weights = tiny_pair_dir / "target" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(["--out", str(tiny_pair_dir), "--size", "test", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused cached pair" in out
    assert "greedy agreement" in out and "ratio" in out
    assert weights.stat().st_mtime_ns == stamp


def test_the_test_size_pair_is_aligned(tiny_pair_dir: Path) -> None:
    """The shared test pair is good enough for speculation to accept drafts."""
    m = read_manifest(tiny_pair_dir)
    assert m is not None and m.size == "test"
    assert m.metrics.agreement_teacher_forced_heldout >= 0.4
    assert m.metrics.agreement_target_generated >= 0.5


def test_a_killed_build_leaves_no_staging_behind(tmp_path: Path) -> None:
    dead = tmp_path / ".pair.building-4194399"  # above Linux's pid_max: no such process
    dead.mkdir()
    (dead / "partial").write_text("x")
    ensure_tiny_pair(_mini(tmp_path / "pair"))
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]


# --- issue 12, item 11: the same pair on another machine, or a fingerprint that says not ---

# Corpus digests as the builder computed them from CPython 3.11.7's own files before the
# snapshot existed (MINI, `test`, `demo`): the snapshot must give exactly these.
PINNED_CORPUS = {
    30_000: "a1d9071c28199044",
    400_000: "869071ac1580bbff",
    2_000_000: "17855064916b9235",
}


def test_corpus_comes_from_the_shipped_snapshot_not_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another interpreter (here: an empty stdlib and no pydoc topics) gives the same corpus."""
    import sys
    import sysconfig
    import types

    import speckv_tinypair.corpus as corpus

    empty = tmp_path / "stdlib"
    empty.mkdir()
    real_get_paths = sysconfig.get_paths
    monkeypatch.setattr(
        sysconfig, "get_paths", lambda *a, **k: {**real_get_paths(*a, **k), "stdlib": str(empty)}
    )
    fake_topics = types.ModuleType("pydoc_data.topics")
    fake_topics.topics = {}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", fake_topics)
    for code_chars, digest in PINNED_CORPUS.items():
        assert corpus.load_corpus(code_chars).digest() == digest


def test_corpus_snapshot_is_small_and_ships_its_license() -> None:
    from speckv_tinypair.corpus import SNAPSHOT, read_snapshot

    assert SNAPSHOT.stat().st_size < 3 * 1024 * 1024
    assert (
        "PYTHON SOFTWARE FOUNDATION LICENSE" in (SNAPSHOT.parent / "PYTHON-LICENSE.txt").read_text()
    )
    assert read_snapshot()["python"] == "3.11.7"


def test_the_build_runs_with_deterministic_algorithms_and_restores_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import speckv_tinypair.builder as tp
    import torch

    seen: list[bool] = []
    real_train = tp._train

    def spy(*args: object, **kwargs: object) -> float:
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tp, "_train", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    pair = ensure_tiny_pair(_mini(tmp_path / "pair"))
    assert seen == [True, True]  # target, then draft
    assert not torch.are_deterministic_algorithms_enabled()
    assert pair.manifest.build["deterministic_algorithms"] is True


def test_manifest_fingerprint_names_weights_quality_cost_and_machine(mini_a: Path) -> None:
    import torch

    from decode_worker.pair_manifest import pair_fingerprint, weights_id

    m = read_manifest(mini_a)
    assert m is not None
    fp = m.fingerprint
    assert json.loads((mini_a / MANIFEST_NAME).read_text())["fingerprint"] == fp
    assert fp["weights"] == weights_id(m.weights_sha256.target, m.weights_sha256.draft)
    assert fp["agreement_target_generated"] == m.metrics.agreement_target_generated
    assert fp["cost_ratio_draft_over_target"] == m.metrics.cost_ratio_draft_over_target
    assert fp["torch"] == torch.__version__
    assert fp["cpu"] and fp["cpu"] != "unknown"
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # What a results file records: computed from the files, the same as the manifest's.
    assert pair_fingerprint(mini_a / "draft", mini_a / "target") == fp


def test_pair_fingerprint_does_not_vouch_for_other_weights(mini_a: Path, tmp_path: Path) -> None:
    import shutil

    from decode_worker.pair_manifest import format_fingerprint, pair_fingerprint

    copy = tmp_path / "pair"
    shutil.copytree(mini_a, copy)
    weights = copy / "draft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    fp = pair_fingerprint(copy / "draft", copy / "target")
    assert fp["weights"] is not None and "agreement_target_generated" not in fp
    assert "other weights" in format_fingerprint(fp)
    assert pair_fingerprint(tmp_path / "nope", tmp_path / "nope2")["weights"] is None


def test_cli_and_benchmarks_print_and_record_the_fingerprint(mini_a: Path, tmp_path: Path) -> None:
    """`make demo` prints it; `speckv-eval log-steps` records it in its JSON."""
    from speckv_eval.log_steps import LogConfig, log_steps
    from speckv_eval.services import format_pair_fingerprint

    m = read_manifest(mini_a)
    assert m is not None
    line = format_pair_fingerprint(m.fingerprint)
    assert line.startswith(f"pair {m.fingerprint['weights']}: agreement ")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "p1", "task": "code", "prompt": "def f(x):\n    return"}) + "\n"
    )
    result = log_steps(
        LogConfig(
            draft=str(mini_a / "draft"),
            target=str(mini_a / "target"),
            prompts=prompts,
            out=tmp_path / "steps.csv",
            exclude=(),
            gammas=(2,),
            compressions=("fp16",),
            max_new_tokens=4,
            threads=1,
            progress=False,
        )
    )
    assert result["pair_fingerprint"] == m.fingerprint


# --- issue 13: the builder's own manifest name and schema; older pair folders keep working ---


def _as_legacy(pair: Path, dest: Path) -> Path:
    """A copy of `pair` as builders before `tiny-pair.json` left it: the same content in
    `manifest.json` with `"format": 1`, no schema and no stored fingerprint."""
    import shutil

    shutil.copytree(pair, dest)
    data = json.loads((dest / MANIFEST_NAME).read_text())
    (dest / MANIFEST_NAME).unlink()
    del data["schema"], data["fingerprint"]
    data["format"] = 1
    (dest / LEGACY_MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dest


def test_a_legacy_manifest_json_folder_is_read_and_reused(mini_a: Path, tmp_path: Path) -> None:
    legacy = _as_legacy(mini_a, tmp_path / "pair")
    legacy_bytes = (legacy / LEGACY_MANIFEST_NAME).read_bytes()
    weights = legacy / "target" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    expected = read_manifest(mini_a)

    assert read_manifest(legacy) == expected
    pair = ensure_tiny_pair(_mini(legacy))
    assert pair.reused and pair.manifest == expected
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt
    # Migrated: tiny-pair.json written beside it, the old file left as it was.
    assert (legacy / LEGACY_MANIFEST_NAME).read_bytes() == legacy_bytes
    migrated = json.loads((legacy / MANIFEST_NAME).read_text())
    assert migrated == json.loads((mini_a / MANIFEST_NAME).read_text())
    assert read_manifest(legacy) == expected
    again = ensure_tiny_pair(_mini(legacy))
    assert again.reused and weights.stat().st_mtime_ns == stamp


def test_a_legacy_folder_with_another_key_is_rebuilt_like_any_stale_pair(
    mini_a: Path, tmp_path: Path
) -> None:
    legacy = _as_legacy(mini_a, tmp_path / "pair")
    rebuilt = ensure_tiny_pair(_mini(legacy, seed=5))
    assert not rebuilt.reused and rebuilt.manifest.key.seed == 5
    # The old manifest.json went with the old weights.
    assert {p.name for p in legacy.iterdir()} == {"draft", "target", MANIFEST_NAME}


def _edit_manifest(pair: Path, edit: object) -> Path:
    path = pair / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "says"),
    [
        (lambda m: m.update(schema="speckv.tiny-pair/2"), "'schema'", "speckv.tiny-pair/1"),
        (
            lambda m: m["metrics"].update(agreement_target_generated=1.5),
            "'metrics.agreement_target_generated'",
            "in [0, 1]",
        ),
        (lambda m: m["key"].pop("corpus_hash"), "missing field 'key.corpus_hash'", ""),
        (lambda m: m["weights_sha256"].update(draft="abc"), "'weights_sha256.draft'", "sha256"),
        (lambda m: m["parameters"].update(target="7M"), "'parameters.target'", "integer"),
        (lambda m: m.update(seed=True), "'seed'", "integer"),
        (lambda m: m.update(sizes="demo"), "unknown field 'sizes'", ""),
        (lambda m: m["key"].update(seed=9), "'key.seed' is 9 but field 'seed' is 0", ""),
    ],
)
def test_an_invalid_tiny_pair_json_is_an_error_naming_the_file_and_the_field(
    mini_a: Path, tmp_path: Path, edit: object, field: str, says: str
) -> None:
    import shutil

    pair = tmp_path / "pair"
    shutil.copytree(mini_a, pair)
    path = _edit_manifest(pair, edit)
    with pytest.raises(ManifestError) as err:
        read_manifest(pair)
    assert str(err.value).startswith(f"{path}: ")
    assert field in str(err.value) and says in str(err.value)
    # The builder neither reuses nor rebuilds over it: the folder is left for a person to see.
    weights = pair / "target" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    with pytest.raises(ManifestError, match=field.replace("[", r"\[")):
        ensure_tiny_pair(_mini(pair))
    assert weights.stat().st_mtime_ns == stamp


def test_a_manifest_json_that_is_not_a_tiny_pair_manifest_is_refused(tmp_path: Path) -> None:
    """A model repository's manifest.json (another schema) is never taken for a pair."""
    folder = tmp_path / "pair"
    folder.mkdir()
    path = folder / LEGACY_MANIFEST_NAME
    path.write_text(json.dumps({"name": "speckv-mlp16", "version": 1, "window": "same_step"}))
    with pytest.raises(ManifestError, match=r"manifest\.json: field 'format' is None"):
        read_manifest(folder)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not readable as JSON"):
        read_manifest(folder)
    assert read_manifest(tmp_path) is None  # no manifest at all: None, not an error


def test_the_cli_reports_an_invalid_manifest_and_exits_2(
    mini_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from speckv_tinypair.cli import main

    pair = tmp_path / "pair"
    shutil.copytree(mini_a, pair)
    path = _edit_manifest(pair, lambda m: m["metrics"].pop("measured_with"))
    assert main(["--out", str(pair), "--size", "test", "--quiet"]) == 2
    assert f"error: {path}: missing field 'metrics.measured_with'" in capsys.readouterr().err


def test_speckv_worker_no_longer_builds_pairs_and_says_where_the_builder_went(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from decode_worker.cli import build_parser, main

    assert main(["tiny-pair", "--size", "test"]) == 2
    assert "speckv-tiny-pair" in capsys.readouterr().err
    assert "speckv-tiny-pair" in (build_parser().epilog or "")
