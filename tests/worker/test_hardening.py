"""Issue 12, worker side: hostile but well-formed requests against a real worker on loopback.

Each test here failed on the code before the fix (see the docstrings); limits are in
docs/worker.md, "Limits".
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from speckv.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

from decode_worker.config import EngineConfig, RemotePolicyConfig, WorkerConfig
from decode_worker.sampling import SamplingParams, warp
from decode_worker.server import WorkerServer
from predictor_service.server import PredictorServer, ServerConfig
from tests.worker.engine_helpers import ForwardCounter, target_greedy, text_pair

WORKER = str(Path(sys.executable).with_name("speckv-worker"))
POSITIONS = 256  # text_pair's max_position_embeddings


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return text_pair(seed=0)


def _config(**kw: Any) -> WorkerConfig:
    base: dict[str, Any] = {
        "draft": "random-draft",
        "target": "random-target",
        "policy": "fixed:2",
        "warmup": False,
        "engine": EngineConfig(default_max_new_tokens=16, max_new_tokens_limit=64),
    }
    base.update(kw)
    return WorkerConfig(**base)


@pytest.fixture
def start_worker(pair: Any) -> Iterator[Callable[..., WorkerServer]]:
    servers: list[WorkerServer] = []

    def start(**kw: Any) -> WorkerServer:
        server = WorkerServer(_config(**kw), pair).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0.5)


class EncodeSpy:
    """Counts tokenizer calls of a worker's engine (work that must not happen on a refusal)."""

    def __init__(self, server: WorkerServer) -> None:
        self.calls = 0
        self._encode = server.engine.encode
        server.engine.encode = self  # type: ignore[method-assign]

    def __call__(self, prompt: str) -> list[int]:
        self.calls += 1
        return self._encode(prompt)


def _stub(server: WorkerServer) -> tuple[grpc.Channel, decoder_pb2_grpc.DecoderServiceStub]:
    channel = grpc.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    return channel, decoder_pb2_grpc.DecoderServiceStub(channel)


def _generate(stub: Any, **kw: Any) -> tuple[list[Any], Any]:
    chunks: list[Any] = []
    summaries: list[Any] = []
    for msg in stub.Generate(decoder_pb2.GenerateRequest(**kw), timeout=60):
        (chunks if msg.HasField("chunk") else summaries).append(msg)
    assert len(summaries) == 1
    return [m.chunk for m in chunks], summaries[0].summary


def _refusal(stub: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, **kw)
    return err.value


# --- 3: every client-supplied string is bounded at the edge, before any work -------------


@pytest.mark.parametrize(
    ("request_kw", "field", "limit"),
    [
        ({"request_id": "r" * 129}, "request_id", "128 UTF-8 bytes"),
        ({"request_id": "é" * 65}, "request_id", "128 UTF-8 bytes"),  # 65 chars, 130 bytes
        ({"request_id": "line\nbreak"}, "request_id", "printable"),
        ({"stop": ["a"] * 17}, "stop", "16 (--max-stop-strings)"),
        ({"stop": ["ok", "s" * 257]}, "stop[1]", "256 UTF-8 bytes"),
        ({"policy": "fixed:" + "9" * 59}, "policy", "64 UTF-8 bytes"),
        ({"predictor_model": {"name": "m" * 129}}, "predictor_model.name", "128 UTF-8 bytes"),
        ({"predictor_model": {"alias": "a" * 129}}, "predictor_model.alias", "128 UTF-8 bytes"),
        ({"predictor_model": {"name": "m", "version": -1}}, "predictor_model.version", "≥ 0"),
        ({"temperature": float("nan")}, "temperature", "finite"),
    ],
)
def test_client_strings_are_bounded_before_any_work(start_worker, request_kw, field, limit) -> None:  # type: ignore[no-untyped-def]
    """Before: all but the last were accepted (or refused for another reason) after work."""
    server = start_worker()
    spy = EncodeSpy(server)
    channel, stub = _stub(server)
    with channel:
        err = _refusal(stub, prompt="hello", max_new_tokens=4, **request_kw)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field) and limit in err.details(), err.details()
    assert spy.calls == 0


def test_a_request_at_every_limit_is_served(start_worker) -> None:  # type: ignore[no-untyped-def]
    server = start_worker()
    channel, stub = _stub(server)
    with channel:
        _, summary = _generate(
            stub,
            prompt="hello",
            max_new_tokens=4,
            request_id="é" * 64,
            stop=["\x00" * 256] * 16,
            policy="fixed:" + "0" * 57 + "2",
        )
    assert summary.request_id == "é" * 64 and summary.new_tokens == 4


@pytest.fixture
def predictor(model_repo: Path) -> Iterator[PredictorServer]:
    server = PredictorServer(
        ServerConfig(repo=model_repo, host="127.0.0.1", port=0, default_model="speckv-mlp16")
    )
    server.start()
    yield server
    server.stop(0.0)


def test_a_hostile_request_does_not_degrade_other_sequences(start_worker, predictor) -> None:  # type: ignore[no-untyped-def]
    """Before: a 4 MB request_id became the routing key of every Decide message of that
    sequence on the stream all sequences share; the stream broke and the concurrent
    normal generation's remote decisions fell back."""
    server = start_worker(
        predictor=predictor.address,
        policy="remote",
        # A generous timeout, so a fallback here means a broken stream, not a slow box.
        remote=RemotePolicyConfig(decision_timeout_s=2.0),
    )
    channel, stub = _stub(server)
    hostile_codes: list[grpc.StatusCode] = []

    def hostile() -> None:
        for request_id in ("x" * 4_000_000, "y" * (50 << 10), "z" * 129):
            try:
                _generate(stub, prompt="abc", max_new_tokens=40, request_id=request_id)
                hostile_codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                hostile_codes.append(err.code())

    with channel:
        attacker = threading.Thread(target=hostile)
        attacker.start()
        _, summary = _generate(stub, prompt="the quick brown fox", max_new_tokens=48)
        attacker.join(60)
        # An unknown pinned model is refused per message by the predictor; it must not
        # cost the next sequence anything either.
        _generate(stub, prompt="abc", max_new_tokens=8, predictor_model={"name": "no-such-model"})
        _, after = _generate(stub, prompt="jumps over", max_new_tokens=24)
    for s in (summary, after):
        # Step 0 has no signals yet (previous_step window): its one fallback is by design.
        assert s.fallback_decisions == 1 and s.remote_decisions == s.steps - 1, s
    assert hostile_codes == [
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # over gRPC's receive limit: never read
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]


# --- 4: prompts are refused by byte length before tokenizing ------------------------------


def test_prompt_over_the_byte_limit_is_refused_before_tokenizing(start_worker) -> None:  # type: ignore[no-untyped-def]
    """Before: the prompt was tokenized, then refused for the models' positions."""
    server = start_worker(max_prompt_bytes=1000)
    spy = EncodeSpy(server)
    channel, stub = _stub(server)
    with channel:
        err = _refusal(stub, prompt="a" * 1001)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt is over 1000 UTF-8 bytes" in err.details()
        assert "--max-prompt-bytes" in err.details()
        # Bytes, not characters: 500 two-byte characters are 1000 bytes (allowed), 501 not.
        err = _refusal(stub, prompt="é" * 501)
        assert "prompt is over 1000" in err.details()
        assert spy.calls == 0
        err = _refusal(stub, prompt="é" * 500)  # allowed in bytes; too many positions
        assert "exceeds the models' 256 positions" in err.details()
        assert spy.calls == 1


def test_default_prompt_limit_follows_the_pairs_positions(start_worker) -> None:  # type: ignore[no-untyped-def]
    """Before: no byte limit; a 4 MB prompt was received and tokenized (RSS grew by GBs
    with three of them). Now the default is 32 bytes per position and gRPC does not read a
    message far above it."""
    server = start_worker()
    spy = EncodeSpy(server)
    channel, stub = _stub(server)
    with channel:
        err = _refusal(stub, prompt="a" * (32 * POSITIONS + 1))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"prompt is over {32 * POSITIONS} UTF-8 bytes" in err.details()
        t0 = time.monotonic()
        err = _refusal(stub, prompt="a" * (4 << 20))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 5
        assert spy.calls == 0
        _, summary = _generate(stub, prompt="a" * 100, max_new_tokens=4)
        assert summary.new_tokens == 4 and spy.calls == 1
    assert server.limits.max_prompt_bytes == 32 * POSITIONS


# --- 5: tiny temperature / top_p are computed stably --------------------------------------


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1e-300, 1.0), (5e-324, 1.0), (1e-40, 1.0), (0.7, 1e-300)]
)
def test_warp_is_finite_for_tiny_temperature_and_top_p(temperature: float, top_p: float) -> None:
    """Before: softmax(logits / 1e-300) was NaN, and top_p 1e-300 kept no token at all."""
    logits = torch.randn(5, 48) * 3
    probs = warp(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert torch.isfinite(probs).all()
    # Both limits are the argmax with probability 1.
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.allclose(probs.max(-1).values, torch.ones(5))


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-300, 0.0), (5e-324, 0.0), (0.7, 1e-300)])
def test_tiny_temperature_or_top_p_generates_the_greedy_text(
    pair, start_worker, temperature, top_p
) -> None:  # type: ignore[no-untyped-def]
    """Before: UNKNOWN "probability tensor contains either inf, nan" after the first chunk."""
    server = start_worker()
    channel, stub = _stub(server)
    prompt = "the quick brown fox"
    with channel:
        chunks, summary = _generate(
            stub, prompt=prompt, max_new_tokens=24, temperature=temperature, top_p=top_p, seed=3
        )
    expected = target_greedy(pair.target, pair.tokenizer(prompt)["input_ids"], 24)
    assert [t for c in chunks for t in c.token_ids] == expected
    assert summary.new_tokens == 24


# --- 6: the concurrency limit is the flag's, and probes are never refused for load --------


def test_generate_admits_exactly_the_limit_and_probes_stay_answered(pair, start_worker) -> None:  # type: ignore[no-untyped-def]
    """Before: gRPC's maximum_concurrent_rpcs (limit + 4) admitted 6 of 6 generations with
    a limit of 2, and refused health Check and GetInfo with RESOURCE_EXHAUSTED."""
    limit, clients = 2, 6
    server = start_worker(max_concurrent_requests=limit)
    slow = ForwardCounter(pair.target, delay_s=0.02)  # generations long enough to overlap
    channel, stub = _stub(server)
    health = health_pb2_grpc.HealthStub(channel)
    calls = []
    try:
        outcomes: list[str] = []
        for _ in range(clients):
            call = stub.Generate(
                decoder_pb2.GenerateRequest(prompt="busy", max_new_tokens=64, policy="fixed:1"),
                timeout=60,
            )
            calls.append(call)
            try:
                assert next(call).HasField("chunk")
                outcomes.append("running")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-concurrent-requests 2" in err.details()
                assert ("grpc-retry-pushback-ms", "500") in (err.trailing_metadata() or ())
                outcomes.append("refused")
        assert outcomes == ["running"] * limit + ["refused"] * (clients - limit)
        assert server.servicer.running == limit
        for _ in range(10):  # while the limit is taken
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            info = stub.GetInfo(decoder_pb2.GetInfoRequest(), timeout=5)
            assert info.policy == "fixed:2"
    finally:
        for call in calls:
            call.cancel()
        slow.remove()
        channel.close()
    deadline = time.monotonic() + 10
    while server.servicer.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.servicer.running == 0  # cancelled generations give their slot back


# --- Also: GetInfo reports what the pair allows; the process exits within its grace ------


def test_get_info_reports_the_pairs_token_limit(start_worker) -> None:  # type: ignore[no-untyped-def]
    """Before: 1024 on a 256-position pair, a limit no request could reach."""
    server = start_worker(engine=EngineConfig(max_new_tokens_limit=1024))
    channel, stub = _stub(server)
    with channel:
        info = stub.GetInfo(decoder_pb2.GetInfoRequest(), timeout=10)
        assert info.max_new_tokens_limit == POSITIONS - 1
        err = _refusal(stub, prompt="x", max_new_tokens=POSITIONS)
        assert "above this worker's limit 255" in err.details()
        assert server.engine.max_new_tokens_limit == POSITIONS - 1


@pytest.fixture(scope="module")
def pair_dir(pair: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("random-pair")
    for role, model in (("draft", pair.draft), ("target", pair.target)):
        model.save_pretrained(root / role)
        pair.tokenizer.save_pretrained(root / role)
    return root


def test_serve_exits_promptly_on_sigterm(pair_dir: Path) -> None:
    """Before: 1.7-2.0 s (load 3.5) to 3.8-18 s (load 7-10) from SIGTERM to exit with nothing
    in flight, spent in the interpreter's final garbage collection over torch/transformers
    objects; after: 0.3-0.6 s."""
    proc = subprocess.Popen(
        [WORKER, "serve", "--draft", str(pair_dir / "draft"), "--target",
         str(pair_dir / "target"), "--device", "cpu", "--policy", "fixed:2", "--threads", "1",
         "--no-warmup", "--shutdown-grace-s", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.match(r"listening on \S+", line), line
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(60) == 0
        # Nothing was in flight, so the 1 s grace does not apply.
        assert time.monotonic() - t0 < 1.2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_limit_flags_reach_the_config() -> None:
    import argparse

    from decode_worker import serve_cli
    from decode_worker.config import ConfigError

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    base = ["--draft", "d", "--target", "t", "--policy", "fixed:2"]
    flags = "--max-prompt-bytes 5000 --max-stop-strings 3 --max-stop-string-bytes 40"
    flags += " --max-request-id-bytes 64 --max-concurrent-requests 3"
    cfg = serve_cli.build_config(parser.parse_args([*base, *flags.split()]))
    assert (cfg.max_prompt_bytes, cfg.max_stop_strings, cfg.max_stop_string_bytes) == (
        5000,
        3,
        40,
    )
    assert cfg.max_request_id_bytes == 64 and cfg.max_concurrent_requests == 3
    with pytest.raises(SystemExit):  # argparse: exit 2 naming the flag and its range
        parser.parse_args([*base, "--max-request-id-bytes", "257"])
    with pytest.raises(ConfigError, match="--max-request-id-bytes"):
        WorkerConfig(draft="d", target="t", max_request_id_bytes=257)


def test_objective_enum_out_of_range_is_invalid_argument(start_worker) -> None:  # type: ignore[no-untyped-def]
    server = start_worker()
    channel, stub = _stub(server)
    with channel:
        err = _refusal(stub, prompt="x", objective=99)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "objective" in err.details()
    assert common_pb2.OBJECTIVE_GOODPUT != 99
