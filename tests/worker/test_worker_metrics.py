"""Worker Prometheus metrics (issue 10), scraped over HTTP from a real worker server with a
real predictor: the values equal what the GenerationSummaries say."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from speckv.v1 import decoder_pb2, decoder_pb2_grpc
from speckv_client.types import DecisionSource, Objective

from decode_worker.config import EngineConfig, RemotePolicyConfig, WorkerConfig
from decode_worker.engine import StepResult
from decode_worker.metrics import OTHER, WorkerMetrics
from decode_worker.policies import GammaDecision
from decode_worker.server import WorkerServer
from predictor_service.server import PredictorServer, ServerConfig
from tests.worker.engine_helpers import ForwardCounter, text_pair, wait_connected

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _predictor(repo: Path, port: int = 0) -> PredictorServer:
    server = PredictorServer(
        ServerConfig(repo=repo, host="127.0.0.1", port=port, default_model="speckv-mlp16")
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return text_pair(seed=0)


@pytest.fixture
def predictor(model_repo: Path) -> Iterator[PredictorServer]:
    server = _predictor(model_repo)
    yield server
    server.stop(0.0)


def _worker(
    pair: Any, predictor_address: str = "", policy: str = "fixed:2", batching: bool = False
) -> WorkerServer:
    config = WorkerConfig(
        batching=batching,
        draft="random-draft",
        target="random-target",
        predictor=predictor_address,
        policy=policy,
        warmup=False,
        metrics_port=0,
        # Generous: these tests count where decisions came from, not latency.
        remote=RemotePolicyConfig(objective=Objective.TOKENS_PER_STEP, decision_timeout_s=2.0),
        engine=EngineConfig(default_max_new_tokens=24, max_new_tokens_limit=64),
    )
    return WorkerServer(config, pair).start()


def _generate(address: str, **kw: object) -> decoder_pb2.GenerationSummary:
    with grpc.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        events = list(stub.Generate(decoder_pb2.GenerateRequest(**kw), timeout=60))
    return events[-1].summary


@pytest.mark.parametrize("batching", [False, True], ids=["interleaved", "batched"])
def test_scraped_metrics_equal_the_generation_summaries(pair, predictor, batching) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(pair, predictor.address, policy="remote", batching=batching)
    try:
        assert worker._predictor is not None
        wait_connected(worker._predictor.stream)
        t0 = time.perf_counter()
        summaries = [
            _generate(worker.address, prompt="hello world", max_new_tokens=30, request_id="a"),
            _generate(worker.address, prompt="the cat sat", max_new_tokens=20, request_id="b"),
            _generate(worker.address, prompt="abc", policy="fixed:3", request_id="c"),
        ]
        m = scrape(worker.metrics_url)
        window = time.perf_counter() - t0  # encloses all the scheduler's counted work
    finally:
        worker.stop(0.5)
    assert sum(s.remote_decisions for s in summaries) > 0  # the predictor decided steps
    assert sum(s.local_decisions for s in summaries) == summaries[2].steps
    steps = sum(s.steps for s in summaries)
    drafted = sum(round(s.mean_gamma * s.steps) for s in summaries)
    accepted = sum(round(s.acceptance_rate * round(s.mean_gamma * s.steps)) for s in summaries)
    assert value(m, "speckv_worker_tokens_total") == sum(s.new_tokens for s in summaries) == 74
    assert value(m, "speckv_worker_steps_total") == steps
    assert value(m, "speckv_worker_drafted_tokens_total") == drafted
    assert value(m, "speckv_worker_accepted_tokens_total") == accepted
    assert value(m, "speckv_worker_gamma_count") == steps
    assert value(m, "speckv_worker_gamma_sum") == drafted
    for source in ("remote", "fallback", "local"):
        expected = sum(getattr(s, f"{source}_decisions") for s in summaries)
        assert value(m, "speckv_worker_decisions_total", source=source) == expected, source
    assert value(m, "speckv_worker_decision_wait_seconds_count") == steps
    assert value(m, "speckv_worker_decision_wait_seconds_sum") == pytest.approx(
        sum(s.decision_wait_seconds for s in summaries), rel=1e-6, abs=1e-9
    )
    wall = sum(s.wall_seconds for s in summaries)
    assert value(m, "speckv_worker_generation_seconds_total") == pytest.approx(wall, rel=0.05)
    assert value(m, "speckv_worker_generations_total", finish_reason="length") == 3
    # Per predictor arm: the summaries' model_versions ("model:version" -> steps), split by arm.
    arm_steps = series(m, "speckv_worker_arm_steps_total")
    by_version: dict[str, float] = {}
    for labels, v in arm_steps.items():
        d = dict(labels)
        assert d["model"] == "speckv-mlp16" and d["arm"]
        key = f"{d['model']}:{d['version']}"
        by_version[key] = by_version.get(key, 0) + v
    expected_versions: dict[str, float] = {}
    for s in summaries:
        for key, n in s.model_versions.items():
            expected_versions[key] = expected_versions.get(key, 0) + n
    assert by_version == expected_versions
    arm_tokens = sum(series(m, "speckv_worker_arm_tokens_total").values())
    assert 0 < arm_tokens <= value(m, "speckv_worker_tokens_total")
    assert value(m, "speckv_worker_active_requests") == 0
    assert value(m, "speckv_worker_queued_requests") == 0
    assert value(m, "speckv_worker_predictor_stream_reconnects_total") == 0
    assert value(m, "speckv_worker_predictor_connected") == 1
    assert value(m, "speckv_worker_records_dropped_total") == 0
    if batching:  # one request at a time: every step is a one-row batch, every join one row
        assert value(m, "speckv_worker_batch_steps") == steps
        assert value(m, "speckv_worker_batch_joins") == 3
        step_s = value(m, "speckv_worker_batch_step_seconds")
        forward_s = value(m, "speckv_worker_batch_forward_seconds")
        join_s = value(m, "speckv_worker_batch_join_seconds")
        assert 0 < forward_s < step_s and join_s > 0
        # Steps by batch size and verify width: one row each, widths summing to the drafts.
        widths = series(m, "speckv_worker_batch_width_steps_total")
        assert sum(widths.values()) == steps
        assert {dict(k)["rows"] for k in widths} == {"1"}
        assert sum(int(dict(k)["width"]) * n for k, n in widths.items()) == drafted
        # Not the requests' own walls: a request's wall ends when its result is made, inside
        # its last step, whose remaining bookkeeping still counts as step time (CI saw
        # 0.7694 s of steps and joins against 0.7690 s of walls). The scrape came after.
        assert step_s + join_s < window


def test_reconnects_are_counted_from_the_decision_stream(pair, model_repo: Path) -> None:  # type: ignore[no-untyped-def]
    predictor = _predictor(model_repo)
    worker = _worker(pair, predictor.address, policy="remote")
    try:
        assert worker._predictor is not None
        stream = worker._predictor.stream
        wait_connected(stream)
        port = predictor.port
        predictor.stop(0.0)
        predictor = _predictor(model_repo, port=port)  # the same stream object reconnects
        deadline = time.monotonic() + 30
        while stream.stats.streams_opened < 2 or not stream.connected:
            assert time.monotonic() < deadline, "the stream did not reconnect"
            time.sleep(0.05)
        m = scrape(worker.metrics_url)
        assert (
            value(m, "speckv_worker_predictor_stream_reconnects_total")
            == (stream.stats.streams_opened - 1)
            >= 1
        )
        s = _generate(worker.address, prompt="hello", max_new_tokens=12)
        assert s.remote_decisions > 0
    finally:
        worker.stop(0.5)
        predictor.stop(0.0)


def test_a_generation_is_queued_until_its_first_step_then_active(pair) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(pair)
    slow = ForwardCounter(pair.target, delay_s=0.05)
    try:
        done: list[decoder_pb2.GenerationSummary] = []
        with worker.engine.device_lock:  # the device is busy: the request cannot prefill
            t = threading.Thread(
                target=lambda: done.append(_generate(worker.address, prompt="abc")), daemon=True
            )
            t.start()
            deadline = time.monotonic() + 30
            while value(scrape(worker.metrics_url), "speckv_worker_queued_requests") != 1:
                assert time.monotonic() < deadline, "the request never showed as queued"
                time.sleep(0.05)
            assert value(scrape(worker.metrics_url), "speckv_worker_active_requests") == 0
        # Streaming now (a slowed target keeps it going): active, no longer queued.
        deadline = time.monotonic() + 30
        while True:
            m = scrape(worker.metrics_url)
            active = value(m, "speckv_worker_active_requests")
            if active == 1 and value(m, "speckv_worker_queued_requests") == 0:
                break
            assert not done and time.monotonic() < deadline, "never seen active"
            time.sleep(0.02)
        t.join(60)
        assert done and done[0].new_tokens == 24
        m = scrape(worker.metrics_url)
        assert value(m, "speckv_worker_queued_requests") == 0
        assert value(m, "speckv_worker_active_requests") == 0
        assert value(m, "speckv_worker_tokens_total") == 24
    finally:
        slow.remove()
        worker.stop(0.5)


def _remote_step(
    model: str, version: int, arm: str, gamma: int = 4, accepted: int = 2
) -> StepResult:
    return StepResult(
        step=1,
        gamma=gamma,
        accepted=accepted,
        token_ids=tuple(range(accepted + 1)),
        text="",
        decision=GammaDecision(gamma, DecisionSource.REMOTE, model, version, arm, 0.001),
        signals=None,
        token_signals=(),
        drafted=gamma,
        draft_seconds=0.0,
        verify_seconds=0.0,
        draft_tokens_processed=gamma,
        target_tokens_processed=gamma + 1,
        draft_cache_len=0,
        target_cache_len=0,
    )


def test_arm_label_sets_are_capped() -> None:
    metrics = WorkerMetrics(max_arms=2)
    for arm in ("stable", "canary", "x1", "x2", "stable"):
        metrics.observe_step(_remote_step("m", 1, arm), 0.01)
    steps = {
        tuple(s.labels[k] for k in ("model", "version", "arm")): s.value
        for family in metrics.registry.collect()
        if family.name == "speckv_worker_arm_steps"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert steps == {("m", "1", "stable"): 2, ("m", "1", "canary"): 1, (OTHER, OTHER, OTHER): 2}
    assert metrics.value("speckv_worker_arm_accepted_tokens_total", dict(
        model=OTHER, version=OTHER, arm=OTHER)) == 4  # fmt: skip


def test_a_taken_metrics_port_is_a_clear_error(pair) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = WorkerConfig(
            draft="d", target="t", policy="fixed:2", warmup=False, metrics_port=port
        )
        server = WorkerServer(config, pair)
        with pytest.raises(OSError, match=f"could not serve metrics on 127.0.0.1:{port}"):
            server.start()
