"""What a tiny-pair folder says about itself: `DIR/tiny-pair.json`, schema `speckv.tiny-pair/1`.

`speckv-tiny-pair` (the `speckv_tinypair` package, which is not in the worker image) writes it
last, so a folder with it is a finished pair: `DIR/target/`, `DIR/draft/` and this manifest
of how they were built and what they measured. It is read here, not in the builder, because
readers run where the builder is not installed: every speckv-eval results file records which
pair it ran on (`pair_fingerprint`), and the worker image ships speckv_eval. Stdlib only; the
worker itself never needs it to serve.

Pair folders built before the schema existed hold the same content as `DIR/manifest.json`
with `"format": 1` (a name the predictor's model repository also uses for something else).
`read_manifest` reads those too, and the builder writes `tiny-pair.json` beside such a folder's
`manifest.json` when it reuses it (docs/tiny-pair.md, "Older pair folders").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "speckv.tiny-pair/1"
MANIFEST_NAME = "tiny-pair.json"
LEGACY_MANIFEST_NAME = "manifest.json"
LEGACY_FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A tiny-pair manifest that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PairKey:
    """What decides the weights: a cached pair is reused only when its key equals the wanted one."""

    builder_version: int
    size: str
    seed: int
    spec_hash: str  # sha256 prefix of the builder's spec (model shapes, steps, learning rates)
    corpus_hash: str  # sha256 prefix of the training and held-out texts


@dataclass(frozen=True)
class PairMetrics:
    """Measured by the builder on held-out text, float32 on its CPU (docs/tiny-pair.md)."""

    agreement_teacher_forced_heldout: float
    agreement_target_generated: float
    draft_ms_per_token: float
    target_ms_per_token: float
    target_ms_verify_5_tokens: float
    cost_ratio_draft_over_target: float
    measured_with: str


@dataclass(frozen=True)
class WeightsSha256:
    """sha256 of each model's `model.safetensors`."""

    target: str
    draft: str


@dataclass(frozen=True)
class ParameterCounts:
    target: int
    draft: int


@dataclass(frozen=True)
class TinyPairManifest:
    """The manifest, typed. `spec`, `corpus`, `training` and `build` are recorded as the builder
    wrote them (the key's hashes are what reuse compares); the rest is checked on read."""

    key: PairKey
    size: str
    seed: int
    weights_sha256: WeightsSha256
    parameters: ParameterCounts
    metrics: PairMetrics
    tokenizer: dict[str, int]  # vocab_size, pad, bos, eos
    spec: dict[str, Any]
    corpus: dict[str, Any]
    training: dict[str, float]
    build: dict[str, Any]  # seconds, threads, library versions, CPU; pairs grow fields over time

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What tells one built pair from another: weights, measured quality and cost, and what
        it was built with. Pairs built before fingerprints existed have no CPU recorded."""
        return {
            "weights": weights_id(self.weights_sha256.target, self.weights_sha256.draft),
            "agreement_teacher_forced_heldout": self.metrics.agreement_teacher_forced_heldout,
            "agreement_target_generated": self.metrics.agreement_target_generated,
            "cost_ratio_draft_over_target": self.metrics.cost_ratio_draft_over_target,
            "torch": self.build.get("torch"),
            "cpu": self.build.get("cpu"),
            "cpu_capability": self.build.get("cpu_capability"),
            "size": self.size,
            "seed": self.seed,
            "corpus_hash": self.key.corpus_hash,
        }

    def to_json(self) -> dict[str, Any]:
        """The file's content: the schema, every field, and the (derived) fingerprint."""
        data = {"schema": SCHEMA, **dataclasses.asdict(self)}
        data["fingerprint"] = self.fingerprint
        return data

    @classmethod
    def from_json(cls, data: Any, source: str | Path, *, legacy: bool = False) -> TinyPairManifest:
        """Validate and type `data` read from `source`; `legacy` is a pre-schema manifest.json.

        Raises ManifestError naming `source` and the first field that is missing or wrong.
        """
        where = str(source)
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if legacy:
            if data.get("format") != LEGACY_FORMAT:
                raise ManifestError(
                    f"{where}: field 'format' is {data.get('format')!r}, expected "
                    f"{LEGACY_FORMAT}: not a tiny-pair manifest (a model repository's "
                    "manifest.json is something else)"
                )
        elif data.get("schema") != SCHEMA:
            raise ManifestError(
                f"{where}: field 'schema' is {data.get('schema')!r}, expected {SCHEMA!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)} | {"fingerprint"}
        known.add("format" if legacy else "schema")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r} for {SCHEMA}")
        r = _Reader(where)
        key = r.obj(data, "key")
        metrics = r.obj(data, "metrics")
        weights = r.obj(data, "weights_sha256")
        params = r.obj(data, "parameters")
        tokenizer = r.obj(data, "tokenizer")
        manifest = cls(
            key=PairKey(
                builder_version=r.integer(key, "key.builder_version"),
                size=r.text(key, "key.size"),
                seed=r.integer(key, "key.seed"),
                spec_hash=r.text(key, "key.spec_hash"),
                corpus_hash=r.text(key, "key.corpus_hash"),
            ),
            size=r.text(data, "size"),
            seed=r.integer(data, "seed"),
            weights_sha256=WeightsSha256(
                target=r.sha256(weights, "weights_sha256.target"),
                draft=r.sha256(weights, "weights_sha256.draft"),
            ),
            parameters=ParameterCounts(
                target=r.integer(params, "parameters.target", minimum=1),
                draft=r.integer(params, "parameters.draft", minimum=1),
            ),
            metrics=PairMetrics(
                agreement_teacher_forced_heldout=r.share(
                    metrics, "metrics.agreement_teacher_forced_heldout"
                ),
                agreement_target_generated=r.share(metrics, "metrics.agreement_target_generated"),
                draft_ms_per_token=r.positive(metrics, "metrics.draft_ms_per_token"),
                target_ms_per_token=r.positive(metrics, "metrics.target_ms_per_token"),
                target_ms_verify_5_tokens=r.positive(metrics, "metrics.target_ms_verify_5_tokens"),
                cost_ratio_draft_over_target=r.positive(
                    metrics, "metrics.cost_ratio_draft_over_target"
                ),
                measured_with=r.text(metrics, "metrics.measured_with"),
            ),
            tokenizer={
                name: r.integer(tokenizer, f"tokenizer.{name}")
                for name in ("vocab_size", "pad", "bos", "eos")
            },
            spec=r.obj(data, "spec"),
            corpus=r.obj(data, "corpus"),
            training=r.obj(data, "training"),
            build=r.obj(data, "build"),
        )
        for name in ("size", "seed"):
            if getattr(manifest.key, name) != getattr(manifest, name):
                raise ManifestError(
                    f"{where}: field 'key.{name}' is {getattr(manifest.key, name)!r} but "
                    f"field '{name}' is {getattr(manifest, name)!r}"
                )
        return manifest


class _Reader:
    """Typed field access that names the file and the dotted field in every error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _get(self, obj: dict[str, Any], field: str) -> Any:
        name = field.rsplit(".", 1)[-1]
        if name not in obj:
            raise ManifestError(f"{self.where}: missing field {field!r}")
        return obj[name]

    def _wrong(self, field: str, value: Any, expected: str) -> ManifestError:
        return ManifestError(f"{self.where}: field {field!r} is {value!r}, expected {expected}")

    def obj(self, obj: dict[str, Any], field: str) -> dict[str, Any]:
        value = self._get(obj, field)
        if not isinstance(value, dict):
            raise self._wrong(field, value, "an object")
        return value

    def text(self, obj: dict[str, Any], field: str) -> str:
        value = self._get(obj, field)
        if not isinstance(value, str) or not value:
            raise self._wrong(field, value, "a non-empty string")
        return value

    def integer(self, obj: dict[str, Any], field: str, minimum: int = 0) -> int:
        value = self._get(obj, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._wrong(field, value, f"an integer ≥ {minimum}")
        return value

    def _number(self, obj: dict[str, Any], field: str) -> float | None:
        value = self._get(obj, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            return None
        return float(value)

    def share(self, obj: dict[str, Any], field: str) -> float:
        value = self._number(obj, field)
        if value is None or not 0.0 <= value <= 1.0:
            raise self._wrong(field, obj[field.rsplit(".", 1)[-1]], "a number in [0, 1]")
        return value

    def positive(self, obj: dict[str, Any], field: str) -> float:
        value = self._number(obj, field)
        if value is None or not value > 0.0:
            raise self._wrong(field, obj[field.rsplit(".", 1)[-1]], "a number > 0")
        return value

    def sha256(self, obj: dict[str, Any], field: str) -> str:
        value = self._get(obj, field)
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise self._wrong(field, value, "64 lower-case hex digits (sha256)")
        return value


def manifest_file(root: str | Path) -> Path | None:
    """The manifest a pair folder has: `tiny-pair.json`, else a legacy `manifest.json`."""
    root = Path(root)
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        if (root / name).is_file():
            return root / name
    return None


def read_manifest(root: str | Path) -> TinyPairManifest | None:
    """The pair folder's manifest, or None when it has none.

    A manifest that is there but unreadable or invalid is an error (ManifestError naming the
    file and the field), never taken for "no manifest".
    """
    path = manifest_file(root)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: not readable as JSON: {err}") from err
    return TinyPairManifest.from_json(data, path, legacy=path.name == LEGACY_MANIFEST_NAME)


def write_manifest(root: str | Path, manifest: TinyPairManifest) -> Path:
    """Write `root/tiny-pair.json` atomically (a reader never sees half a file)."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- fingerprint


def weights_id(target_sha256: str, draft_sha256: str) -> str:
    """16 hex digits naming one pair of weights files (sha256 over both files' sha256)."""
    blob = f"target {target_sha256}\ndraft {draft_sha256}\n".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pair_fingerprint(draft: str | Path, target: str | Path) -> dict[str, Any]:
    """The fingerprint of the pair a run used, for its results file.

    The weights id is computed from the files themselves; the measured numbers come from
    the tiny-pair manifest beside them and are left out when that manifest is missing,
    invalid, or describes other weights (a hub model, a pair rebuilt by hand).
    """
    d, t = Path(draft), Path(target)
    files = (t / "model.safetensors", d / "model.safetensors")
    if not all(f.is_file() for f in files):
        return {"weights": None, "note": f"no local model.safetensors for {target} / {draft}"}
    actual = weights_id(_sha256(files[0]), _sha256(files[1]))
    if d.parent.resolve() != t.parent.resolve():
        return {"weights": actual, "note": "no tiny-pair manifest beside the models"}
    try:
        manifest = read_manifest(d.parent)
    except ManifestError as err:
        return {"weights": actual, "note": f"tiny-pair manifest not used: {err}"}
    if manifest is None:
        return {"weights": actual, "note": "no tiny-pair manifest beside the models"}
    fingerprint = manifest.fingerprint
    if fingerprint["weights"] != actual:
        return {"weights": actual, "note": "the manifest describes other weights; not used"}
    return fingerprint


def format_fingerprint(fp: dict[str, Any]) -> str:
    """One line: `pair 1a2b...: agreement 0.634 held-out / 0.739 generated, ...`."""
    if "agreement_target_generated" not in fp:
        return f"pair {fp.get('weights') or 'unknown'}: {fp.get('note', 'no fingerprint')}"
    return (
        f"pair {fp['weights']}: agreement {fp['agreement_teacher_forced_heldout']:.3f} held-out"
        f" / {fp['agreement_target_generated']:.3f} generated, cost ratio "
        f"{fp['cost_ratio_draft_over_target']:.3f}, torch {fp['torch']}, "
        f"CPU {fp['cpu'] or 'not recorded'}"
        + (f" ({fp['cpu_capability']})" if fp.get("cpu_capability") else "")
    )
