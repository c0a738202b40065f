"""Sticky weighted A/B, aliases, shadow, and a version swap under concurrent load."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from speckv.v1 import common_pb2 as cpb
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.router import bucket
from predictor_service.server import PredictorServer
from tests.predictor.helpers import ADMIN, MODEL, decide_one, request


def set_routing(
    stub: pb_grpc.PredictorServiceStub,
    weights: dict[str, float],
    salt: str = "exp-1",
    shadow: int = 0,
    aliases: dict[str, int] | None = None,
) -> pb.SetRoutingResponse:
    routing = pb.Routing(
        weights=[pb.RouteWeight(target=t, weight=w) for t, w in weights.items()],
        salt=salt,
        shadow_version=shadow,
        aliases=aliases or {},
    )
    return stub.SetRouting(pb.SetRoutingRequest(model_name=MODEL, routing=routing), metadata=ADMIN)


def arms_for(stub: pb_grpc.PredictorServiceStub, keys: list[str]) -> dict[str, tuple[str, int]]:
    msgs = [request(i, keys[j : j + 1000]) for i, j in enumerate(range(0, len(keys), 1000))]
    out: dict[str, tuple[str, int]] = {}
    for resp in stub.Decide(iter(msgs), timeout=60):
        assert not resp.HasField("error"), resp.error
        for d in resp.decisions:
            out[d.routing_key] = (d.arm, d.model_version)
    return out


def test_ab_split_of_10000_keys_is_within_2_points_and_sticky_across_reconnects(
    server: PredictorServer,
) -> None:
    keys = [f"session-{i}" for i in range(10_000)]
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)
        set_routing(stub, {"stable": 0.7, "canary": 0.3}, aliases={"stable": 1, "canary": 2})
        first = arms_for(stub, keys)
    counts = Counter(arm for arm, _ in first.values())
    assert abs(counts["canary"] / len(keys) - 0.3) <= 0.02, counts
    assert {first[k] for k in keys} == {("stable", 1), ("canary", 2)}
    with grpc.insecure_channel(server.address) as ch:  # a new connection, new streams
        again = arms_for(pb_grpc.PredictorServiceStub(ch), keys)
    assert again == first
    # the assignment is the documented hash walk, not luck
    expected = {k: "stable" if bucket(b"exp-1", k) < 0.7 else "canary" for k in keys}
    assert {k: a for k, (a, _) in first.items()} == expected


def test_shadow_never_changes_answers_and_is_counted(
    server: PredictorServer, stub: pb_grpc.PredictorServiceStub
) -> None:
    keys = [f"s-{i}" for i in range(200)]
    set_routing(stub, {"1": 1.0})
    before = decide_one(stub, request(1, keys))
    set_routing(stub, {"1": 1.0}, shadow=2)
    with_shadow = list(stub.Decide(iter([request(1, keys), request(2, keys[:50])])))
    assert with_shadow[0].decisions == before.decisions
    assert {d.model_version for d in with_shadow[0].decisions} == {1}
    m = server.metrics
    assert m.value("speckv_predictor_shadow_rows_total", {"model": MODEL, "version": "2"}) == 250
    disagreements = m.value(
        "speckv_predictor_shadow_disagreements_total", {"model": MODEL, "version": "2"}
    )
    assert 0 <= disagreements <= 250
    # the shadow really is the other model: pinned v2 answers differ from v1's somewhere
    pinned = decide_one(stub, request(3, keys, model=cpb.ModelSelector(name=MODEL, version=2)))
    a1 = [c.predicted_acceptance for d in before.decisions for c in d.candidates]
    a2 = [c.predicted_acceptance for d in pinned.decisions for c in d.candidates]
    assert a1 != a2


def test_routing_refuses_unloaded_targets_and_aliases(stub: pb_grpc.PredictorServiceStub) -> None:
    for weights, aliases, field in (
        ({"7": 1.0}, {}, "routing.weights[0].target"),
        ({"stable": 1.0}, {"stable": 9}, "routing.aliases['stable']"),
        ({"1": -1.0}, {}, "routing.weights[0].weight"),
        ({"1": 0.0}, {}, "routing.weights"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            set_routing(stub, weights, aliases=aliases)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()
    got = stub.GetRouting(pb.GetRoutingRequest(model_name=MODEL)).routing
    assert not got.weights  # the default (latest version) is still in force


async def _swap_under_load(address: str, repo: Path, staged: Path) -> None:
    salt = "swap"
    keys_per_stream = 16
    n_streams = 4
    # phase -> weights of v1, v2; the order is what the issue asks: 0 -> 50 -> 100 % and back
    phases = [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0)]
    epoch = 0  # the last routing whose SetRouting has returned
    started = 0  # the last routing whose SetRouting was sent (it may already be in force)
    stop = asyncio.Event()
    records: list[tuple[int, int, str, int, str]] = []  # (epoch_before, epoch_after, key, v, arm)
    failures: list[str] = []

    async def stream(i: int, stub: pb_grpc.PredictorServiceStub) -> None:
        keys = [f"w{i}-seq{j}" for j in range(keys_per_stream)]
        call = stub.Decide()
        rid = 0
        while not stop.is_set():
            rid += 1
            before = epoch
            await call.write(request(rid, keys))
            resp = await call.read()
            after = started
            if resp.HasField("error") or len(resp.decisions) != len(keys):
                failures.append(f"stream {i} request {rid}: {resp.error}")
                continue
            for d in resp.decisions:
                records.append((before, after, d.routing_key, d.model_version, d.arm))
        await call.done_writing()

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PredictorServiceStub(ch)

        async def route(w1: float, w2: float) -> None:
            weights = [pb.RouteWeight(target="1", weight=w1)]
            if w2 or epoch:
                weights.append(pb.RouteWeight(target="2", weight=w2))
            await stub.SetRouting(
                pb.SetRoutingRequest(
                    model_name=MODEL, routing=pb.Routing(weights=weights, salt=salt)
                ),
                metadata=ADMIN,
            )

        await route(1.0, 0.0)
        tasks = [asyncio.create_task(stream(i, stub)) for i in range(n_streams)]
        await asyncio.sleep(0.3)
        # the new version appears on disk and is loaded while the streams run
        staged.rename(repo / MODEL / "2")
        loaded = await stub.LoadModel(pb.LoadModelRequest(name=MODEL, version=2), metadata=ADMIN)
        assert loaded.version.state == pb.MODEL_STATE_READY
        for k, (w1, w2) in enumerate(phases[1:], start=1):
            await asyncio.sleep(0.3)
            started = k
            await route(w1, w2)
            epoch = k
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)

    assert not failures, failures[:5]
    assert len(records) > 200, "the load was too light to mean anything"
    by_epoch: dict[int, dict[str, set[int]]] = {}
    for before, after, key, version, arm in records:
        assert version in (1, 2) and arm == f"v{version}"
        allowed = set()
        for e in range(before, after + 1):
            w1, _ = phases[e]
            allowed.add(1 if bucket(salt.encode(), key) < w1 else 2)
        assert version in allowed, (key, before, after, version)
        if before == after:
            by_epoch.setdefault(before, {}).setdefault(key, set()).add(version)
    for e, keys in by_epoch.items():
        assert all(len(v) == 1 for v in keys.values()), f"a key changed arm within epoch {e}"
    assert {v for keys in by_epoch.get(2, {}).values() for v in keys} == {2}
    assert {v for keys in by_epoch.get(3, {}).values() for v in keys} == {1}


def test_swap_under_load_has_no_failed_decision(
    model_repo: Path, start_server: Callable[..., PredictorServer], tmp_path: Path
) -> None:
    staged = tmp_path / "staged-v2"
    shutil.move(str(model_repo / MODEL / "2"), staged)  # v2 is not there when the server starts
    server = start_server(model_repo, default_model=MODEL, admin_token="s3cret-admin")
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(_swap_under_load(server.address, model_repo, staged), 60))
    assert time.monotonic() - t0 < 60
    assert np.isfinite(
        server.metrics.value(
            "speckv_predictor_decisions_total", {"model": MODEL, "version": "2", "arm": "v2"}
        )
    )
