"""The remote policy against a real predictor server and the real client stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from speckv_client.predictor import PredictorClient
from speckv_client.types import ModelSelector, Objective, Window

from decode_worker.config import EngineConfig, RemotePolicyConfig
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import DecisionSource
from decode_worker.remote_policy import RemotePolicy
from predictor_service.server import PredictorServer, ServerConfig
from tests.worker.engine_helpers import (
    prompts,
    random_pair,
    target_greedy,
    wait_answering,
    wait_connected,
)

NEW = 24
# Generous: these tests check where decisions come from, not latency, on a busy CI box.
TIMEOUT_S = 2.0


def _start_predictor(repo: Path, port: int = 0) -> PredictorServer:
    server = PredictorServer(
        ServerConfig(repo=repo, host="127.0.0.1", port=port, default_model="speckv-mlp16")
    )
    server.start()
    return server


@pytest.fixture
def predictor(model_repo: Path) -> Iterator[PredictorServer]:
    server = _start_predictor(model_repo)
    yield server
    server.stop(0.0)


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return random_pair(seed=0, noise=0.3)


@pytest.fixture
def stream(predictor: PredictorServer) -> Iterator[object]:
    client = PredictorClient(predictor.address)
    s = client.decision_stream()
    wait_connected(s)
    yield s
    s.close()
    client.close()


@pytest.mark.parametrize("objective", [Objective.GOODPUT, Objective.TOKENS_PER_STEP])
def test_previous_step_window_is_exact_and_remote_after_step_0(pair, stream, objective) -> None:  # type: ignore[no-untyped-def]
    engine = SpeculativeEngine(pair, EngineConfig())
    policy = RemotePolicy(
        stream, RemotePolicyConfig(objective=objective, decision_timeout_s=TIMEOUT_S), engine.timing
    )
    for prompt in prompts(3):
        result = engine.generate(prompt, policy, max_new_tokens=NEW)
        assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
        first, *rest = result.steps
        assert first.decision.source == DecisionSource.FALLBACK
        assert first.gamma == 4
        assert rest and all(s.decision.source == DecisionSource.REMOTE for s in rest)
        for s in rest:
            assert s.decision.model_name == "speckv-mlp16"
            assert s.decision.model_version in (1, 2)
            assert s.decision.arm
            assert s.decision.gamma in (2, 4, 6, 8)
        assert result.stats.remote_decisions == len(rest)
        assert sum(result.stats.model_versions.values()) == len(rest)


def test_prefix_window_asks_every_step(pair, stream) -> None:  # type: ignore[no-untyped-def]
    engine = SpeculativeEngine(pair, EngineConfig())
    config = RemotePolicyConfig(
        window=Window.PREFIX,
        objective=Objective.TOKENS_PER_STEP,
        decision_timeout_s=TIMEOUT_S,
        model=ModelSelector(name="speckv-mlp16-same-step"),
    )
    policy = RemotePolicy(stream, config, engine.timing)
    prompt = prompts(1, seed=8)[0]
    result = engine.generate(prompt, policy, max_new_tokens=NEW)
    assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
    for s in result.steps:
        if s.decision.source == DecisionSource.REMOTE:
            assert s.decision.model_name == "speckv-mlp16-same-step"
    # Near the end the engine may cap the prefix; every other step is a remote answer.
    assert result.steps[0].decision.source == DecisionSource.REMOTE
    assert result.stats.remote_decisions >= result.stats.num_steps - 2


def test_refused_message_falls_back(pair, stream) -> None:  # type: ignore[no-untyped-def]
    engine = SpeculativeEngine(pair, EngineConfig())
    config = RemotePolicyConfig(
        objective=Objective.TOKENS_PER_STEP,
        decision_timeout_s=TIMEOUT_S,
        model=ModelSelector(name="no-such-model"),
        fallback_gamma=3,
    )
    policy = RemotePolicy(stream, config, engine.timing)
    prompt = prompts(1)[0]
    result = engine.generate(prompt, policy, max_new_tokens=12)
    assert list(result.token_ids) == target_greedy(pair.target, prompt, 12)
    assert all(s.decision.source == DecisionSource.FALLBACK for s in result.steps)
    assert all(
        s.gamma == min(3, 12 - sum(len(p.token_ids) for p in result.steps[: s.step]) - 1)
        for s in result.steps
    )


def test_kill_predictor_mid_generation_then_restart(pair, model_repo: Path) -> None:  # type: ignore[no-untyped-def]
    server = _start_predictor(model_repo)
    port = server.port
    client = PredictorClient(server.address)
    # A short stall timeout: a new stream that reaches the server in the instant it stops
    # can hang unanswered without ever breaking; the stream must replace it by itself.
    stream = client.decision_stream(stall_timeout_s=1.0)
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = RemotePolicy(
            stream,
            RemotePolicyConfig(objective=Objective.TOKENS_PER_STEP, decision_timeout_s=TIMEOUT_S),
            engine.timing,
        )
        prompt = prompts(1, seed=11)[0]
        n = 40
        run = engine.start(prompt, policy, max_new_tokens=n)
        steps = []
        killed_after = None
        for step in run:
            steps.append(step)
            if len(steps) == 4:
                server.stop(0.0)
                killed_after = step.step
        assert run.result is not None and killed_after is not None
        assert list(run.result.token_ids) == target_greedy(pair.target, prompt, n)
        assert any(s.decision.source == DecisionSource.REMOTE for s in steps[:4])
        later = [s for s in steps if s.step > killed_after + 1]
        assert later and all(s.decision.source == DecisionSource.FALLBACK for s in later)

        # Restart on the same port: the same stream object reconnects by itself.
        server = _start_predictor(model_repo, port=port)
        wait_answering(stream)
        result = engine.generate(prompt, policy, max_new_tokens=n)
        assert list(result.token_ids) == target_greedy(pair.target, prompt, n)
        assert result.stats.remote_decisions >= result.stats.num_steps - 2
    finally:
        stream.close()
        client.close()
        server.stop(0.0)


def test_unreachable_predictor_never_blocks_decoding(pair) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = PredictorClient(dead)
    stream = client.decision_stream()
    try:
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = RemotePolicy(
            stream, RemotePolicyConfig(decision_timeout_s=0.05, fallback_gamma=2), engine.timing
        )
        prompt = prompts(1)[0]
        started = time.perf_counter()
        result = engine.generate(prompt, policy, max_new_tokens=NEW)
        assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
        assert all(s.decision.source == DecisionSource.FALLBACK for s in result.steps)
        # Each step waited at most the decision timeout (plus scheduling slack).
        assert max(s.decision.wait_seconds for s in result.steps) < 0.5
        assert time.perf_counter() - started < 30
    finally:
        stream.close()
        client.close()
