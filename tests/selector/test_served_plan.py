"""The draft_plan window through real servers: old and new models side by side, the
worker's remote plan policy end to end (exact output, few messages), failures, discovery."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from speckv.draft_plan import goodput_thresholds
from speckv_client.predictor import PredictorClient
from speckv_client.types import (
    Compression,
    DecideBatch,
    FeatureRow,
    ModelSelector,
    Objective,
    StepTiming,
    Window,
)

from decode_worker.config import ConfigError, EngineConfig, RemotePolicyConfig
from decode_worker.discovery import resolve_remote
from decode_worker.engine import SpeculativeEngine
from decode_worker.policies import DecisionSource
from decode_worker.remote_policy import RemotePlanSequence, RemotePolicy
from predictor_service.server import PredictorServer, ServerConfig
from tests.selector.conftest import INSTEP
from tests.worker.engine_helpers import prompts, random_pair, target_greedy, wait_connected

NEW = 30
TIMEOUT_S = 2.0
TIMING = StepTiming(0.0006, 0.009, 0.0002, 0.007)


def _start(repo: Path, default: str = INSTEP, port: int = 0) -> PredictorServer:
    server = PredictorServer(
        ServerConfig(repo=repo, host="127.0.0.1", port=port, default_model=default)
    )
    server.start()
    return server


@pytest.fixture
def predictor(plan_repo: Path) -> Iterator[PredictorServer]:
    server = _start(plan_repo)
    yield server
    server.stop(0.0)


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return random_pair(seed=0, noise=0.3)


def _plan_row(key: str = "seq-1", step: int = 0) -> FeatureRow:
    return FeatureRow(routing_key=key, step=step, signals=None, compression=Compression.NF4)


def test_plan_and_previous_step_models_are_served_side_by_side(predictor) -> None:  # type: ignore[no-untyped-def]
    with PredictorClient(predictor.address) as client:
        (d,) = client.decide(
            DecideBatch(
                rows=(_plan_row(),),
                gamma_candidates=(6,),
                window=Window.DRAFT_PLAN,
                objective=Objective.GOODPUT,
                timing=TIMING,
            )
        )
        assert d.model_name == INSTEP and d.model_version == 1 and d.plan is not None
        plan = d.plan
        assert plan.problem() is None
        assert plan.max_gamma == 6 == d.gamma  # capped by the largest candidate
        assert len(plan.acceptance) == 480
        want = goodput_thresholds(0.0006, 0.009, 0.0002, 0.007)
        assert plan.first_threshold == pytest.approx(want.first)
        assert plan.continue_threshold == pytest.approx(want.keep_going)
        # The model learned the synthetic rule: a long context match agrees more often.
        runner_vals = {a.feature: a for a in plan.axes}
        assert "match_length" in runner_vals
        assert max(plan.acceptance) - min(plan.acceptance) > 0.3
        # The seed's previous_step model keeps serving on the same server.
        from speckv_client.types import DraftSignals

        (old,) = client.decide(
            DecideBatch(
                rows=(FeatureRow("seq-2", 3, DraftSignals(1.0, 0.7, 2.0, 0.4), Compression.NF4),),
                window=Window.PREVIOUS_STEP,
                objective=Objective.GOODPUT,
                timing=TIMING,
                model=ModelSelector(name="speckv-mlp16"),
            )
        )
        assert old.model_name == "speckv-mlp16" and old.plan is None and old.gamma in (2, 4, 6, 8)
        # tokens_per_step: no stop rule, the worker drafts up to max_gamma.
        (tps,) = client.decide(
            DecideBatch(
                rows=(_plan_row(),),
                gamma_candidates=(8,),
                window=Window.DRAFT_PLAN,
                objective=Objective.TOKENS_PER_STEP,
            )
        )
        assert tps.plan is not None and tps.plan.first_threshold == 0.0


def test_windows_and_models_must_match(predictor) -> None:  # type: ignore[no-untyped-def]
    from speckv_client.errors import PredictorRequestError

    with PredictorClient(predictor.address) as client:
        with pytest.raises(PredictorRequestError, match="draft_plan"):
            client.decide(
                DecideBatch(
                    rows=(_plan_row(),),
                    window=Window.DRAFT_PLAN,
                    timing=TIMING,
                    model=ModelSelector(name="speckv-mlp16"),
                )
            )
        with pytest.raises(PredictorRequestError, match="timing"):
            client.decide(
                DecideBatch(
                    rows=(_plan_row(),), window=Window.DRAFT_PLAN, objective=Objective.GOODPUT
                )
            )


def _plan_policy(stream, engine, **kw) -> RemotePolicy:  # type: ignore[no-untyped-def]
    settings = {"decision_timeout_s": TIMEOUT_S, **kw}
    cfg = RemotePolicyConfig(window=Window.DRAFT_PLAN, objective=Objective.GOODPUT, **settings)
    return RemotePolicy(stream, cfg, engine.timing)


def test_remote_plan_is_exact_remote_from_step_0_and_asks_rarely(pair, predictor) -> None:  # type: ignore[no-untyped-def]
    client = PredictorClient(predictor.address)
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        engine.warmup(gammas=(0, 2, 4), repeats=1)
        policy = _plan_policy(stream, engine)
        for prompt in prompts(3):
            run = engine.start(prompt, policy, max_new_tokens=NEW)
            steps = list(run)
            assert run.result is not None
            assert list(run.result.token_ids) == target_greedy(pair.target, prompt, NEW)
            assert all(s.decision.source == DecisionSource.REMOTE for s in steps)
            assert all(s.decision.model_name == INSTEP for s in steps)
            assert all(s.drafted >= s.gamma for s in steps)
        # One plan per sequence at start plus one per refresh_steps (6) steps.
        seq = policy.start(_info())
        assert isinstance(seq, RemotePlanSequence)
        seq.close()
    finally:
        stream.close()
        client.close()


def _info():  # type: ignore[no-untyped-def]
    from decode_worker.policies import SequenceInfo

    return SequenceInfo("probe", "fp16")


def test_messages_per_step_follow_refresh_steps(pair, predictor) -> None:  # type: ignore[no-untyped-def]
    client = PredictorClient(predictor.address)
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        engine.warmup(gammas=(0, 2, 4), repeats=1)
        policy = _plan_policy(stream, engine)
        seq_policies: list[RemotePlanSequence] = []
        original = policy.start

        def spy(info):  # type: ignore[no-untyped-def]
            s = original(info)
            seq_policies.append(s)  # type: ignore[arg-type]
            return s

        policy.start = spy  # type: ignore[method-assign]
        result = engine.generate(prompts(1, seed=4)[0], policy, max_new_tokens=60)
        (seq,) = seq_policies
        steps = result.stats.num_steps
        assert seq.requests_sent <= 1 + steps // 6 + 1
        assert seq.plans_received >= 1
        assert seq.requests_sent < steps  # fewer messages than steps
    finally:
        stream.close()
        client.close()


def test_predictor_killed_mid_generation_loses_nothing(pair, plan_repo: Path) -> None:  # type: ignore[no-untyped-def]
    server = _start(plan_repo)
    port = server.port
    client = PredictorClient(server.address)
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        engine.warmup(gammas=(0, 2, 4), repeats=1)
        policy = _plan_policy(stream, engine)
        prompt = prompts(1, seed=11)[0]
        n = 40
        run = engine.start(prompt, policy, max_new_tokens=n)
        steps = []
        for step in run:
            steps.append(step)
            if len(steps) == 3:
                server.stop(0.0)
        assert run.result is not None
        assert list(run.result.token_ids) == target_greedy(pair.target, prompt, n)
        # The plan in hand keeps deciding after the predictor died.
        assert all(s.decision.source == DecisionSource.REMOTE for s in steps)
        # A new sequence without a plan decodes on the fallback γ, exactly.
        fallback = engine.generate(
            prompt, _plan_policy(stream, engine, decision_timeout_s=0.05), max_new_tokens=n
        )
        assert list(fallback.token_ids) == target_greedy(pair.target, prompt, n)
        assert fallback.steps[0].decision.source == DecisionSource.FALLBACK
        # Restarted on the same port, the same stream reconnects and plans come back.
        server = _start(plan_repo, port=port)
        wait_connected(stream)
        again = engine.generate(prompt, policy, max_new_tokens=n)
        assert list(again.token_ids) == target_greedy(pair.target, prompt, n)
        assert again.steps[0].decision.source == DecisionSource.REMOTE
    finally:
        stream.close()
        client.close()
        server.stop(0.0)


def test_late_plan_falls_back_then_is_used(pair) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = PredictorClient(dead)
    stream = client.decision_stream()
    try:
        engine = SpeculativeEngine(pair, EngineConfig())
        engine.warmup(gammas=(0, 2), repeats=1)
        policy = _plan_policy(stream, engine, decision_timeout_s=0.05, fallback_gamma=3)
        prompt = prompts(1)[0]
        result = engine.generate(prompt, policy, max_new_tokens=NEW)
        assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
        assert all(s.decision.source == DecisionSource.FALLBACK for s in result.steps)
        assert max(s.decision.wait_seconds for s in result.steps) < 0.5
    finally:
        stream.close()
        client.close()


def test_worker_learns_the_window_from_the_served_model(predictor) -> None:  # type: ignore[no-untyped-def]
    with PredictorClient(predictor.address) as client:
        cfg, how = resolve_remote(RemotePolicyConfig(), None, client, "")
        assert cfg.window == Window.DRAFT_PLAN and "draft_plan" in how
        cfg, _ = resolve_remote(RemotePolicyConfig(), None, client, "speckv-mlp16")
        assert cfg.window == Window.PREVIOUS_STEP
        with pytest.raises(ConfigError, match="does not match"):
            resolve_remote(RemotePolicyConfig(), Window.PREVIOUS_STEP, client, "")
        # A flag that agrees is accepted.
        cfg, _ = resolve_remote(RemotePolicyConfig(), Window.DRAFT_PLAN, client, "")
        assert cfg.window == Window.DRAFT_PLAN


def test_unreachable_predictor_without_window_is_refused_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with (
        PredictorClient(dead, timeout_s=0.5) as client,
        pytest.raises(ConfigError, match="--window"),
    ):
        resolve_remote(RemotePolicyConfig(), None, client, "", wait_s=0.5)


def test_train_cli_instep(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.selector.conftest import write_token_csv

    def train(data: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(str(Path(sys.executable).parent / "speckv-predictor"), "train"),
                *("--model-kind", "instep", "--data", str(data)),
                *("--repo", str(tmp_path / "repo"), "--name", "m", "--quiet"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = train(write_token_csv(tmp_path / "t.csv", rows=800))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["window"] == "draft_plan" and 0.5 < out["heldout_prompts_auc"] <= 1.0
    manifest = json.loads((tmp_path / "repo" / "m" / "1" / "manifest.json").read_text())
    assert manifest["plan"]["max_gamma"] == 16 and manifest["window"] == "draft_plan"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    proc = train(bad)
    assert proc.returncode == 2 and "missing columns" in proc.stderr
