"""Train a `draft_plan` model (e.g. `speckv-instep`) from token records and register it.

Data: the token CSV the worker's engine writes (`decode_worker.records.TOKEN_COLUMNS`,
`speckv-eval log-steps --tokens-out`, one row per drafted token whose agreement with the
target is known). Inputs: the plan axes' bin indices plus comp_enc (speckv.draft_plan);
target: `agreed` (0/1), fitted by the same 6→16→1-sized MLP regressor as SpecKV-MLP16, so
its output is an agreement probability estimate. Held-out metrics keep whole prompts out
of training (the prompt id is the part of `sequence_id` before the first ':'): fold 0 of
the shared held-out definition (predictor_service/dataset.py `heldout_folds`, assignment
"balanced"); the registered model is refitted on every record.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from speckv.draft_plan import (
    COMP_ENC_FEATURE,
    PLAN_FEATURES,
    WINDOW_DRAFT_PLAN,
    PlanAxis,
    check_axes,
)
from speckv.vocabulary import COMP_ENC

from predictor_service.dataset import (
    DataError,
    estimator_repr,
    file_sha256,
    files_sha256,
    fit_mlp16,
    heldout_split,
    score,
)
from predictor_service.manifest import (
    FITTED_ON_ALL_RECORDS,
    ONNX_FILE,
    KnownAnswer,
    Manifest,
    Metrics,
    OnnxSpec,
    PlanSpec,
    TrainingData,
)
from predictor_service.training import (
    MAX_ONNX_ABS_DIFF,
    N_KNOWN_ANSWERS,
    ONNX_INPUT_NAME,
    ONNX_OPSET,
    TrainError,
    TrainResult,
    _export_onnx,
    _library_versions,
    _new_version,
    _onnx_max_abs_diff,
    _publish,
    _stages,
)

# The default grid: 5 × 4 × 3 × 2 × 4 = 480 cells (speckv.draft_plan).
DEFAULT_AXES = (
    PlanAxis("match_length", (1.0, 2.0, 3.0, 4.0)),
    PlanAxis("draft_confidence", (0.3, 0.6, 0.85)),
    PlanAxis("draft_entropy", (1.0, 3.0)),
    PlanAxis("prev_full", (0.5,)),
    PlanAxis("accept_ema", (0.3, 0.5, 0.7)),
)
DEFAULT_MAX_GAMMA = 16
DEFAULT_REFRESH_STEPS = 32
REQUIRED_COLUMNS = ("sequence_id", "compression", "agreed", *PLAN_FEATURES)


@dataclass(frozen=True)
class PlanTrainConfig:
    repo: Path
    name: str
    data: Path
    version: int | None = None
    seed: int = 42
    axes: tuple[PlanAxis, ...] = DEFAULT_AXES
    max_gamma: int = DEFAULT_MAX_GAMMA
    refresh_steps: int = DEFAULT_REFRESH_STEPS
    first_scale: float = 1.0
    continue_scale: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        why = check_axes(self.axes)
        if why:
            raise ValueError(f"plan axes: {why}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model name {self.name!r} must be a plain folder name")
        if not 1 <= self.max_gamma <= 64:
            raise ValueError(f"max gamma must be in [1, 64], got {self.max_gamma}")
        if self.refresh_steps < 1:
            raise ValueError(f"refresh steps must be ≥ 1, got {self.refresh_steps}")
        for name, v in (("first", self.first_scale), ("continue", self.continue_scale)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} scale must be a finite number ≥ 0, got {v}")


@dataclass(frozen=True)
class TokenData:
    x: np.ndarray  # [N, axes + 1] float64: bin indices, comp_enc
    y: np.ndarray  # [N] float64 0/1
    prompt: np.ndarray  # [N] str, the held-out group
    rows: int
    sha256: str


def read_token_records(paths: list[Path], axes: tuple[PlanAxis, ...]) -> TokenData:
    """Token CSV files (or folders of them) → binned model inputs; errors name file and line."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix == ".csv"))
        else:
            files.append(p)
    if not files:
        raise DataError(f"no token CSV files in {', '.join(str(p) for p in paths)}")
    xs: list[list[float]] = []
    ys: list[float] = []
    groups: list[str] = []
    for f in files:
        try:
            fh = f.open(newline="", encoding="utf-8")
        except OSError as e:
            raise DataError(f"{f}: cannot read: {e}") from e
        with fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{f}: missing columns {missing}; token records come from "
                    "`speckv-eval log-steps --tokens-out` (decode_worker.records.TOKEN_COLUMNS)"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    comp = COMP_ENC[row["compression"]]
                    values = {k: float(row[k]) for k in PLAN_FEATURES}
                    agreed = int(row["agreed"])
                except (KeyError, ValueError) as e:
                    raise DataError(f"{f}:{line}: bad value ({e})") from None
                if agreed not in (0, 1) or not all(map(math.isfinite, values.values())):
                    raise DataError(f"{f}:{line}: agreed must be 0/1 and features finite")
                xs.append([float(a.bin(values[a.feature])) for a in axes] + [float(comp)])
                ys.append(float(agreed))
                groups.append(row["sequence_id"].split(":", 1)[0])
    if len(ys) < 50:
        raise DataError(f"only {len(ys)} token records; a plan model needs at least 50")
    return TokenData(
        np.asarray(xs, dtype=np.float64),
        np.asarray(ys, dtype=np.float64),
        np.asarray(groups),
        len(ys),
        file_sha256(files[0]) if len(files) == 1 else files_sha256(files),
    )


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else float("nan")


def train_plan_model(config: PlanTrainConfig) -> tuple[TrainResult, dict[str, Any]]:
    """Fit, export, check and publish `<repo>/<name>/<version>/`; returns the result and
    extra held-out numbers (AUC, base rate) for the CLI's JSON line."""
    with _stages(config.progress, total=5) as stage:
        stage("reading token records")
        data = read_token_records([config.data], config.axes)
        model_dir, version, target = _new_version(config.repo, config.name, config.version)
        stage("held-out prompts: fit on 80% of prompts, score on the rest")
        tr, te = heldout_split(data.prompt, assignment="balanced")
        held = fit_mlp16(data.x[tr], data.y[tr], config.seed)
        heldout = score(held, data.x[te], data.y[te], n_train=int(tr.size))
        pred = np.clip(held.predict(data.x[te]), 0, 1)
        extra = {
            "heldout_prompts_auc": _auc(data.y[te], pred),
            "heldout_prompts": int(np.unique(data.prompt[te]).size),
            "agreement_rate": float(data.y.mean()),
            "rows": data.rows,
        }
        stage(f"refit on all {data.rows} token records")
        model = fit_mlp16(data.x, data.y, config.seed)
        stage("export to ONNX and check every record through onnxruntime")
        n_features = data.x.shape[1]
        onnx_bytes, output_name = _export_onnx(model, n_features)
        max_diff = _onnx_max_abs_diff(onnx_bytes, data.x, model.predict(data.x))
        if not max_diff <= MAX_ONNX_ABS_DIFF:
            raise TrainError(
                f"the ONNX export differs from sklearn by up to {max_diff:.3g}; "
                "nothing was registered"
            )
        stage(f"write {config.name}/{version}")
        spec = PlanSpec(
            config.axes,
            config.max_gamma,
            config.refresh_steps,
            config.first_scale,
            config.continue_scale,
        )
        idx = np.unique(np.linspace(0, data.rows - 1, N_KNOWN_ANSWERS).round().astype(int))
        kx = data.x[idx]
        known = tuple(
            KnownAnswer(tuple(float(v) for v in row), float(p))
            for row, p in zip(kx, model.predict(kx), strict=True)
        )
        manifest = Manifest(
            name=config.name,
            version=version,
            window=WINDOW_DRAFT_PLAN,
            feature_names=(*(a.feature for a in config.axes), COMP_ENC_FEATURE),
            onnx=OnnxSpec(
                ONNX_FILE, ONNX_INPUT_NAME, output_name, n_features, "float32", ONNX_OPSET
            ),
            known_answers=known,
            # `split` and `heldout_runs` both hold the held-out-prompts fold here: a plan
            # model has no seed protocol to reproduce.
            metrics=Metrics(split=heldout, heldout_runs=heldout, onnx_max_abs_diff=max_diff),
            training_data=TrainingData(
                str(config.data), data.sha256, data.rows, int(np.unique(data.prompt).size)
            ),
            estimator=estimator_repr(config.seed),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            libraries=_library_versions(),
            fitted_on=FITTED_ON_ALL_RECORDS,
            gamma_candidates=(config.max_gamma,),
            plan=spec,
        )
        _publish(model_dir, target, onnx_bytes, model, manifest)
        stage("done")
    result = TrainResult(
        name=config.name,
        version=version,
        window=WINDOW_DRAFT_PLAN,
        test_mse=heldout.mse,
        test_corr=heldout.corr,
        heldout_runs_mse=heldout.mse,
        heldout_runs_corr=heldout.corr,
        onnx_max_abs_diff=max_diff,
        path=target,
        manifest=manifest,
    )
    return result, extra
