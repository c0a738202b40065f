"""γ choice: the server's answers equal plain onnxruntime + the documented objectives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from speckv.v1 import common_pb2 as cpb
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.decisions import (
    CandidateSet,
    Objective,
    StepTiming,
    build_features,
    choose_gamma,
)
from tests.predictor.helpers import MODEL, SAME_STEP_MODEL, TIMING, request, signals


def plain_predict(repo: Path, name: str, version: int, x: np.ndarray) -> np.ndarray:
    folder = repo / name / str(version)
    manifest = json.loads((folder / "manifest.json").read_text())
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {manifest["onnx"]["input_name"]: x.astype(np.float32)})[0]
    return np.clip(np.asarray(out).reshape(-1), 0.0, 1.0)


def test_build_features_is_row_major_in_seed_order() -> None:
    sig = np.array([[1.0, 0.5, 2.0, 0.25], [3.0, 0.75, 4.0, 0.5]])
    x = build_features(sig, np.array([0.0, 2.0], dtype=np.float32), np.array([2, 8], np.float32))
    assert x.shape == (4, 6)
    assert x[1].tolist() == [1.0, 0.5, 2.0, 0.25, 0.0, 8.0]
    assert x[2].tolist() == [3.0, 0.75, 4.0, 0.5, 2.0, 2.0]


def test_gamma_zero_is_not_evaluated_and_goodput_can_prefer_it() -> None:
    calls: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        calls.append(x)
        return np.full(x.shape[0], 0.05)  # the draft is almost always wrong

    t = StepTiming(
        draft_seconds_per_token=0.01, verify_base_seconds=0.01, verify_seconds_per_token=0
    )
    c = choose_gamma(
        predict,
        np.ones((1, 4)) * 0.5,
        np.zeros(1, np.float32),
        CandidateSet.of([0, 2, 4]),
        Objective.GOODPUT,
        t,
    )
    assert calls[0][:, 5].tolist() == [2.0, 4.0]  # γ=0 never reaches the model
    assert c.gamma.tolist() == [0]
    assert c.acceptance[0, 0] == 0.0 and c.score[0, 0] == pytest.approx(1 / 0.01)
    # the same rows under tokens_per_step take the longest draft
    c2 = choose_gamma(
        predict,
        np.ones((1, 4)) * 0.5,
        np.zeros(1, np.float32),
        CandidateSet.of([0, 2, 4]),
        Objective.TOKENS_PER_STEP,
        None,
    )
    assert c2.gamma.tolist() == [4]


def test_served_decision_matches_plain_onnxruntime(
    stub: pb_grpc.PredictorServiceStub, model_repo: Path
) -> None:
    keys = [f"seq-{i}" for i in range(5)]
    gammas = [0, 2, 4, 6, 8]
    pin = cpb.ModelSelector(name=MODEL, version=1)
    for objective in (cpb.OBJECTIVE_GOODPUT, cpb.OBJECTIVE_TOKENS_PER_STEP):
        (resp,) = list(
            stub.Decide(iter([request(7, keys, gammas=gammas, objective=objective, model=pin)]))
        )
        assert resp.request_id == 7 and not resp.HasField("error")
        assert [d.routing_key for d in resp.decisions] == keys
        for i, d in enumerate(resp.decisions):
            s = signals(i)
            x = np.array(
                [
                    [
                        s.mean_draft_entropy,
                        s.mean_draft_confidence,
                        s.max_draft_entropy,
                        s.min_draft_confidence,
                        1.0,
                        g,
                    ]
                    for g in gammas[1:]
                ]
            )
            a = np.concatenate([[0.0], plain_predict(model_repo, MODEL, 1, x)])
            g = np.array(gammas, dtype=float)
            if objective == cpb.OBJECTIVE_GOODPUT:
                t = TIMING
                score = (a * g + 1) / (
                    g * t.draft_seconds_per_token
                    + t.verify_base_seconds
                    + g * t.verify_seconds_per_token
                )
            else:
                score = a * g + 1
            assert [c.gamma for c in d.candidates] == gammas
            np.testing.assert_allclose([c.predicted_acceptance for c in d.candidates], a, atol=1e-6)
            np.testing.assert_allclose([c.score for c in d.candidates], score, rtol=1e-6)
            assert d.gamma == gammas[int(np.argmax(score))]
            assert (d.model_name, d.model_version, d.arm, d.step) == (MODEL, 1, "pinned", i)


def test_unspecified_objective_is_the_manifest_default(stub: pb_grpc.PredictorServiceStub) -> None:
    pin = cpb.ModelSelector(name=MODEL, version=1)
    (a,) = list(stub.Decide(iter([request(objective=cpb.OBJECTIVE_UNSPECIFIED, model=pin)])))
    (b,) = list(stub.Decide(iter([request(objective=cpb.OBJECTIVE_GOODPUT, model=pin)])))
    assert not a.HasField("error")
    assert [c.score for c in a.decisions[0].candidates] == [
        c.score for c in b.decisions[0].candidates
    ]


def test_same_step_and_prefix_windows_are_served_by_same_step_models(
    stub: pb_grpc.PredictorServiceStub,
) -> None:
    sel = cpb.ModelSelector(name=SAME_STEP_MODEL)
    for window in (cpb.DECISION_WINDOW_SAME_STEP, cpb.DECISION_WINDOW_PREFIX):
        (resp,) = list(stub.Decide(iter([request(window=window, model=sel)])))
        assert not resp.HasField("error"), resp.error
        assert resp.decisions[0].model_name == SAME_STEP_MODEL
        assert resp.decisions[0].arm == "v1"


def test_predict_returns_raw_clipped_acceptance(
    stub: pb_grpc.PredictorServiceStub, model_repo: Path
) -> None:
    rows = [[0.5, 0.8, 1.5, 0.4, c, g] for c in (0, 1, 2) for g in (2, 4, 6, 8)]
    resp = stub.Predict(
        pb.PredictRequest(
            model=cpb.ModelSelector(name=MODEL, version=2),
            rows=[pb.FeatureVector(values=r) for r in rows],
        )
    )
    assert (resp.model_name, resp.model_version, resp.arm) == (MODEL, 2, "pinned")
    np.testing.assert_allclose(
        resp.predicted_acceptance, plain_predict(model_repo, MODEL, 2, np.array(rows)), atol=1e-6
    )
