"""Train SpecKV-MLP16, export it to ONNX, check the export and register it as a new version.

The data, splits, folds and model come from the one protocol in predictor_service/dataset.py
(shared with `speckv-eval paper`): `split` metrics are the seed's stratified 80/20
(`seed_split`, predictions clipped to [0, 1] before scoring, as the seed's notebook does);
`heldout_runs` metrics hold out fold 0 of `heldout_folds` grouped by run ("stratified"),
because steps of one run are not independent. The registered model is refitted on all
records, as the seed did.

scikit-learn, skl2onnx, onnx and onnxruntime are imported inside functions so that importing
this module (and `speckv-predictor serve`) does not need the `train` extra.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from predictor_service.dataset import (
    HELDOUT_FOLDS,
    DataError,
    WindowedData,
    estimator_repr,
    fit_mlp16,
    heldout_split,
    read_step_records,
    score,
    seed_split,
    window_data,
)
from predictor_service.manifest import (
    FITTED_ON_ALL_RECORDS,
    MANIFEST_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    WINDOWS,
    KnownAnswer,
    Manifest,
    Metrics,
    OnnxSpec,
    SplitMetrics,
    TrainingData,
)

SEED_CSV = Path(__file__).parent / "data" / "speckv-paper" / "phase2_step_results.csv"
ONNX_OPSET = 17  # old enough for every onnxruntime the `predictor` extra allows
ONNX_INPUT_NAME = "input"
MAX_ONNX_ABS_DIFF = 1e-5
N_KNOWN_ANSWERS = 8


class TrainError(RuntimeError):
    """Training could not produce a valid version (nothing was registered)."""


class VersionExistsError(TrainError):
    """The requested version exists already; versions are immutable."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train and where to register it.

    `data`: step CSV in the seed's schema (extra columns tolerated; a `sequence_id` column
    defines the runs), or a directory of them (a worker's `--record-steps DIR`; see
    dataset.read_step_records). `version`: None takes the next free integer. `seed`: the MLP's
    random_state (the splits always use 42). `heldout_runs`: False skips the held-out-runs
    evaluation (one fit fewer; the manifest then records `heldout_runs: null`).
    """

    repo: Path
    name: str
    window: str
    data: Path = SEED_CSV
    version: int | None = None
    seed: int = 42
    heldout_runs: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        mlp16_windows = tuple(w for w in WINDOWS if w != "draft_plan")
        if self.window not in mlp16_windows:
            raise ValueError(
                f"window {self.window!r} is not one of {mlp16_windows} (a draft_plan model "
                "is trained with --model-kind instep)"
            )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(
                f"model name {self.name!r} must be a plain folder name (no '/', no leading '.')"
            )
        if self.version is not None and self.version < 1:
            raise ValueError(f"version must be a positive integer, got {self.version}")


@dataclass(frozen=True)
class TrainResult:
    name: str
    version: int
    window: str
    test_mse: float
    test_corr: float
    heldout_runs_mse: float | None
    heldout_runs_corr: float | None
    onnx_max_abs_diff: float
    path: Path  # the registered version folder
    manifest: Manifest

    def summary(self) -> dict[str, Any]:
        """The CLI's last output line (one JSON object)."""
        return {
            "name": self.name,
            "version": self.version,
            "window": self.window,
            "test_mse": self.test_mse,
            "test_corr": self.test_corr,
            "heldout_runs_mse": self.heldout_runs_mse,
            "heldout_runs_corr": self.heldout_runs_corr,
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
        }


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def train_and_register(config: TrainConfig) -> TrainResult:
    """Validate data, train, export, check, and publish `<repo>/<name>/<version>/` atomically.

    Raises `DataError` (bad records, nothing written), `VersionExistsError`, or `TrainError`
    (e.g. the ONNX export disagrees with sklearn; nothing registered).
    """
    with _stages(config.progress, total=6 if config.heldout_runs else 5) as stage:
        stage("reading step records")
        records = read_step_records(config.data)
        data = window_data(records, config.window)
        model_dir, version, target = _new_version(config.repo, config.name, config.version)

        stage("seed split: fit on 80%, score on 20%")
        split = _split_metrics(data, config.seed)
        heldout = None
        if config.heldout_runs:
            stage("held-out runs: fit on 80% of runs, score on the rest")
            heldout = _heldout_runs_metrics(data, config.seed)

        stage(f"refit on all {data.y.size} records")
        model = fit_mlp16(data.x, data.y, config.seed)

        stage("export to ONNX and check every record through onnxruntime")
        onnx_bytes, output_name = _export_onnx(model, len(data.feature_names))
        sk_pred = model.predict(data.x)
        max_diff = _onnx_max_abs_diff(onnx_bytes, data.x, sk_pred)
        if not max_diff <= MAX_ONNX_ABS_DIFF:
            raise TrainError(
                f"the ONNX export differs from sklearn by up to {max_diff:.3g} "
                f"(limit {MAX_ONNX_ABS_DIFF}); nothing was registered"
            )

        stage(f"write {config.name}/{version}")
        known = _known_answers(data, model)
        manifest = Manifest(
            name=config.name,
            version=version,
            window=config.window,
            feature_names=data.feature_names,
            onnx=OnnxSpec(
                file=ONNX_FILE,
                input_name=ONNX_INPUT_NAME,
                output_name=output_name,
                n_features=len(data.feature_names),
                dtype="float32",
                opset=ONNX_OPSET,
            ),
            known_answers=known,
            metrics=Metrics(split=split, heldout_runs=heldout, onnx_max_abs_diff=max_diff),
            training_data=TrainingData(
                path=str(records.path),
                sha256=records.sha256,
                rows=records.rows,
                runs=records.n_runs,
            ),
            estimator=estimator_repr(config.seed),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            libraries=_library_versions(),
            fitted_on=FITTED_ON_ALL_RECORDS,
        )
        _publish(model_dir, target, onnx_bytes, model, manifest)
        stage("done")
    return TrainResult(
        name=config.name,
        version=version,
        window=config.window,
        test_mse=split.mse,
        test_corr=split.corr,
        heldout_runs_mse=None if heldout is None else heldout.mse,
        heldout_runs_corr=None if heldout is None else heldout.corr,
        onnx_max_abs_diff=max_diff,
        path=target,
        manifest=manifest,
    )


def _next_version(model_dir: Path) -> int:
    return max(existing_versions(model_dir), default=0) + 1


def _new_version(repo: Path, name: str, version: int | None) -> tuple[Path, int, Path]:
    """`<repo>/<name>`, the version to register (the given one, else the next free one) and
    its folder; VersionExistsError when that folder exists (versions are immutable)."""
    model_dir = Path(repo) / name
    version = version or _next_version(model_dir)
    target = model_dir / str(version)
    if target.exists():
        raise VersionExistsError(_exists_message(target, model_dir))
    return model_dir, version, target


def _exists_message(target: Path, model_dir: Path) -> str:
    nxt = _next_version(model_dir)
    return (
        f"{target} exists already and versions are immutable; pass --version {nxt} "
        "(or omit --version to take the next free one)"
    )


def _split_metrics(data: WindowedData, seed: int) -> SplitMetrics:
    """The seed's protocol: fit on `seed_split`'s 80%, score on its 20%."""
    try:
        tr, te = seed_split(data.strata)
    except DataError as e:
        raise DataError(f"{data.window}: {e}") from None
    model = fit_mlp16(data.x[tr], data.y[tr], seed)
    return score(model, data.x[te], data.y[te], n_train=int(tr.size))


def heldout_runs_split(data: WindowedData) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with whole runs held out: fold 0 of `heldout_folds` with groups =
    run id and classes = compression_task (about 20% of the runs, balanced across
    compression and task; none of their steps is in training)."""
    return heldout_split(data.run_id, data.strata, n_folds=HELDOUT_FOLDS)


def _heldout_runs_metrics(data: WindowedData, seed: int) -> SplitMetrics:
    tr, te = heldout_runs_split(data)
    model = fit_mlp16(data.x[tr], data.y[tr], seed)
    return score(model, data.x[te], data.y[te], n_train=int(tr.size))


def _export_onnx(model: Any, n_features: int) -> tuple[bytes, str]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model,
        initial_types=[(ONNX_INPUT_NAME, FloatTensorType([None, n_features]))],
        target_opset=ONNX_OPSET,
    )
    return onx.SerializeToString(), onx.graph.output[0].name


def _onnx_max_abs_diff(onnx_bytes: bytes, x: np.ndarray, sk_pred: np.ndarray) -> float:
    """Largest |onnxruntime - sklearn| over every record (float32 in, as served)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = sess.run(None, {ONNX_INPUT_NAME: x.astype(np.float32)})[0]
    return float(np.max(np.abs(np.asarray(out, dtype=np.float64).reshape(-1) - sk_pred)))


def _known_answers(data: WindowedData, model: Any) -> tuple[KnownAnswer, ...]:
    """Rows spread over the data with sklearn's raw (unclipped) predictions.

    Features are rounded to float32 first, which is what the server feeds to ONNX, so the
    check compares the same inputs on both sides.
    """
    idx = np.unique(np.linspace(0, data.y.size - 1, N_KNOWN_ANSWERS).round().astype(int))
    x = data.x[idx].astype(np.float32).astype(np.float64)
    pred = model.predict(x)
    return tuple(
        KnownAnswer(features=tuple(float(v) for v in row), prediction=float(p))
        for row, p in zip(x, pred, strict=True)
    )


def _library_versions() -> dict[str, str]:
    libs = {"python": platform.python_version()}
    for dist in ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime"):
        try:
            libs[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            libs[dist] = "not installed"
    return libs


def _publish(
    model_dir: Path, target: Path, onnx_bytes: bytes, model: Any, manifest: Manifest
) -> None:
    """Write into `<model>/.tmp-<version>-<random>/`, manifest last, then rename into place."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{manifest.version}-", dir=model_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a served version is world-readable
        _write_synced(tmp / ONNX_FILE, onnx_bytes)
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            np.savez(
                f,
                coefs_0=model.coefs_[0],
                intercepts_0=model.intercepts_[0],
                coefs_1=model.coefs_[1],
                intercepts_1=model.intercepts_[1],
            )
            f.flush()
            os.fsync(f.fileno())
        manifest.write(tmp)
        if target.exists():  # someone registered it while we trained
            raise VersionExistsError(_exists_message(target, model_dir))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (target / MANIFEST_FILE).is_file():  # rename onto an empty folder of that name
        raise TrainError(f"{target} was not published intact; remove it and train again")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _stages(enabled: bool, total: int) -> Iterator[Any]:
    """A stage-by-stage progress bar on stderr (stdout stays for the JSON result)."""
    if not enabled:
        yield lambda desc: None
        return
    if not sys.stderr.isatty():  # CI logs: one line per stage instead of a redrawn bar
        count = 0

        def line(desc: str) -> None:
            nonlocal count
            print(f"[{count}/{total}] {desc}", file=sys.stderr, flush=True)
            count += 1

        yield line
        return
    from tqdm import tqdm

    bar = tqdm(total=total, file=sys.stderr, unit="stage", leave=True, dynamic_ncols=True)
    started = False

    def stage(desc: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_description_str(desc)

    try:
        yield stage
    finally:
        bar.close()
