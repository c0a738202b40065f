"""The worker reports every step's outcome to the predictor on its Decide stream.

Real parts only: the worker's speculative engine and remote policy, the client library's
DecisionStream, and the real predictor server (predictor_service) counting outcomes per
arm; what the predictor counted is read back with GetArmStats and compared, exactly, with
the worker's own results (StepResult / SpecStats).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from speckv_client.predictor import PredictorClient
from speckv_client.types import (
    ArmStatsReport,
    ModelSelector,
    Objective,
    RouteWeight,
    Routing,
    Window,
)

from decode_worker.config import EngineConfig, RemotePolicyConfig
from decode_worker.engine import GenerationResult, SpeculativeEngine
from decode_worker.policies import DecisionSource
from decode_worker.remote_policy import RemotePolicy
from predictor_service.server import PredictorServer, ServerConfig
from tests.conftest import INSTEP, MODEL_NAME
from tests.worker.engine_helpers import prompts, random_pair, target_greedy, wait_connected

pytestmark = pytest.mark.timeout(300)

NEW = 24
TIMEOUT_S = 2.0  # generous: these tests count outcomes, not latency, on a busy CI box


def _start(repo: Path, default: str = MODEL_NAME) -> PredictorServer:
    server = PredictorServer(
        ServerConfig(repo=repo, host="127.0.0.1", port=0, default_model=default)
    )
    server.start()
    return server


@pytest.fixture
def predictor(model_repo: Path) -> Iterator[PredictorServer]:
    server = _start(model_repo)
    yield server
    server.stop(0.0)


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return random_pair(seed=0, noise=0.3)


@pytest.fixture
def client(predictor: PredictorServer) -> Iterator[PredictorClient]:
    with PredictorClient(predictor.address) as c:
        yield c


def _remote(stream, engine, **kw) -> RemotePolicy:  # type: ignore[no-untyped-def]
    settings = {"objective": Objective.TOKENS_PER_STEP, "decision_timeout_s": TIMEOUT_S, **kw}
    return RemotePolicy(stream, RemotePolicyConfig(**settings), engine.timing)


def _by_source(results: list[GenerationResult], source: DecisionSource) -> list:  # type: ignore[type-arg]
    return [s for r in results for s in r.steps if s.decision.source == source]


def _assert_counted_exactly(report: ArmStatsReport, results: list[GenerationResult]) -> None:
    """The predictor's counts equal the worker's: per sequence and arm for remote steps
    (so no step was lost or counted twice), in total for fallback steps."""
    expected: dict[tuple[str, int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in results:
        for s in r.steps:
            d = s.decision
            if d.source == DecisionSource.REMOTE:
                e = expected[(d.model_name, d.model_version, d.arm, r.request_id)]
                e[0] += 1
                e[1] += s.gamma
                e[2] += s.accepted
                e[3] += len(s.token_ids)
    counted = {
        (a.model_name, a.model_version, a.arm, q.routing_key): [
            q.steps,
            q.drafted,
            q.accepted,
            q.tokens,
        ]
        for a in report.arms
        for q in a.sequence_outcomes
    }
    assert counted == dict(expected)
    assert report.fallback_steps == len(_by_source(results, DecisionSource.FALLBACK))
    assert report.local_steps == 0 and report.rejected_outcomes == 0
    # Every sequence's last step said so.
    ended = {q.routing_key for a in report.arms for q in a.sequence_outcomes if q.ended}
    assert ended == {r.request_id for r in results if r.steps[-1].decision.source.value == "remote"}


def test_every_step_reaches_the_predictor_exactly_once(pair, predictor, client) -> None:  # type: ignore[no-untyped-def]
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = _remote(stream, engine)
        results = []
        for i, prompt in enumerate(prompts(3)):
            result = engine.generate(prompt, policy, max_new_tokens=NEW, request_id=f"once-{i}")
            assert list(result.token_ids) == target_greedy(pair.target, prompt, NEW)
            results.append(result)
        assert stream.flush(timeout=10)
        remote = _by_source(results, DecisionSource.REMOTE)
        fallback = _by_source(results, DecisionSource.FALLBACK)
        assert remote and len(fallback) >= 3  # step 0 of each sequence is a fallback step
        # The decision_step of a previous_step decision is the step it decided.
        assert all(s.decision.decision_step == s.step for s in remote)
        steps = sum(r.stats.num_steps for r in results)
        assert stream.stats.outcomes_reported == steps
        assert stream.stats.outcomes_sent == steps and stream.stats.outcomes_dropped == 0
        # Most outcomes rode on decision requests: far fewer messages than steps.
        assert stream.stats.outcome_messages < steps // 2
        _assert_counted_exactly(client.arm_stats(), results)
    finally:
        stream.close()


def test_a_sequence_cut_between_steps_still_ends_at_the_predictor(pair, predictor, client) -> None:  # type: ignore[no-untyped-def]
    """Cancelled between two steps, abandoned by its consumer, or failed: the predictor
    still hears each completed step once, and that the sequence ended (its last outcome
    carries sequence_end), so its arm's per-sequence record is closed."""
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = _remote(stream, engine)
        prompt_a, prompt_b, prompt_c = prompts(3, seed=7)

        def after(n: int, then: Exception | None = None):  # type: ignore[no-untyped-def]
            # Calls alternate: top of step k (2k+1), after step k (2k+2); call 7 is the
            # top of step 3, between steps (not the check that ends a step's outcome).
            calls = {"n": 0}

            def cancelled() -> bool:
                calls["n"] += 1
                if calls["n"] >= n and then is not None:
                    raise then
                return calls["n"] >= n

            return cancelled

        cancelled = engine.generate(
            prompt_a, policy, max_new_tokens=NEW, request_id="cut-cancel", cancelled=after(7)
        )
        assert cancelled.finish_reason.value == "cancelled" and len(cancelled.steps) == 3
        abandoned = engine.start(prompt_b, policy, max_new_tokens=NEW, request_id="cut-abandon")
        it = iter(abandoned)
        abandoned_steps = (next(it), next(it))
        it.close()  # the consumer stops reading (a client went away)
        failing = engine.start(
            prompt_c,
            policy,
            max_new_tokens=NEW,
            request_id="cut-error",
            cancelled=after(7, RuntimeError("device lost")),
        )
        failed_steps = []
        with pytest.raises(RuntimeError, match="device lost"):
            for step in failing:
                failed_steps.append(step)
        assert len(failed_steps) == 3
        runs = [
            cancelled,
            SimpleNamespace(request_id="cut-abandon", steps=abandoned_steps),
            SimpleNamespace(request_id="cut-error", steps=tuple(failed_steps)),
        ]
        steps = sum(len(r.steps) for r in runs)
        assert stream.flush(timeout=10)
        assert stream.stats.outcomes_reported == stream.stats.outcomes_sent == steps
        report = client.arm_stats()
        assert all(r.steps[-1].decision.source == DecisionSource.REMOTE for r in runs)
        _assert_counted_exactly(report, runs)  # type: ignore[arg-type]
    finally:
        stream.close()


def test_fallback_steps_are_reported_as_fallback(pair, predictor, client) -> None:  # type: ignore[no-untyped-def]
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        # Every decision request is refused (unknown model): every step is a fallback step.
        policy = _remote(stream, engine, model=ModelSelector(name="no-such-model"))
        result = engine.generate(prompts(1)[0], policy, max_new_tokens=12, request_id="fb")
        assert all(s.decision.source == DecisionSource.FALLBACK for s in result.steps)
        assert stream.flush(timeout=10)
        report = client.arm_stats()
        assert report.arms == ()  # no arm is credited with steps it did not decide
        assert report.fallback_steps == result.stats.num_steps == result.stats.fallback_decisions
        assert stream.stats.outcomes_sent == result.stats.num_steps
    finally:
        stream.close()


def test_reporting_can_be_turned_off(pair, predictor, client) -> None:  # type: ignore[no-untyped-def]
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = _remote(stream, engine, report_outcomes=False)
        result = engine.generate(prompts(1)[0], policy, max_new_tokens=NEW, request_id="off")
        assert result.stats.remote_decisions > 0
        assert stream.flush(timeout=10)
        assert stream.stats.outcomes_reported == 0
        report = client.arm_stats()
        assert report.arms == () and report.fallback_steps == 0
    finally:
        stream.close()


def test_draft_plan_steps_are_credited_to_the_plan_arm(pair, plan_repo: Path) -> None:  # type: ignore[no-untyped-def]
    server = _start(plan_repo, default=INSTEP)
    client = PredictorClient(server.address)
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        engine.warmup(gammas=(0, 2, 4), repeats=1)
        policy = RemotePolicy(
            stream,
            RemotePolicyConfig(
                window=Window.DRAFT_PLAN, objective=Objective.GOODPUT, decision_timeout_s=TIMEOUT_S
            ),
            engine.timing,
        )
        results = [
            engine.generate(p, policy, max_new_tokens=30, request_id=f"plan-{i}")
            for i, p in enumerate(prompts(2, seed=5))
        ]
        remote = _by_source(results, DecisionSource.REMOTE)
        assert remote and all(s.decision.model_name == INSTEP for s in remote)
        # A plan decides many steps; each names the step its plan was asked for (0 at the
        # start, then every refresh_steps steps), never a later one.
        assert {s.decision.decision_step for s in remote} >= {0, 6}
        assert all(s.decision.decision_step <= s.step for s in remote)
        assert stream.flush(timeout=10)
        _assert_counted_exactly(client.arm_stats(), results)
    finally:
        stream.close()
        client.close()
        server.stop(0.0)


def test_ab_split_per_arm_counts_equal_the_workers_own(loaded_pair, predictor, client) -> None:  # type: ignore[no-untyped-def]
    """Issue 10's criterion: two versions split 50/50 (sticky by routing key); per arm the
    predictor's steps, tokens, drafted and accepted equal, exactly, the sums over the
    worker's own results of the sequences routed to that arm."""
    torch.set_num_threads(1)
    pair = loaded_pair("fp16")
    client.set_routing(
        MODEL_NAME,
        Routing(
            weights=(RouteWeight("stable", 50.0), RouteWeight("canary", 50.0)),
            salt="outcome-reporting",
            aliases={"stable": 1, "canary": 2},
        ),
    )
    stream = client.decision_stream()
    try:
        wait_connected(stream)
        engine = SpeculativeEngine(pair, EngineConfig())
        policy = _remote(stream, engine, window=Window.PREVIOUS_STEP)
        texts = [
            "def add(a, b):\n    return",
            "for i in range(10):\n",
            "import os\nimport",
            "class Point:\n    def __init__(self",
            "if x is None:\n",
            "with open(path) as f:\n",
            "return [x for x in",
            "print('hello",
        ]
        results = [
            engine.generate(engine.encode(t), policy, max_new_tokens=32, request_id=f"ab-{i}")
            for i, t in enumerate(texts)
        ]
        assert stream.flush(timeout=10)
        report = client.arm_stats(MODEL_NAME)

        # Sticky routing: one arm decided every remote step of a sequence.
        arm_of: dict[str, str] = {}
        for r in results:
            arms = {s.decision.arm for s in r.steps if s.decision.source == DecisionSource.REMOTE}
            assert len(arms) == 1, (r.request_id, arms)
            arm_of[r.request_id] = arms.pop()
        assert set(arm_of.values()) == {"stable", "canary"}  # both arms saw traffic

        # The worker's own totals (SpecStats), minus the fallback steps, per arm.
        want: dict[str, dict[str, int]] = {}
        for r in results:
            fallback = [s for s in r.steps if s.decision.source == DecisionSource.FALLBACK]
            w = want.setdefault(
                arm_of[r.request_id],
                {"sequences": 0, "steps": 0, "drafted": 0, "accepted": 0, "tokens": 0},
            )
            w["sequences"] += 1
            w["steps"] += r.stats.remote_decisions
            w["drafted"] += r.stats.num_draft_tokens - sum(s.gamma for s in fallback)
            w["accepted"] += r.stats.num_accepted_tokens - sum(s.accepted for s in fallback)
            w["tokens"] += r.stats.new_tokens - sum(len(s.token_ids) for s in fallback)
        got = {
            a.arm: {
                "sequences": a.sequences,
                "steps": a.steps,
                "drafted": a.drafted,
                "accepted": a.accepted,
                "tokens": a.tokens,
            }
            for a in report.arms
        }
        assert got == want
        versions = {a.arm: a.model_version for a in report.arms}
        assert versions == {"stable": 1, "canary": 2}
        for a in report.arms:  # hence tokens/step per arm equals the worker's, exactly
            w = want[a.arm]
            assert a.tokens_per_step == w["tokens"] / w["steps"]
        # Fallback steps (step 0 of each sequence in this window) are counted apart.
        assert report.fallback_steps == sum(r.stats.fallback_decisions for r in results) >= 8
        assert stream.stats.outcomes_dropped == 0
    finally:
        stream.close()


def test_served_generations_are_counted_from_their_summaries(predictor, client) -> None:  # type: ignore[no-untyped-def]
    """Through the worker service: Generate over gRPC, then stop the worker (its stream
    sends what is queued on close); the predictor's counts equal the GenerationSummary
    and the per-step stats the client received."""
    from speckv_client.decoder import DecoderClient
    from speckv_client.types import GenerationSummary, TokenChunk

    from decode_worker.config import WorkerConfig
    from decode_worker.server import WorkerServer
    from tests.worker.engine_helpers import text_pair

    torch.set_num_threads(1)
    config = WorkerConfig(
        draft="random-draft",
        target="random-target",
        predictor=predictor.address,
        policy="remote",
        warmup=False,
        remote=RemotePolicyConfig(objective=Objective.TOKENS_PER_STEP, decision_timeout_s=2.0),
        engine=EngineConfig(default_max_new_tokens=16, max_new_tokens_limit=64),
    )
    worker = WorkerServer(config, text_pair(seed=0)).start()
    summaries: list[GenerationSummary] = []
    remote: list[TokenChunk] = []
    try:
        with DecoderClient(worker.address) as decoder:
            for i, prompt in enumerate(("the quick brown fox", "hello world, hello")):
                for event in decoder.generate(prompt, max_new_tokens=24, request_id=f"svc-{i}"):
                    if isinstance(event, GenerationSummary):
                        summaries.append(event)
                    elif event.step is not None and event.step.source == DecisionSource.REMOTE:
                        remote.append(event)
    finally:
        worker.stop(1.0)  # closes the Decide stream: queued outcomes are sent first
    report = client.arm_stats()
    assert sum(s.remote_decisions for s in summaries) == sum(a.steps for a in report.arms) > 0
    # At least each sequence's step 0 (more if a decision was late on a busy machine).
    assert sum(s.fallback_decisions for s in summaries) == report.fallback_steps >= 2
    assert sum(a.tokens for a in report.arms) == sum(c.step.tokens_produced for c in remote)  # type: ignore[union-attr]
    assert sum(a.accepted for a in report.arms) == sum(c.step.accepted for c in remote)  # type: ignore[union-attr]
    assert sum(a.drafted for a in report.arms) == sum(c.step.gamma for c in remote)  # type: ignore[union-attr]


def test_no_report_outcomes_flag() -> None:
    import argparse

    from decode_worker.serve_cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--draft", "d", "--target", "t", "--predictor", "127.0.0.1:9"]
    assert build_config(parser.parse_args(base)).remote.report_outcomes is True
    off = build_config(parser.parse_args([*base, "--no-report-outcomes"]))
    assert off.remote.report_outcomes is False
