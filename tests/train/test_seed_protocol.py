"""The seed's numbers reproduce, and the exported ONNX model is sklearn's model.

The ONNX checks use plain onnxruntime and an sklearn model fitted here, not project code,
so a bug in the exporter or in the project's feature building cannot hide itself.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from predictor_service.manifest import load_manifest
from predictor_service.training import TrainConfig, train_and_register

SIGNALS = [
    "mean_draft_entropy",
    "mean_draft_confidence",
    "max_draft_entropy",
    "min_draft_confidence",
]
ENC = {"fp16": 0, "int8": 1, "nf4": 2}


def _seed_rows(seed_csv: Path) -> list[dict[str, str]]:
    with open(seed_csv, newline="") as f:
        return list(csv.DictReader(f))


def _same_step_xy(rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array(
        [[float(r[s]) for s in SIGNALS] + [ENC[r["compression"]], float(r["gamma"])] for r in rows]
    )
    return x, np.array([float(r["acceptance_rate"]) for r in rows])


def test_same_step_reproduces_the_seed(tmp_path: Path, seed_csv: Path) -> None:
    result = train_and_register(
        TrainConfig(repo=tmp_path, name="seed", window="same_step", data=seed_csv, progress=False)
    )
    assert result.version == 1
    assert result.test_mse == pytest.approx(0.0896, abs=0.0005)
    assert result.test_corr == pytest.approx(0.6853, abs=0.0005)
    assert result.onnx_max_abs_diff <= 1e-5
    m = load_manifest(tmp_path / "seed" / "1")
    assert m.window == "same_step"
    assert m.fitted_on == "all_records"
    assert (m.metrics.split.n_train, m.metrics.split.n_test) == (4089, 1023)
    held = m.metrics.heldout_runs
    assert held is not None and result.heldout_runs_mse == held.mse
    assert held.n_train + held.n_test == 5112
    assert 0.0 < held.mse < 0.25 and 0.0 < held.corr < 1.0
    assert m.training_data.rows == 5112 and m.training_data.runs == 240
    assert m.gamma_candidates == (2, 4, 6, 8)


def test_onnx_in_plain_onnxruntime_equals_sklearn(model_repo: Path, seed_csv: Path) -> None:
    from sklearn.neural_network import MLPRegressor

    version = model_repo / "speckv-mlp16-same-step" / "1"
    x, y = _same_step_xy(_seed_rows(seed_csv))
    reference = MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=42).fit(x, y)

    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.shape[1] == 6 and inp.type == "tensor(float)"
    out = sess.run(None, {inp.name: x.astype(np.float32)})[0]
    assert out.shape == (x.shape[0], 1)
    assert np.max(np.abs(out[:, 0] - reference.predict(x))) <= 1e-5

    # weights.npz is the same network, usable without sklearn or onnxruntime.
    w = np.load(version / "weights.npz")
    hidden = np.maximum(x @ w["coefs_0"] + w["intercepts_0"], 0.0)
    manual = (hidden @ w["coefs_1"] + w["intercepts_1"])[:, 0]
    assert np.max(np.abs(manual - reference.predict(x))) <= 1e-9


def test_previous_step_model_uses_the_previous_steps_signals(
    model_repo: Path, seed_csv: Path
) -> None:
    m = load_manifest(model_repo / "speckv-mlp16" / "1")
    assert m.window == "previous_step"
    assert m.feature_names == (
        "prev_mean_draft_entropy",
        "prev_mean_draft_confidence",
        "prev_max_draft_entropy",
        "prev_min_draft_confidence",
        "comp_enc",
        "gamma",
    )
    # Rebuild the windowed data by hand: run = consecutive rows from step 0; drop step 0.
    rows = _seed_rows(seed_csv)
    x, y = [], []
    for prev, cur in itertools.pairwise(rows):
        if int(cur["step"]) == 0:
            continue
        assert int(cur["step"]) == int(prev["step"]) + 1
        x.append([float(prev[s]) for s in SIGNALS] + [ENC[cur["compression"]], float(cur["gamma"])])
        y.append(float(cur["acceptance_rate"]))
    assert m.metrics.split.n_train + m.metrics.split.n_test == len(y) == 5112 - 240

    from sklearn.neural_network import MLPRegressor

    xa = np.asarray(x)
    ref = MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=42).fit(xa, y)
    sess = ort.InferenceSession(str(model_repo / "speckv-mlp16" / "1" / "model.onnx"))
    out = sess.run(None, {m.onnx.input_name: xa.astype(np.float32)})[0][:, 0]
    assert np.max(np.abs(out - ref.predict(xa))) <= 1e-5


def test_known_answers_reproduce_and_versions_differ(model_repo: Path) -> None:
    outs = []
    for v in (1, 2):
        m = load_manifest(model_repo / "speckv-mlp16" / str(v))
        x, expected = m.known_answer_arrays()
        sess = ort.InferenceSession(str(model_repo / "speckv-mlp16" / str(v) / m.onnx.file))
        out = sess.run([m.onnx.output_name], {m.onnx.input_name: x})[0][:, 0]
        assert np.max(np.abs(out - expected)) <= m.known_answer_tolerance
        outs.append(out)
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-3, "v2 (another seed) should predict differently"
