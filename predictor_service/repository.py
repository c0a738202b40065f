"""The model repository on disk: find complete versions, load, validate and warm them.

A version takes traffic only after it has passed every check here, so a bad upload can
never replace a good version. Loaded versions are plain objects: a request that picked one
keeps it alive by holding the reference (CPython's reference count is the handle count),
so unloading never pulls a session out from under a request in flight.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from predictor_service.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest

log = logging.getLogger(__name__)

# Batch sizes (rows of the ONNX input) run once before a version takes traffic, so the first
# real request does not pay for onnxruntime's lazy allocations.
WARMUP_BATCH_SIZES = (1, 4, 8, 32, 128, 1024)


class LoadError(Exception):
    """A version that cannot serve; the message says what was wrong and where."""


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class LoadedVersion:
    """A validated, warmed ONNX session with its manifest; immutable once built."""

    def __init__(self, path: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.path = path
        self.manifest = manifest
        self.manifest_json = (path / MANIFEST_FILE).read_text(encoding="utf-8")
        self.name = manifest.name
        self.version = manifest.version
        self.window = manifest.window
        self.n_features = manifest.onnx.n_features
        self._session = session
        self._input = manifest.onnx.input_name
        self._outputs = [manifest.onnx.output_name]
        # An acceptance is a probability: never answer outside [0, 1], whatever the manifest.
        low, high = manifest.output_range
        self._low = min(max(low, 0.0), 1.0)
        self._high = max(min(high, 1.0), self._low)

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.name, self.version)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The model's unclipped output `[N]` for float32 input `[N, n_features]`."""
        out = self._session.run(self._outputs, {self._input: x})[0]
        return np.asarray(out).reshape(-1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted acceptance `[N]` (float32) clipped to the manifest's output range."""
        out = self._session.run(self._outputs, {self._input: x})[0]
        return np.clip(out, self._low, self._high, out=out).reshape(-1)


def session_options() -> ort.SessionOptions:
    """One thread per run: requests are tiny and many; thread hand-offs cost more than they buy."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def check_inside(path: Path, root: Path) -> None:
    """Raise LoadError when `path` resolves (through symlinks) to a place outside `root`.

    A model folder, version folder or file that is a symlink out of the repository would
    let whoever can write a link serve a model nobody uploaded; it is refused, not followed.
    """
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise LoadError(
            f"{path} resolves to {real}, outside the model repository {real_root}; refused "
            "(symlinks out of --repo are not followed: copy the version into the repository)"
        )


def load_version(folder: Path, root: Path | None = None) -> LoadedVersion:
    """Load, validate (shapes, known answers) and warm one version folder, or raise LoadError.

    With `root` (the repository), the folder, its manifest and its model file must resolve
    inside it.
    """
    if root is not None:
        check_inside(folder, root)
        check_inside(folder / MANIFEST_FILE, root)
    try:
        manifest = load_manifest(folder)
    except ManifestError as e:
        raise LoadError(str(e)) from e
    onnx_path = folder / manifest.onnx.file
    if root is not None:
        check_inside(onnx_path, root)
    if not onnx_path.is_file():
        raise LoadError(f"{onnx_path}: missing (the manifest names it in 'onnx.file')")
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types for corrupt files
        raise LoadError(f"{onnx_path}: onnxruntime cannot load it: {e}") from e
    _check_signature(session, manifest, onnx_path)
    version = LoadedVersion(folder, manifest, session)
    _check_known_answers(version, onnx_path)
    for n in WARMUP_BATCH_SIZES:
        version.predict(np.zeros((n, manifest.onnx.n_features), dtype=np.float32))
    return version


def _check_signature(session: ort.InferenceSession, manifest: Manifest, where: Path) -> None:
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    spec = manifest.onnx
    if len(inputs) != 1 or inputs[0].name != spec.input_name:
        got = [i.name for i in inputs]
        raise LoadError(
            f"{where}: the model's inputs are {got}; the manifest declares one input "
            f"{spec.input_name!r}"
        )
    if spec.output_name not in [o.name for o in outputs]:
        got = [o.name for o in outputs]
        raise LoadError(
            f"{where}: the model's outputs are {got}; the manifest declares {spec.output_name!r}"
        )
    shape = inputs[0].shape
    if inputs[0].type != "tensor(float)":
        raise LoadError(f"{where}: input type is {inputs[0].type}; the manifest says float32")
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != spec.n_features):
        raise LoadError(
            f"{where}: input shape is {shape}; the manifest declares [N, {spec.n_features}] "
            f"({len(manifest.feature_names)} features: {', '.join(manifest.feature_names)})"
        )
    out = next(o for o in outputs if o.name == spec.output_name)
    if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != 1):
        raise LoadError(f"{where}: output shape is {out.shape}; expected [N, 1]")


def _check_known_answers(version: LoadedVersion, where: Path) -> None:
    manifest = version.manifest
    x, expected = manifest.known_answer_arrays()
    try:
        got = version.raw(x)
    except Exception as e:
        raise LoadError(f"{where}: running the known-answer rows failed: {e}") from e
    if got.shape != expected.shape:
        raise LoadError(
            f"{where}: {x.shape[0]} known-answer rows gave {got.shape[0]} outputs; "
            "expected one per row"
        )
    diff = np.abs(got.astype(np.float64) - expected)
    worst = int(np.argmax(diff))
    if not np.isfinite(diff[worst]) or diff[worst] > manifest.known_answer_tolerance:
        raise LoadError(
            f"{where}: known_answers[{worst}] predicts {got[worst]:.6g}, the manifest says "
            f"{expected[worst]:.6g} (tolerance {manifest.known_answer_tolerance}); the model "
            "file does not match its manifest"
        )


def complete_versions(repo: Path) -> dict[str, dict[int, Path]]:
    """Every `<model>/<int>/` folder that holds a manifest (written last, so complete).

    Temporary folders (`.tmp-*`) and folders without a manifest are skipped: a version that
    is still being written is invisible here.
    """
    found: dict[str, dict[int, Path]] = {}
    try:
        models = sorted(os.scandir(repo), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for model in models:
        if not model.is_dir() or model.name.startswith("."):
            continue
        versions: dict[int, Path] = {}
        for entry in os.scandir(model.path):
            if entry.name.isdigit() and entry.is_dir() and int(entry.name) > 0:
                folder = Path(entry.path)
                if (folder / MANIFEST_FILE).is_file():
                    versions[int(entry.name)] = folder
        if versions:
            found[model.name] = versions
    return found


class LoaderLock:
    """Serialises loads of one (model, version) so poll and LoadModel never race."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[VersionRef, threading.Lock] = {}

    def for_ref(self, ref: VersionRef) -> threading.Lock:
        with self._lock:
            return self._busy.setdefault(ref, threading.Lock())
