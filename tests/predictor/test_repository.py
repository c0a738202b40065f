"""Loading, validation, unloading and polling of the model repository."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.decider import Decider, Selector
from predictor_service.refusals import RequestRefused
from predictor_service.registry import ModelRegistry, RegistryConfig
from predictor_service.server import PredictorServer
from tests.predictor.helpers import ADMIN, MODEL, copy_version, decide_one, request


def load(stub: pb_grpc.PredictorServiceStub, version: int) -> pb.LoadModelResponse:
    return stub.LoadModel(pb.LoadModelRequest(name=MODEL, version=version), metadata=ADMIN)


def states(stub: pb_grpc.PredictorServiceStub) -> dict[int, tuple[int, str]]:
    info = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    return {v.version: (v.state, v.error) for v in info.versions}


def served_versions(stub: pb_grpc.PredictorServiceStub) -> set[int]:
    resp = decide_one(stub, request(1, [f"k{i}" for i in range(20)]))
    assert not resp.HasField("error"), resp.error
    return {d.model_version for d in resp.decisions}


@pytest.mark.parametrize("damage", ["corrupt_onnx", "wrong_shape_manifest", "other_models_onnx"])
def test_a_bad_version_fails_to_load_and_the_old_one_keeps_serving(
    model_repo: Path, stub: pb_grpc.PredictorServiceStub, damage: str
) -> None:
    assert served_versions(stub) == {2}
    folder = copy_version(model_repo, MODEL, 2, 3)
    if damage == "corrupt_onnx":
        data = (folder / "model.onnx").read_bytes()
        (folder / "model.onnx").write_bytes(data[: len(data) // 2] + b"\x00garbage")
        why = "onnxruntime cannot load it"
    elif damage == "wrong_shape_manifest":
        m = json.loads((folder / "manifest.json").read_text())
        m["onnx"]["n_features"] = 7
        (folder / "manifest.json").write_text(json.dumps(m))
        why = "onnx.n_features"
    else:  # a valid ONNX file that is not the model the manifest describes
        shutil.copy(model_repo / MODEL / "1" / "model.onnx", folder / "model.onnx")
        why = "known_answers"
    with pytest.raises(grpc.RpcError) as err:
        load(stub, 3)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert why in err.value.details()
    state, error = states(stub)[3]
    assert state == pb.MODEL_STATE_FAILED and why in error
    assert served_versions(stub) == {2}


def test_unload_keeps_the_last_and_the_routed_version(stub: pb_grpc.PredictorServiceStub) -> None:
    routing = pb.Routing(weights=[pb.RouteWeight(target="1", weight=1.0)])
    stub.SetRouting(pb.SetRoutingRequest(model_name=MODEL, routing=routing), metadata=ADMIN)
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadModel(pb.UnloadModelRequest(name=MODEL, version=1), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still routed" in err.value.details()
    stub.UnloadModel(pb.UnloadModelRequest(name=MODEL, version=2), metadata=ADMIN)
    assert states(stub)[2][0] == pb.MODEL_STATE_UNLOADED
    stub.SetRouting(pb.SetRoutingRequest(model_name=MODEL, routing=pb.Routing()), metadata=ADMIN)
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadModel(pb.UnloadModelRequest(name=MODEL, version=1), metadata=ADMIN)
    assert "last serving version" in err.value.details()
    assert served_versions(stub) == {1}
    assert load(stub, 2).version.state == pb.MODEL_STATE_READY  # loads again on request
    assert served_versions(stub) == {2}


def test_a_request_holding_a_version_finishes_on_it_after_unload(model_repo: Path) -> None:
    registry = ModelRegistry(RegistryConfig(repo=model_repo, default_model=MODEL))
    registry.scan()
    table = registry.table(MODEL)  # what a message in flight holds
    v2 = table.versions[2]
    registry.unload(MODEL, 2)
    assert 2 not in registry.table(MODEL).versions
    x = np.zeros((3, 6), dtype=np.float32)
    assert v2.predict(x).shape == (3,)  # the session is alive while referenced
    with pytest.raises(RequestRefused) as err:
        Decider(registry).predict(Selector(MODEL, 2), "", [[0.0] * 6])
    assert err.value.field == "model.version"


def test_poll_loads_a_complete_version_and_ignores_a_partial_one(
    model_repo: Path, start_server: Callable[..., PredictorServer]
) -> None:
    server = start_server(model_repo, default_model=MODEL, poll_seconds=0.1)
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)
        partial = model_repo / MODEL / "4"  # being written: model.onnx but no manifest yet
        partial.mkdir()
        shutil.copy(model_repo / MODEL / "2" / "model.onnx", partial / "model.onnx")
        tmp = model_repo / MODEL / ".tmp-5-abc"  # a trainer's temporary folder
        shutil.copytree(model_repo / MODEL / "2", tmp)
        copy_version(model_repo, MODEL, 1, 3)
        deadline = time.monotonic() + 20
        while 3 not in states(stub) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states(stub)[3][0] == pb.MODEL_STATE_READY
        assert served_versions(stub) == {3}  # default routing follows the latest version
        time.sleep(0.5)  # several more polls
        assert set(states(stub)) == {1, 2, 3}


def test_routing_file_applies_at_start_and_on_change(
    model_repo: Path, start_server: Callable[..., PredictorServer], tmp_path: Path
) -> None:
    routing_file = tmp_path / "routing.json"
    routing_file.write_text(json.dumps({MODEL: {"weights": {"1": 1}, "salt": "cm"}}))
    server = start_server(
        model_repo, default_model=MODEL, poll_seconds=0.1, routing_file=routing_file
    )
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)
        assert served_versions(stub) == {1}
        routing_file.write_text(
            json.dumps({MODEL: {"weights": {"canary": 1}, "aliases": {"canary": 2}, "salt": "cm"}})
        )
        deadline = time.monotonic() + 20
        while served_versions(stub) != {2} and time.monotonic() < deadline:
            time.sleep(0.05)
        got = stub.GetRouting(pb.GetRoutingRequest(model_name=MODEL)).routing
        assert dict(got.aliases) == {"canary": 2} and got.weights[0].target == "canary"
        resp = decide_one(stub, request(1, ["x"]))
        assert resp.decisions[0].arm == "canary"
        routing_file.write_text("{not json")  # a bad edit keeps the routing in force
        time.sleep(0.4)
        assert served_versions(stub) == {2}
