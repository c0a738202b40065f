"""Every bad input gets a per-message error naming the field; the stream stays open."""

from __future__ import annotations

import grpc
import pytest
from speckv.v1 import common_pb2 as cpb
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from tests.predictor.helpers import MODEL, request


def bad_requests() -> list[tuple[pb.DecideRequest, int, str]]:
    """(request, expected ErrorCode, expected field)."""
    inv, nf = pb.ERROR_CODE_INVALID_ARGUMENT, pb.ERROR_CODE_NOT_FOUND
    out: list[tuple[pb.DecideRequest, int, str]] = []

    r = request(keys=["a", "b", "c"])
    r.rows[2].signals.mean_draft_entropy = float("nan")
    out.append((r, inv, "rows[2].signals.mean_draft_entropy"))
    r = request(keys=["a", "b"])
    r.rows[1].signals.max_draft_entropy = float("inf")
    out.append((r, inv, "rows[1].signals.max_draft_entropy"))
    r = request()
    r.rows[0].signals.min_draft_confidence = 1.5
    out.append((r, inv, "rows[0].signals.min_draft_confidence"))
    r = request(keys=["a", "b"])
    r.rows[1].ClearField("signals")
    out.append((r, inv, "rows[1].signals"))
    r = request(keys=["a", "b"])
    r.rows[1].compression = 7  # not a Compression value (proto3 enums are open)
    out.append((r, inv, "rows[1].compression"))
    r = request()
    r.rows[0].compression = cpb.COMPRESSION_UNSPECIFIED
    out.append((r, inv, "rows[0].compression"))
    out.append((request(gammas=()), inv, "gamma_candidates"))
    out.append((request(gammas=(2, 4, 2)), inv, "gamma_candidates[2]"))
    out.append((request(gammas=tuple(range(17))), inv, "gamma_candidates"))
    out.append((request(gammas=(2, 1000)), inv, "gamma_candidates[1]"))
    out.append((request(model=cpb.ModelSelector(name="no-such-model")), nf, "model.name"))
    out.append((request(model=cpb.ModelSelector(name=MODEL, version=99)), nf, "model.version"))
    out.append((request(model=cpb.ModelSelector(name=MODEL, alias="canary")), nf, "model.alias"))
    out.append((request(timing=None), inv, "timing"))
    out.append(
        (
            request(timing=pb.StepTiming(draft_seconds_per_token=0.001)),
            inv,
            "timing.verify_base_seconds",
        )
    )
    out.append(
        (
            request(
                timing=pb.StepTiming(draft_seconds_per_token=float("nan"), verify_base_seconds=0.01)
            ),
            inv,
            "timing.draft_seconds_per_token",
        )
    )
    out.append(
        (request(keys=[f"k{i}" for i in range(1025)]), pb.ERROR_CODE_RESOURCE_EXHAUSTED, "rows")
    )
    out.append((request(keys=()), inv, "rows"))
    out.append((request(window=cpb.DECISION_WINDOW_UNSPECIFIED), inv, "window"))
    out.append((request(window=cpb.DECISION_WINDOW_SAME_STEP), inv, "window"))  # wrong model window
    out.append((request(objective=9), inv, "objective"))
    return out


def test_each_bad_message_is_refused_and_the_next_valid_one_answered(
    stub: pb_grpc.PredictorServiceStub,
) -> None:
    cases = bad_requests()
    msgs: list[pb.DecideRequest] = []
    for i, (bad, _, _) in enumerate(cases):
        bad.request_id = 2 * i + 1
        msgs.append(bad)
        msgs.append(request(request_id=2 * i + 2, keys=[f"ok-{i}"]))
    responses = list(stub.Decide(iter(msgs), timeout=30))
    assert len(responses) == len(msgs)
    for i, (_, code, field) in enumerate(cases):
        bad, good = responses[2 * i], responses[2 * i + 1]
        assert bad.request_id == 2 * i + 1
        assert bad.HasField("error"), f"case {field} was not refused"
        assert (bad.error.code, bad.error.field) == (code, field), bad.error
        assert bad.error.message and not bad.decisions
        assert good.request_id == 2 * i + 2 and not good.HasField("error")
        assert [d.routing_key for d in good.decisions] == [f"ok-{i}"]


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ([[0.1, 0.9, 0.2, 0.8, 1.0]], "rows[0].values"),
        (
            [[0.1, 0.9, 0.2, 0.8, 1.0, 4.0], [0.1, 0.9, float("nan"), 0.8, 1.0, 4.0]],
            "rows[1].values[2]",
        ),
        ([], "rows"),
    ],
)
def test_predict_refuses_wrong_length_and_non_finite(
    stub: pb_grpc.PredictorServiceStub, rows: list[list[float]], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(rows=[pb.FeatureVector(values=r) for r in rows]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")
    ok = stub.Predict(pb.PredictRequest(rows=[pb.FeatureVector(values=[0.1, 0.9, 0.2, 0.8, 1, 4])]))
    assert len(ok.predicted_acceptance) == 1
