"""DecoderService over a real gRPC server (in-process) on a random pair with a char tokenizer."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speckv.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

from decode_worker.config import EngineConfig, WorkerConfig
from decode_worker.records import COLUMNS
from decode_worker.server import WorkerServer
from tests.worker.engine_helpers import ForwardCounter, target_greedy, text_pair

NEW = 20


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return text_pair(seed=0)


def _config(**kw: object) -> WorkerConfig:
    base: dict[str, object] = {
        "draft": "random-draft",
        "target": "random-target",
        "policy": "fixed:2",
        "warmup": False,
        "engine": EngineConfig(default_max_new_tokens=16, max_new_tokens_limit=64),
    }
    base.update(kw)
    return WorkerConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def worker(pair, tmp_path: Path) -> Iterator[WorkerServer]:  # type: ignore[no-untyped-def]
    server = WorkerServer(_config(log_steps=str(tmp_path / "steps.csv")), pair).start()
    yield server
    server.stop(0.5)


@pytest.fixture
def stub(worker: WorkerServer) -> Iterator[decoder_pb2_grpc.DecoderServiceStub]:
    channel = grpc.insecure_channel(worker.address)
    yield decoder_pb2_grpc.DecoderServiceStub(channel)
    channel.close()


def _generate(stub, **kw):  # type: ignore[no-untyped-def]
    chunks, summaries = [], []
    for msg in stub.Generate(decoder_pb2.GenerateRequest(**kw), timeout=60):
        (chunks if msg.HasField("chunk") else summaries).append(msg)
    assert len(summaries) == 1
    return [m.chunk for m in chunks], summaries[0].summary


@pytest.mark.parametrize("policy", ["fixed:2", "fixed:8", "heuristic"])
def test_generate_streams_the_targets_greedy_output(pair, stub, worker, policy) -> None:  # type: ignore[no-untyped-def]
    prompt = "the quick brown fox"
    chunks, summary = _generate(
        stub, prompt=prompt, max_new_tokens=NEW, policy=policy, request_id="req-1"
    )
    ids = pair.tokenizer(prompt)["input_ids"]
    expected = target_greedy(pair.target, ids, NEW)
    assert [t for c in chunks for t in c.token_ids] == expected
    assert "".join(c.text for c in chunks) == summary.text == pair.tokenizer.decode(expected)
    assert summary.new_tokens == NEW and summary.steps == len(chunks)
    assert summary.finish_reason == decoder_pb2.FINISH_REASON_LENGTH
    assert summary.request_id == "req-1"
    assert summary.local_decisions == summary.steps
    assert summary.tokens_per_step == pytest.approx(NEW / summary.steps)
    for c in chunks:
        assert c.step.source == decoder_pb2.DECISION_SOURCE_LOCAL
        assert c.step.tokens_produced == len(c.token_ids)
        assert c.step.verify_seconds > 0
        if c.step.gamma:
            assert 0 <= c.step.signals.min_draft_confidence <= 1


def test_default_max_new_tokens_and_generated_request_id(stub) -> None:  # type: ignore[no-untyped-def]
    _, summary = _generate(stub, prompt="hello")
    assert summary.new_tokens == 16
    assert len(summary.request_id) >= 16


def test_step_records_are_written(stub, worker) -> None:  # type: ignore[no-untyped-def]
    _, summary = _generate(stub, prompt="abc", max_new_tokens=NEW, request_id="rec")
    with open(worker.config.log_steps, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == COLUMNS
    mine = [r for r in rows if r["sequence_id"] == "rec"]
    assert len(mine) == summary.steps
    assert mine[0]["prev_mean_draft_entropy"] == "" and mine[1]["prev_mean_draft_entropy"] != ""
    assert mine[1]["prev_mean_draft_entropy"] == mine[0]["mean_draft_entropy"]
    assert all(r["compression"] == "fp16" and r["task"] == "live" for r in mine)
    assert sum(int(r["tokens_produced"]) for r in mine) == NEW


def test_get_info(stub) -> None:  # type: ignore[no-untyped-def]
    info = stub.GetInfo(decoder_pb2.GetInfoRequest(), timeout=10)
    assert info.draft_model == "random-draft" and info.target_model == "random-target"
    assert info.compression == common_pb2.COMPRESSION_FP16
    assert info.policy == "fixed:2"
    assert info.max_new_tokens_limit == 64
    assert "lock" in info.concurrency
    assert info.device == "cpu"


@pytest.mark.parametrize(
    ("request_kw", "reason"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "x", "max_new_tokens": 65}, "above this worker's limit 64"),
        ({"prompt": "x", "temperature": -0.5}, "temperature must be"),
        ({"prompt": "x", "top_p": 1.5}, "top_p must be"),
        ({"prompt": "x", "policy": "fastest"}, "unknown policy 'fastest'"),
        ({"prompt": "x", "policy": "fixed:two"}, "not an integer"),
        ({"prompt": "x", "policy": "remote"}, "without --predictor"),
        (
            {"prompt": "x", "objective": common_pb2.OBJECTIVE_GOODPUT},
            "remote policy only",
        ),
    ],
)
def test_bad_requests_are_invalid_argument(stub, request_kw, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, **request_kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()


def test_concurrent_requests_do_not_share_state(pair, stub) -> None:  # type: ignore[no-untyped-def]
    prompts = ["one fish", "two fish, red fish", "blue", "(x)"]
    results: dict[str, list[int]] = {}

    def call(p: str) -> None:
        chunks, _ = _generate(stub, prompt=p, max_new_tokens=NEW, policy="heuristic")
        results[p] = [t for c in chunks for t in c.token_ids]

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in prompts:
        assert results[p] == target_greedy(pair.target, pair.tokenizer(p)["input_ids"], NEW)


def test_cancelled_client_stops_its_generation(pair, stub) -> None:  # type: ignore[no-untyped-def]
    counter = ForwardCounter(pair.target, delay_s=0.02)
    try:
        call = stub.Generate(
            decoder_pb2.GenerateRequest(prompt="cancel me", max_new_tokens=64, policy="fixed:1"),
            timeout=60,
        )
        next(call)
        call.cancel()
        time.sleep(0.3)
        settled = len(counter.calls)
        time.sleep(0.5)
        assert len(counter.calls) == settled  # no more target forwards
        # 64 tokens at γ=1 need ≥ 32 target forwards; a cancel after the first chunk
        # leaves at most the prefill, the first steps and the step in flight.
        assert settled <= 8
    finally:
        counter.remove()


def test_health_and_graceful_stop(pair) -> None:  # type: ignore[no-untyped-def]
    server = WorkerServer(_config(), pair).start()
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "speckv.v1.DecoderService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = decoder_pb2_grpc.DecoderServiceStub(channel)
    # A generation in flight when shutdown starts still completes within the grace.
    call = stub.Generate(decoder_pb2.GenerateRequest(prompt="finish me", max_new_tokens=40))
    first = next(call)
    assert first.HasField("chunk")
    stopper = threading.Thread(target=server.stop, args=(10.0,))
    stopper.start()
    rest = list(call)
    stopper.join(15)
    assert rest[-1].HasField("summary") and rest[-1].summary.new_tokens == 40
    channel.close()


def test_warmup_measures_timing_but_writes_no_records(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "w.csv"
    server = WorkerServer(_config(log_steps=str(log), warmup=True), pair).start()
    try:
        snap = server.engine.timing.snapshot()
        assert snap is not None and snap.verify_base_seconds > 0
        assert snap.draft_seconds_per_token > 0
        with open(log, newline="") as fh:
            assert len(list(csv.reader(fh))) == 1  # header only
    finally:
        server.stop(0.5)
