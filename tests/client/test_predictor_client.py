"""PredictorClient and DecisionStream against the real predictor server."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, wait
from pathlib import Path

import pytest
from speckv_client.errors import (
    AdminAuthError,
    InvalidArgument,
    NotFound,
    PredictorRequestError,
    PredictorUnavailable,
)
from speckv_client.predictor import PredictorClient
from speckv_client.types import (
    Compression,
    DecideBatch,
    Decision,
    DraftSignals,
    FeatureRow,
    ModelSelector,
    ModelState,
    Objective,
    RouteWeight,
    Routing,
)

from tests.client.servers import ADMIN_TOKEN, PredictorProcess, RunningPredictor

MODEL = "speckv-mlp16"


def batch(key: str = "seq", step: int = 1, **kw: object) -> DecideBatch:
    signals = kw.pop("signals", DraftSignals(1.2, 0.7, 2.5, 0.3))
    rows = (FeatureRow(key, step, signals, Compression.NF4),)  # type: ignore[arg-type]
    kw.setdefault("objective", Objective.TOKENS_PER_STEP)
    kw.setdefault("model", ModelSelector(name=MODEL))  # two models, so no default one
    return DecideBatch(rows=rows, **kw)  # type: ignore[arg-type]


def test_read_calls_return_dataclasses(predictor: RunningPredictor) -> None:
    with PredictorClient(predictor.address) as pc:
        models = {m.name: m for m in pc.list_models()}
        assert set(models) == {MODEL, "speckv-mlp16-same-step"}
        info = pc.get_model(MODEL)
        assert [v.version for v in info.versions] == [1, 2]
        assert all(v.state == ModelState.READY for v in info.versions)
        assert info.versions[0].window == "previous_step"
        assert len(info.versions[0].feature_names) == 6
        assert pc.get_routing(MODEL) == info.routing
        pred = pc.predict(
            [[1.2, 0.7, 2.5, 0.3, 2, 4], [0.2, 0.95, 0.5, 0.9, 0, 2]],
            model=ModelSelector(name=MODEL, version=1),
        )
        assert len(pred.predicted_acceptance) == 2
        assert all(0.0 <= a <= 1.0 for a in pred.predicted_acceptance)
        assert (pred.model_name, pred.model_version) == (MODEL, 1)
        (d,) = pc.decide(batch(model=ModelSelector(name=MODEL, version=2)))
        assert (d.model_name, d.model_version, d.routing_key, d.step) == (MODEL, 2, "seq", 1)
        assert d.gamma in {c.gamma for c in d.candidates}
        best = max(d.candidates, key=lambda c: c.score)
        assert d.gamma == best.gamma
        for c in d.candidates:
            assert c.score == pytest.approx(c.predicted_acceptance * c.gamma + 1)
        with pytest.raises(NotFound, match="no-such-model"):
            pc.get_model("no-such-model")


def test_admin_calls_need_the_token(predictor: RunningPredictor) -> None:
    for token in (None, "wrong-token"):
        with PredictorClient(predictor.address, admin_token=token) as pc:
            with pytest.raises(AdminAuthError, match="admin-token"):
                pc.set_routing(MODEL, Routing(weights=(RouteWeight("1", 100),)))
            with pytest.raises(AdminAuthError):
                pc.unload_model(MODEL, 2)
            pc.list_models()  # read calls stay open
    with PredictorClient(predictor.address, admin_token=ADMIN_TOKEN) as pc:
        pc.unload_model(MODEL, 2)
        states = {v.version: v.state for v in pc.get_model(MODEL).versions}
        assert states.get(2, ModelState.UNLOADED) == ModelState.UNLOADED
        info = pc.load_model(MODEL, 2)
        assert (info.version, info.state) == (2, ModelState.READY)
        with pytest.raises(NotFound):
            pc.load_model(MODEL, 99)


def test_routing_and_rollback(predictor: RunningPredictor) -> None:
    with PredictorClient(predictor.address, admin_token=ADMIN_TOKEN) as pc:
        with pytest.raises(InvalidArgument, match="no 'stable' alias"):
            pc.rollback(MODEL)
        routing = pc.set_routing(
            MODEL,
            Routing(
                weights=(RouteWeight("stable", 50), RouteWeight("canary", 50)),
                salt="s1",
                shadow_version=2,
                aliases={"stable": 1, "canary": 2},
            ),
        )
        assert routing.aliases == {"canary": 2, "stable": 1}
        assert routing.shadow_version == 2
        arms = {pc.decide(batch(key=f"k{i}"))[0].arm for i in range(40)}
        assert arms == {"stable", "canary"}
        rolled = pc.rollback(MODEL)
        assert [(w.target, w.weight) for w in rolled.weights] == [("stable", 100.0)]
        assert rolled.shadow_version == 0
        assert (rolled.salt, rolled.aliases) == ("s1", {"canary": 2, "stable": 1})
        decided = [pc.decide(batch(key=f"k{i}"))[0] for i in range(20)]
        assert {(d.arm, d.model_version) for d in decided} == {("stable", 1)}


def test_per_message_errors_leave_the_stream_open(predictor: RunningPredictor) -> None:
    with PredictorClient(predictor.address) as pc, pc.decision_stream() as stream:
        bad: list[tuple[DecideBatch, str]] = [
            (batch(gamma_candidates=()), "gamma_candidates"),
            (batch(signals=DraftSignals(math.nan, 0.7, 2.5, 0.3)), "rows[0].signals"),
            (batch(model=ModelSelector(name="no-such-model")), "model"),
            (batch(objective=Objective.GOODPUT), "timing"),
        ]
        for request, field in bad:
            err = stream.submit(request).exception(timeout=5)
            assert isinstance(err, PredictorRequestError), err
            assert err.field.startswith(field), (err.field, field)
            (d,) = stream.submit(batch()).result(timeout=5)
            assert d.routing_key == "seq"
        unknown = stream.submit(batch(model=ModelSelector(name="no-such-model"))).exception(5)
        assert isinstance(unknown, PredictorRequestError) and unknown.code == "NOT_FOUND"
        assert stream.stats.streams_opened == 1
        assert stream.stats.request_errors == 5
        assert stream.connected


def test_stream_multiplexes_threads_in_order_of_request_id(predictor: RunningPredictor) -> None:
    with PredictorClient(predictor.address) as pc, pc.decision_stream() as stream:
        results: dict[str, list[Decision]] = {}
        errors: list[BaseException] = []

        def sequence(key: str) -> None:
            try:
                for step in range(1, 51):
                    (d,) = stream.submit(batch(key=key, step=step)).result(timeout=10)
                    assert (d.routing_key, d.step) == (key, step)
                    results.setdefault(key, []).append(d)
            except BaseException as exc:  # collected for the main thread
                errors.append(exc)

        threads = [threading.Thread(target=sequence, args=(f"seq-{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[0]
        assert sorted(len(v) for v in results.values()) == [50] * 8
        # Sticky routing: one sequence stays on one version.
        assert all(len({d.model_version for d in v}) == 1 for v in results.values())


def _submit_until(stream, stop: threading.Event, out: list[Future[list[Decision]]]) -> None:  # type: ignore[no-untyped-def]
    step = 0
    while not stop.is_set():
        step += 1
        out.append(stream.submit(batch(key="load", step=step)))
        time.sleep(0.005)


def test_killed_predictor_fails_fast_then_stream_reconnects(
    model_repo: Path, tmp_path: Path
) -> None:
    """SIGKILL the server under load: futures fail with PredictorUnavailable (none hangs),
    reconnect attempts back off, and decisions resume on the same DecisionStream object
    once a server is back on the port."""
    server = PredictorProcess(model_repo, tmp_path / "p1.log")
    port = server.port
    pc = PredictorClient(server.address, timeout_s=2.0)
    stream = pc.decision_stream(seed=1)
    stop = threading.Event()
    futures: list[Future[list[Decision]]] = []
    loader = threading.Thread(target=_submit_until, args=(stream, stop, futures))
    try:
        deadline = time.monotonic() + 10
        while not stream.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stream.connected
        loader.start()
        time.sleep(0.5)
        server.kill()
        killed_at = time.monotonic()
        deadline = killed_at + 5
        while stream.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not stream.connected
        down_from = len(futures)
        time.sleep(2.0)
        opened_while_down = stream.stats.streams_opened
        # During 2 s of downtime the backoff (0.1, 0.2, 0.4, 0.8, 1.6 s) allows a handful.
        assert opened_while_down <= 1 + 8, stream.stats
        quick = futures[down_from:]
        assert quick and all(isinstance(f.exception(1), PredictorUnavailable) for f in quick)

        server = PredictorProcess(model_repo, tmp_path / "p2.log", port=port)
        restarted_at = time.monotonic()
        while not stream.connected and time.monotonic() < restarted_at + 10:
            time.sleep(0.02)
        assert stream.connected, stream.stats
        reconnect_s = time.monotonic() - restarted_at
        (d,) = stream.submit(batch(key="after")).result(timeout=5)
        assert d.model_name == MODEL
        time.sleep(0.3)
        stop.set()
        loader.join(timeout=5)
        _done, not_done = wait(futures, timeout=10)
        assert not not_done, f"{len(not_done)} futures never resolved"
        errors = [f.exception() for f in futures if f.exception() is not None]
        assert all(isinstance(e, PredictorUnavailable) for e in errors), errors[:3]
        answered = [f for f in futures if f.exception() is None]
        assert answered[0] is futures[0] and answered[-1] is futures[-1]
        print(f"reconnected {reconnect_s:.2f} s after restart; {stream.stats}")
    finally:
        stop.set()
        stream.close()
        pc.close()
        server.kill()


def test_drain_reconnect_message_moves_new_requests_to_a_new_stream(
    model_repo: Path, tmp_path: Path
) -> None:
    """SIGTERM: the server answers with reconnect=true; the client opens new streams with
    backoff (not a busy loop against the draining server) and every future resolves."""
    server = PredictorProcess(model_repo, tmp_path / "p.log", grace_s=2.0)
    pc = PredictorClient(server.address)
    stream = pc.decision_stream(seed=2)
    stop = threading.Event()
    futures: list[Future[list[Decision]]] = []
    loader = threading.Thread(target=_submit_until, args=(stream, stop, futures))
    try:
        stream.submit(batch()).result(timeout=10)
        loader.start()
        time.sleep(0.3)
        server.proc.terminate()
        server.proc.wait(timeout=20)
        stop.set()
        loader.join(timeout=5)
        _done, not_done = wait(futures, timeout=10)
        assert not not_done
        assert stream.stats.reconnect_requests >= 1, stream.stats
        # 2 s of grace with backoff: a few streams, never hundreds.
        assert stream.stats.streams_opened <= 12, stream.stats
        errors = [f.exception() for f in futures if f.exception() is not None]
        assert all(isinstance(e, PredictorUnavailable) for e in errors)
        assert len(errors) < len(futures)
    finally:
        stop.set()
        stream.close()
        pc.close()
        server.kill()


def test_oversize_batch_fails_only_its_own_future_and_the_stream_survives(
    predictor: RunningPredictor,
) -> None:
    """A batch the predictor cannot take is refused here; the other sequences keep deciding."""
    with PredictorClient(predictor.address) as pc, pc.decision_stream(seed=0) as stream:
        assert stream.decide(batch("warm"), timeout_s=10)
        before = [stream.submit(batch(f"before-{i}", i)) for i in range(20)]
        huge = DecideBatch(
            rows=tuple(
                FeatureRow(
                    f"{i:06d}" + "k" * 5000, i, DraftSignals(1.2, 0.7, 2.5, 0.3), Compression.NF4
                )
                for i in range(1024)
            ),
            gamma_candidates=(2, 4, 6, 8),
            objective=Objective.TOKENS_PER_STEP,
            model=ModelSelector(name=MODEL),
        )  # about 5 MiB: over every limit
        refused = stream.submit(huge)
        after = [stream.submit(batch(f"after-{i}", i)) for i in range(20)]
        with pytest.raises(InvalidArgument, match="max-message-bytes"):
            refused.result(timeout=10)
        for i, f in enumerate(before):
            assert f.result(timeout=10)[0].routing_key == f"before-{i}"
        for i, f in enumerate(after):
            assert f.result(timeout=10)[0].routing_key == f"after-{i}"
        assert stream.stats.streams_opened == 1 and stream.stats.unavailable == 0
