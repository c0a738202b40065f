"""Admin token, health transitions, reflection, metrics and the drain of a stream."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.server import PredictorServer
from tests.predictor.helpers import ADMIN, MODEL, TOKEN, decide_one, request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_admin_calls_need_the_token_and_decisions_do_not(
    stub: pb_grpc.PredictorServiceStub,
) -> None:
    routing = pb.SetRoutingRequest(model_name=MODEL, routing=pb.Routing(salt="x"))
    calls: list[Callable[..., object]] = [
        lambda md: stub.SetRouting(routing, metadata=md),
        lambda md: stub.LoadModel(pb.LoadModelRequest(name=MODEL, version=1), metadata=md),
        lambda md: stub.UnloadModel(pb.UnloadModelRequest(name=MODEL, version=1), metadata=md),
    ]
    for call in calls:
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in err.value.details()
    assert stub.SetRouting(routing, metadata=ADMIN).routing.salt == "x"
    assert stub.LoadModel(pb.LoadModelRequest(name=MODEL, version=1), metadata=ADMIN).version.state
    assert not decide_one(stub, request()).HasField("error")  # open without a token
    assert stub.ListModels(pb.ListModelsRequest()).models


def test_health_is_not_serving_until_a_version_loads(
    model_repo: Path, start_server: Callable[..., PredictorServer], tmp_path: Path
) -> None:
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    server = start_server(empty, poll_seconds=0.1)
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "speckv.v1.PredictorService"):
            got = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert got == NOT_SERVING
        stub = pb_grpc.PredictorServiceStub(ch)
        err = decide_one(stub, request()).error
        assert err.code == pb.ERROR_CODE_NOT_FOUND and "no models" in err.message
        shutil.copytree(model_repo / MODEL, empty / MODEL)  # both versions appear complete
        deadline = time.monotonic() + 20
        status = NOT_SERVING
        while status != SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == SERVING
        assert not decide_one(stub, request()).HasField("error")  # the only model is the default


def test_reflection_lists_the_services(server: PredictorServer) -> None:
    with grpc.insecure_channel(server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"speckv.v1.PredictorService", "grpc.health.v1.Health"} <= services


def test_metrics_count_decisions_errors_and_gammas(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    keys = [f"m{i}" for i in range(10)]
    list(stub.Decide(iter([request(1, keys), request(2, keys, gammas=())])))
    m = server.metrics
    labels = {"model": MODEL, "version": "2", "arm": "v2"}
    assert m.value("speckv_predictor_decisions_total", labels) == 10
    assert (
        m.value(
            "speckv_predictor_errors_total",
            {"rpc": "Decide", "code": "invalid_argument", "model": MODEL},
        )
        == 1
    )
    gamma_total = sum(
        m.value("speckv_predictor_chosen_gamma_total", {**labels, "gamma": str(g)})
        for g in (0, 2, 4, 6, 8)
    )
    assert gamma_total == 10
    assert m.value("speckv_predictor_compute_seconds_count", labels) == 1
    assert b"speckv_predictor_batch_rows_bucket" in m.exposition()


def test_drain_tells_streams_to_reconnect_and_answers_in_flight(
    server: PredictorServer,
) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.PredictorServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            call = stub.Decide()
            await call.write(request(1))
            assert not (await call.read()).reconnect
            drain = asyncio.get_running_loop().run_in_executor(None, server.stop, 5.0)
            notice = await asyncio.wait_for(call.read(), 5)
            assert notice.reconnect and not notice.decisions and notice.request_id == 0
            got = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert got.status == NOT_SERVING
            await call.write(request(2))  # still answered during the grace period
            resp = await asyncio.wait_for(call.read(), 5)
            assert resp.request_id == 2 and resp.decisions and resp.reconnect
            await call.done_writing()
            t0 = time.monotonic()
            await drain
            assert time.monotonic() - t0 < 4.5  # stopped once the stream closed, not at grace

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a cert")
def test_tls_serves_decisions(
    model_repo: Path, start_server: Callable[..., PredictorServer], tmp_path: Path
) -> None:
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = start_server(model_repo, default_model=MODEL, tls_cert=cert, tls_key=key)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(server.address, creds) as ch:
        resp = decide_one(pb_grpc.PredictorServiceStub(ch), request())
    assert not resp.HasField("error") and resp.decisions
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError):
        decide_one(pb_grpc.PredictorServiceStub(ch), request())
