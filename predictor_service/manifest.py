"""The model repository's manifest (format 1, docs/model-repository.md) as a typed value.

Both sides of the repository use this module: training writes a `Manifest`, the server
reads one with `load_manifest` and checks a loaded model against its `known_answers`.
It imports only the standard library and numpy so a predictor-only install can use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from speckv.draft_plan import MAX_PLAN_GAMMA, PlanAxis, check_axes
from speckv.vocabulary import (
    COMP_ENC,
    COMP_ENC_FEATURE,
    DEFAULT_GAMMA_CANDIDATES,
    DEFAULT_OBJECTIVE,
    FEATURES_BY_WINDOW,
    MODEL_WINDOWS,
    OBJECTIVES,
    WINDOW_DRAFT_PLAN,
)

# Re-exported for the decide path, which reads it from here.
from speckv.vocabulary import DRAFT_SIGNALS as DRAFT_SIGNALS

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.npz"

# The shared vocabulary (speckv.vocabulary), under the name the repository code uses.
WINDOWS = MODEL_WINDOWS
KNOWN_ANSWER_TOLERANCE = 1e-4
FITTED_ON_ALL_RECORDS = "all_records"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent; the message names key and file."""


@dataclass(frozen=True)
class OnnxSpec:
    file: str
    input_name: str
    output_name: str
    n_features: int
    dtype: str
    opset: int


@dataclass(frozen=True)
class KnownAnswer:
    features: tuple[float, ...]
    prediction: float


@dataclass(frozen=True)
class SplitMetrics:
    mse: float
    corr: float
    n_train: int
    n_test: int


@dataclass(frozen=True)
class Metrics:
    # `split` is the seed's stratified 80/20 protocol; `heldout_runs` keeps every step of a
    # test run out of training. `heldout_runs` is None only when training skipped it.
    split: SplitMetrics
    heldout_runs: SplitMetrics | None
    onnx_max_abs_diff: float


@dataclass(frozen=True)
class TrainingData:
    path: str
    sha256: str
    rows: int
    runs: int


@dataclass(frozen=True)
class PlanSpec:
    """A `draft_plan` model's grid and stop-rule settings (speckv.draft_plan)."""

    axes: tuple[PlanAxis, ...]
    max_gamma: int
    refresh_steps: int
    # Multiply the goodput stop thresholds (first token, continue); tuned on the training
    # prompts (speckv-eval tune-plan).
    first_scale: float = 1.0
    continue_scale: float = 1.0

    def feature_names(self) -> tuple[str, ...]:
        return (*(a.feature for a in self.axes), COMP_ENC_FEATURE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": [{"feature": a.feature, "edges": list(a.edges)} for a in self.axes],
            "max_gamma": self.max_gamma,
            "refresh_steps": self.refresh_steps,
            "first_scale": self.first_scale,
            "continue_scale": self.continue_scale,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    window: str
    feature_names: tuple[str, ...]
    onnx: OnnxSpec
    known_answers: tuple[KnownAnswer, ...]
    metrics: Metrics
    training_data: TrainingData
    estimator: str
    created_at: str
    libraries: Mapping[str, str] = field(default_factory=dict)
    compression_encoding: Mapping[str, int] = field(default_factory=lambda: dict(COMP_ENC))
    gamma_candidates: tuple[int, ...] = DEFAULT_GAMMA_CANDIDATES
    default_objective: str = DEFAULT_OBJECTIVE
    output_range: tuple[float, float] = (0.0, 1.0)
    known_answer_tolerance: float = KNOWN_ANSWER_TOLERANCE
    fitted_on: str = FITTED_ON_ALL_RECORDS
    format_version: int = FORMAT_VERSION
    # Present exactly when window == "draft_plan".
    plan: PlanSpec | None = None

    def known_answer_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Known-answer rows as float32 `[N, n_features]` and sklearn's predictions `[N]`."""
        x = np.asarray([ka.features for ka in self.known_answers], dtype=np.float32)
        y = np.asarray([ka.prediction for ka in self.known_answers], dtype=np.float64)
        return x.reshape(len(self.known_answers), len(self.feature_names)), y

    def to_dict(self) -> dict[str, Any]:
        def split(m: SplitMetrics | None) -> dict[str, Any] | None:
            if m is None:
                return None
            return {"mse": m.mse, "corr": m.corr, "n_train": m.n_train, "n_test": m.n_test}

        out = self._base_dict(split)
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        return out

    def _base_dict(self, split: Any) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "window": self.window,
            "feature_names": list(self.feature_names),
            "compression_encoding": dict(self.compression_encoding),
            "gamma_candidates": list(self.gamma_candidates),
            "default_objective": self.default_objective,
            "onnx": {
                "file": self.onnx.file,
                "input_name": self.onnx.input_name,
                "output_name": self.onnx.output_name,
                "n_features": self.onnx.n_features,
                "dtype": self.onnx.dtype,
                "opset": self.onnx.opset,
            },
            "output_range": list(self.output_range),
            "known_answers": [
                {"features": list(ka.features), "prediction": ka.prediction}
                for ka in self.known_answers
            ],
            "known_answer_tolerance": self.known_answer_tolerance,
            "fitted_on": self.fitted_on,
            "estimator": self.estimator,
            "metrics": {
                "split": split(self.metrics.split),
                "heldout_runs": split(self.metrics.heldout_runs),
                "onnx_max_abs_diff": self.metrics.onnx_max_abs_diff,
            },
            "training_data": {
                "path": self.training_data.path,
                "sha256": self.training_data.sha256,
                "rows": self.training_data.rows,
                "runs": self.training_data.runs,
            },
            "libraries": dict(self.libraries),
            "created_at": self.created_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write `manifest.json` into `folder` (fsynced: it is the version's commit marker)."""
        path = Path(folder) / MANIFEST_FILE
        # Validate what we are about to publish with the same rules a reader applies.
        manifest_from_dict(json.loads(self.to_json()), source=str(path))
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        return path


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest; `path` is the manifest file or its version folder.

    When the manifest lies in `<repo>/<name>/<version>/`, its `name` and `version` must match
    the folder names, so a copied or renamed version cannot masquerade as another.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    source = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"{source}: no manifest (a version folder without manifest.json is incomplete)"
        ) from None
    except OSError as e:
        raise ManifestError(f"{source}: cannot read manifest: {e}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{source}: not valid JSON: {e}") from e
    manifest = manifest_from_dict(raw, source=source)
    folder = p.parent
    if folder.name.isdigit():
        if int(folder.name) != manifest.version:
            raise ManifestError(
                f"{source}: key 'version' is {manifest.version} but the folder is "
                f"{folder.name!r}; versions must match their folder"
            )
        if folder.parent.name != manifest.name:
            raise ManifestError(
                f"{source}: key 'name' is {manifest.name!r} but the model folder is "
                f"{folder.parent.name!r}; names must match their folder"
            )
    return manifest


def manifest_from_dict(raw: Any, source: str = "<manifest>") -> Manifest:
    """Validate a parsed manifest; every error names the offending key and `source`."""
    r = _Reader(source)
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: the manifest must be a JSON object")
    fmt = r.integer(raw, "format_version")
    if fmt != FORMAT_VERSION:
        raise ManifestError(
            f"{source}: key 'format_version' is {fmt}; this code reads format {FORMAT_VERSION}"
        )
    name = r.string(raw, "name")
    if not name or "/" in name or name.startswith("."):
        raise ManifestError(f"{source}: key 'name' {name!r} is not a valid model folder name")
    version = r.integer(raw, "version")
    if version < 1:
        raise ManifestError(f"{source}: key 'version' must be a positive integer, got {version}")
    window = r.string(raw, "window")
    if window not in WINDOWS:
        raise ManifestError(f"{source}: key 'window' is {window!r}; expected one of {WINDOWS}")
    feature_names = tuple(r.string_list(raw, "feature_names"))
    plan: PlanSpec | None = None
    if window == WINDOW_DRAFT_PLAN:
        plan = _plan_spec(r, r.obj(raw, "plan"))
        expected = plan.feature_names()
    else:
        if "plan" in raw:
            raise ManifestError(f"{source}: key 'plan' is only valid for a draft_plan model")
        expected = FEATURES_BY_WINDOW[window]
    if feature_names != expected:
        raise ManifestError(
            f"{source}: key 'feature_names' is {list(feature_names)}; a {window} model takes "
            f"{list(expected)}"
        )
    enc = r.obj(raw, "compression_encoding")
    if dict(enc) != dict(COMP_ENC):
        raise ManifestError(
            f"{source}: key 'compression_encoding' is {enc}; expected {dict(COMP_ENC)}"
        )
    gammas = r.array(raw, "gamma_candidates")
    if not gammas or not all(isinstance(g, int) and not isinstance(g, bool) for g in gammas):
        raise ManifestError(f"{source}: key 'gamma_candidates' must be a non-empty integer list")
    if any(g < 0 for g in gammas):
        raise ManifestError(f"{source}: key 'gamma_candidates' has a negative value: {gammas}")
    objective = r.string(raw, "default_objective")
    if objective not in OBJECTIVES:
        raise ManifestError(
            f"{source}: key 'default_objective' is {objective!r}; expected one of {OBJECTIVES}"
        )
    o = r.obj(raw, "onnx")
    onnx = OnnxSpec(
        file=r.string(o, "file", "onnx."),
        input_name=r.string(o, "input_name", "onnx."),
        output_name=r.string(o, "output_name", "onnx."),
        n_features=r.integer(o, "n_features", "onnx."),
        dtype=r.string(o, "dtype", "onnx."),
        opset=r.integer(o, "opset", "onnx."),
    )
    if onnx.n_features != len(feature_names):
        raise ManifestError(
            f"{source}: key 'onnx.n_features' is {onnx.n_features} but 'feature_names' has "
            f"{len(feature_names)}"
        )
    if onnx.dtype != "float32":
        raise ManifestError(f"{source}: key 'onnx.dtype' is {onnx.dtype!r}; expected 'float32'")
    if "/" in onnx.file or "\\" in onnx.file or onnx.file.startswith("."):
        raise ManifestError(
            f"{source}: key 'onnx.file' {onnx.file!r} must be a file inside the version folder"
        )
    rng = r.number_list(raw, "output_range")
    if len(rng) != 2 or not rng[0] < rng[1]:
        raise ManifestError(f"{source}: key 'output_range' must be [low, high], got {rng}")
    answers = []
    for i, ka in enumerate(r.array(raw, "known_answers")):
        key = f"known_answers[{i}]"
        if not isinstance(ka, dict):
            raise ManifestError(f"{source}: key '{key}' must be an object")
        feats = r.number_list(ka, "features", key + ".")
        if len(feats) != len(feature_names):
            raise ManifestError(
                f"{source}: key '{key}.features' has {len(feats)} values; expected "
                f"{len(feature_names)}"
            )
        answers.append(
            KnownAnswer(features=tuple(feats), prediction=r.number(ka, "prediction", key + "."))
        )
    if not answers:
        raise ManifestError(f"{source}: key 'known_answers' is empty; a load could not be checked")
    tol = r.number(raw, "known_answer_tolerance")
    if tol <= 0:
        raise ManifestError(f"{source}: key 'known_answer_tolerance' must be > 0, got {tol}")
    m = r.obj(raw, "metrics")
    metrics = Metrics(
        split=_split(r, r.obj(m, "split", "metrics."), "metrics.split."),
        heldout_runs=(
            None
            if m.get("heldout_runs") is None
            else _split(r, r.obj(m, "heldout_runs", "metrics."), "metrics.heldout_runs.")
        ),
        onnx_max_abs_diff=r.number(m, "onnx_max_abs_diff", "metrics."),
    )
    td = r.obj(raw, "training_data")
    training_data = TrainingData(
        path=r.string(td, "path", "training_data."),
        sha256=r.string(td, "sha256", "training_data."),
        rows=r.integer(td, "rows", "training_data."),
        runs=r.integer(td, "runs", "training_data."),
    )
    libs = r.obj(raw, "libraries")
    if not all(isinstance(v, str) for v in libs.values()):
        raise ManifestError(f"{source}: key 'libraries' must map names to version strings")
    return Manifest(
        format_version=fmt,
        name=name,
        version=version,
        window=window,
        feature_names=feature_names,
        compression_encoding=dict(enc),
        gamma_candidates=tuple(gammas),
        default_objective=objective,
        onnx=onnx,
        output_range=(rng[0], rng[1]),
        known_answers=tuple(answers),
        known_answer_tolerance=tol,
        fitted_on=r.string(raw, "fitted_on"),
        estimator=r.string(raw, "estimator"),
        metrics=metrics,
        training_data=training_data,
        libraries=dict(libs),
        created_at=r.string(raw, "created_at"),
        plan=plan,
    )


def _plan_spec(r: _Reader, d: Mapping[str, Any]) -> PlanSpec:
    axes = []
    for i, a in enumerate(r.array(d, "axes", "plan.")):
        key = f"plan.axes[{i}]."
        if not isinstance(a, dict):
            raise ManifestError(f"{r.source}: key '{key[:-1]}' must be an object")
        axes.append(PlanAxis(r.string(a, "feature", key), tuple(r.number_list(a, "edges", key))))
    why = check_axes(axes)
    if why:
        raise ManifestError(f"{r.source}: key 'plan.axes': {why}")
    max_gamma = r.integer(d, "max_gamma", "plan.")
    if not 1 <= max_gamma <= MAX_PLAN_GAMMA:
        raise ManifestError(
            f"{r.source}: key 'plan.max_gamma' is {max_gamma}; must be in [1, {MAX_PLAN_GAMMA}]"
        )
    refresh = r.integer(d, "refresh_steps", "plan.")
    if refresh < 1:
        raise ManifestError(f"{r.source}: key 'plan.refresh_steps' must be ≥ 1, got {refresh}")
    scales = []
    for key in ("first_scale", "continue_scale"):
        v = r.number(d, key, "plan.")
        if v < 0:
            raise ManifestError(f"{r.source}: key 'plan.{key}' must be ≥ 0, got {v}")
        scales.append(v)
    return PlanSpec(tuple(axes), max_gamma, refresh, scales[0], scales[1])


def _split(r: _Reader, d: Mapping[str, Any], prefix: str) -> SplitMetrics:
    return SplitMetrics(
        mse=r.number(d, "mse", prefix),
        corr=r.number(d, "corr", prefix),
        n_train=r.integer(d, "n_train", prefix),
        n_test=r.integer(d, "n_test", prefix),
    )


class _Reader:
    """Typed access to JSON values with errors that name the key path and the file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _get(self, d: Mapping[str, Any], key: str, prefix: str) -> Any:
        if key not in d:
            raise ManifestError(f"{self.source}: missing key '{prefix}{key}'")
        return d[key]

    def _bad(self, key: str, prefix: str, want: str, value: Any) -> ManifestError:
        return ManifestError(f"{self.source}: key '{prefix}{key}' must be {want}, got {value!r}")

    def string(self, d: Mapping[str, Any], key: str, prefix: str = "") -> str:
        v = self._get(d, key, prefix)
        if not isinstance(v, str):
            raise self._bad(key, prefix, "a string", v)
        return v

    def integer(self, d: Mapping[str, Any], key: str, prefix: str = "") -> int:
        v = self._get(d, key, prefix)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(key, prefix, "an integer", v)
        return v

    def number(self, d: Mapping[str, Any], key: str, prefix: str = "") -> float:
        v = self._get(d, key, prefix)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise self._bad(key, prefix, "a finite number", v)
        return float(v)

    def obj(self, d: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
        v = self._get(d, key, prefix)
        if not isinstance(v, dict):
            raise self._bad(key, prefix, "an object", v)
        return v

    def array(self, d: Mapping[str, Any], key: str, prefix: str = "") -> Sequence[Any]:
        v = self._get(d, key, prefix)
        if not isinstance(v, list):
            raise self._bad(key, prefix, "a list", v)
        return v

    def string_list(self, d: Mapping[str, Any], key: str, prefix: str = "") -> list[str]:
        v = self.array(d, key, prefix)
        if not all(isinstance(x, str) for x in v):
            raise self._bad(key, prefix, "a list of strings", v)
        return list(v)

    def number_list(self, d: Mapping[str, Any], key: str, prefix: str = "") -> list[float]:
        v = self.array(d, key, prefix)
        ok = all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        if not ok:
            raise self._bad(key, prefix, "a list of finite numbers", v)
        return [float(x) for x in v]
