"""DecisionStream.report: outcomes piggybacked on decisions, flushed by timer and at a
sequence end, bounded, and kept to the stream whose replica made the decision.

The server is a real gRPC server on loopback implementing PredictorService.Decide that
records every message it receives (which of its Decide calls carried it) and answers rows
with a fixed decision; it can refuse outcomes-only messages the way a predictor from
before outcomes did (a message without rows is an INVALID_ARGUMENT error).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from speckv.v1 import predictor_pb2, predictor_pb2_grpc
from speckv_client.decision_stream import DecisionStream
from speckv_client.errors import PredictorUnavailable
from speckv_client.types import (
    Compression,
    DecideBatch,
    DecisionSource,
    DraftSignals,
    FeatureRow,
    Objective,
    StepOutcome,
)

pytestmark = pytest.mark.timeout(60)

BREAK = "break-the-stream"
"""A row with this routing key makes the server end that Decide call with UNAVAILABLE
half a second later (the test queues outcomes meanwhile)."""
DRAIN = "drain"
"""A row with this routing key is answered with reconnect=true (the server is draining)."""
SWALLOW = "swallow"
"""A row with this routing key makes the server stop answering that Decide call (it keeps
reading and never ends it), like a stream that reached a server in the instant it stopped."""


@dataclass
class Received:
    call: int  # 1-based index of the server-side Decide call that carried it
    request: predictor_pb2.DecideRequest


@dataclass
class RecordingPredictor(predictor_pb2_grpc.PredictorServiceServicer):
    refuse_outcomes_only: bool = False
    received: list[Received] = field(default_factory=list)
    calls: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def Decide(self, request_iterator, context):  # type: ignore[no-untyped-def]
        with self.cond:
            self.calls += 1
            call = self.calls
        for req in request_iterator:
            with self.cond:
                self.received.append(Received(call, req))
                self.cond.notify_all()
            keys = [r.routing_key for r in req.rows]
            if SWALLOW in keys:
                for _ in request_iterator:  # read on, answer nothing, until cancelled
                    pass
                return
            if BREAK in keys:
                time.sleep(0.5)
                context.abort(grpc.StatusCode.UNAVAILABLE, "test: stream broken")
            if not req.rows:
                if self.refuse_outcomes_only:
                    yield predictor_pb2.DecideResponse(
                        request_id=req.request_id,
                        error=predictor_pb2.Error(
                            code=predictor_pb2.ERROR_CODE_INVALID_ARGUMENT,
                            field="rows",
                            message="no rows (a predictor from before outcomes)",
                        ),
                    )
                else:
                    yield predictor_pb2.DecideResponse(request_id=req.request_id)
                continue
            yield predictor_pb2.DecideResponse(
                request_id=req.request_id,
                decisions=[
                    predictor_pb2.Decision(
                        routing_key=r.routing_key,
                        step=r.step,
                        gamma=4,
                        model_name="m",
                        model_version=call,
                        arm=f"v{call}",
                    )
                    for r in req.rows
                ],
                reconnect=DRAIN in keys,
            )

    # -- what the tests read

    def wait_for(self, what: Callable[[list[Received]], bool], limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        with self.cond:
            while not what(self.received):
                left = deadline - time.monotonic()
                assert left > 0, f"server never saw it; received {self.summary()}"
                self.cond.wait(left)

    def outcomes(self) -> list[tuple[int, predictor_pb2.StepOutcome]]:
        with self.cond:
            return [(r.call, o) for r in self.received for o in r.request.outcomes]

    def outcomes_only(self) -> list[Received]:
        with self.cond:
            return [r for r in self.received if not r.request.rows]

    def summary(self) -> list[tuple[int, int, int]]:
        return [(r.call, len(r.request.rows), len(r.request.outcomes)) for r in self.received]


@pytest.fixture
def server() -> Iterator[tuple[RecordingPredictor, str]]:
    servicer = RecordingPredictor()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


@pytest.fixture
def open_stream(server) -> Iterator[Callable[..., DecisionStream]]:  # type: ignore[no-untyped-def]
    _, address = server
    made: list[tuple[DecisionStream, grpc.Channel]] = []

    def make(**kwargs: object) -> DecisionStream:
        channel = grpc.insecure_channel(address)
        stream = DecisionStream(channel, target=address, seed=0, **kwargs)  # type: ignore[arg-type]
        made.append((stream, channel))
        return stream

    yield make
    for stream, channel in made:
        stream.close(flush_timeout_s=0)
        channel.close()


def batch(key: str = "seq", step: int = 1) -> DecideBatch:
    row = FeatureRow(key, step, DraftSignals(1.0, 0.7, 2.0, 0.4), Compression.FP16)
    return DecideBatch(rows=(row,), objective=Objective.TOKENS_PER_STEP)


def outcome(step: int, key: str = "seq", *, end: bool = False, remote: bool = True) -> StepOutcome:
    return StepOutcome(
        routing_key=key,
        step=step,
        source=DecisionSource.REMOTE if remote else DecisionSource.FALLBACK,
        drafted=4,
        accepted=step % 5,
        tokens=step % 5 + 1,
        draft_seconds=0.001,
        verify_seconds=0.002,
        compression=Compression.FP16,
        model_name="m" if remote else "",
        model_version=1 if remote else 0,
        arm="v1" if remote else "",
        decision_step=step if remote else 0,
        sequence_end=end,
    )


def balanced(stream: DecisionStream) -> None:
    """Nothing queued: every reported outcome was sent or dropped, and counted once."""
    s = stream.stats
    assert s.outcomes_reported == s.outcomes_sent + s.outcomes_dropped, s


def test_outcomes_ride_on_the_next_decision_request(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0)
    (first,) = stream.submit(batch(step=1)).result(timeout=10)
    assert first.stream == 1 and first.arm == "v1"
    for step in (1, 2, 3):
        stream.report(outcome(step), stream=first.stream)
    stream.report(outcome(4, remote=False))  # a fallback step: any stream may carry it
    time.sleep(0.3)
    assert len(recorder.received) == 1  # the timer is 30 s: nothing went alone
    (second,) = stream.submit(batch(step=5)).result(timeout=10)
    assert second.stream == 1
    last = recorder.received[-1].request
    assert [r.step for r in last.rows] == [5]
    assert [o.step for o in last.outcomes] == [1, 2, 3, 4]  # in the order reported
    assert [o.source for o in last.outcomes][-1] != last.outcomes[0].source
    assert last.outcomes[1].accepted == 2 and last.outcomes[1].decision_step == 2
    assert stream.stats.outcome_messages == 0
    assert stream.stats.outcomes_sent == 4
    balanced(stream)


def test_outcomes_without_a_decision_request_go_alone_after_the_flush_interval(  # type: ignore[no-untyped-def]
    server, open_stream
) -> None:
    recorder, _ = server
    stream = open_stream(outcome_flush_s=0.2)
    (d,) = stream.submit(batch()).result(timeout=10)
    reported = time.monotonic()
    stream.report(outcome(1), stream=d.stream)
    stream.report(outcome(2), stream=d.stream)
    recorder.wait_for(lambda got: any(not r.request.rows for r in got))
    waited = time.monotonic() - reported
    assert waited >= 0.2  # not before the interval
    (alone,) = recorder.outcomes_only()
    assert [o.step for o in alone.request.outcomes] == [1, 2]
    assert stream.flush(timeout=10)  # answered (empty response, no error)
    assert stream.stats.outcome_messages == 1 and stream.stats.outcome_errors == 0
    balanced(stream)


def test_a_sequence_end_is_sent_at_once(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0)
    (d,) = stream.submit(batch()).result(timeout=10)
    stream.report(outcome(1), stream=d.stream)
    started = time.monotonic()
    stream.report(outcome(2, end=True), stream=d.stream)
    recorder.wait_for(lambda got: any(not r.request.rows for r in got), limit_s=10.0)
    assert time.monotonic() - started < 10.0  # well before the 30 s timer
    (alone,) = recorder.outcomes_only()
    assert [(o.step, o.sequence_end) for o in alone.request.outcomes] == [(1, False), (2, True)]
    balanced(stream)


def test_messages_stay_under_the_caps(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    limit = 700
    stream = open_stream(outcome_flush_s=30.0, max_message_bytes=limit, max_outcomes_per_message=5)
    (d,) = stream.submit(batch()).result(timeout=10)
    key = "k" * 150  # about 200 bytes per outcome: the byte cap binds before the count cap
    for step in range(20):
        stream.report(outcome(step, key), stream=d.stream)
    stream.submit(batch(step=2)).result(timeout=10)  # piggybacks what fits ...
    piggy = recorder.received[-1].request
    assert list(piggy.rows) and 1 <= len(piggy.outcomes) < 5
    assert stream.flush(timeout=10)  # ... and flush the rest, in as many messages as needed
    carried = [r.request for r in recorder.received if r.request.outcomes]
    assert len(carried) >= 4
    for request in carried:
        assert len(request.outcomes) <= 5
        assert request.ByteSize() <= limit
    assert [o.step for _, o in recorder.outcomes()] == list(range(20))
    before = len(recorder.received)
    for step in range(12):  # short keys: now the count cap binds
        stream.report(outcome(step, "s"), stream=d.stream)
    assert stream.flush(timeout=10)
    assert [len(r.request.outcomes) for r in recorder.received[before:]] == [5, 5, 2]
    assert stream.stats.outcomes_sent == 32
    balanced(stream)


def test_outcomes_of_a_stale_stream_are_dropped_after_a_reconnect(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0)
    (d1,) = stream.submit(batch()).result(timeout=10)
    assert d1.stream == 1
    broken = stream.submit(batch(key=BREAK))
    stream.report(outcome(1), stream=1)  # queued for stream 1 ...
    stream.report(outcome(2, remote=False))  # ... and a fallback one, for any stream
    # ... which breaks before anything carried them.
    assert isinstance(broken.exception(timeout=10), PredictorUnavailable)
    deadline = time.monotonic() + 10
    while True:  # the stream reconnects at once (it had answered)
        try:
            (d2,) = stream.submit(batch(step=3)).result(timeout=10)
            break
        except PredictorUnavailable:
            assert time.monotonic() < deadline, "no new stream"
            time.sleep(0.05)
    assert d2.stream == 2 and d2.arm == "v2"
    stream.report(outcome(3), stream=1)  # decided by the old replica: dropped
    stream.report(outcome(4), stream=2)
    assert stream.flush(timeout=10)
    delivered = [(call, o.step) for call, o in recorder.outcomes()]
    # The fallback outcome survived the reconnect; stream 1's never reached stream 2.
    assert delivered == [(2, 2), (2, 4)]
    assert stream.stats.outcomes_dropped == 2
    assert stream.stats.streams_opened == 2
    balanced(stream)


def test_a_draining_replica_gets_the_outcomes_of_its_decisions(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0)
    (d1,) = stream.submit(batch()).result(timeout=10)
    stream.report(outcome(1), stream=d1.stream)
    stream.report(outcome(2), stream=d1.stream)
    (d,) = stream.submit(batch(key=DRAIN)).result(timeout=10)  # carries 1, 2; says reconnect
    stream.report(outcome(3), stream=d.stream)  # stream 1 is no longer current: dropped
    deadline = time.monotonic() + 10
    while stream.stats.streams_opened < 2:
        assert time.monotonic() < deadline, "no new stream after the reconnect request"
        time.sleep(0.02)
    (d2,) = stream.submit(batch(step=4)).result(timeout=10)
    assert d2.stream == 2
    stream.report(outcome(4), stream=2)
    assert stream.flush(timeout=10)
    assert [(call, o.step) for call, o in recorder.outcomes()] == [(1, 1), (1, 2), (2, 4)]
    assert stream.stats.outcomes_dropped == 1
    balanced(stream)


def test_an_old_predictor_refusing_outcomes_only_messages_is_tolerated(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    recorder.refuse_outcomes_only = True
    stream = open_stream(outcome_flush_s=0.05)
    (d,) = stream.submit(batch()).result(timeout=10)
    stream.report(outcome(1, end=True), stream=d.stream)
    recorder.wait_for(lambda got: any(not r.request.rows for r in got))
    deadline = time.monotonic() + 10
    while stream.stats.outcome_errors < 1:
        assert time.monotonic() < deadline, "the refusal was not counted"
        time.sleep(0.02)
    # No more outcomes-only messages to this server: later outcomes (even a sequence end)
    # wait for a decision request to ride on, which an old predictor simply ignores.
    stream.report(outcome(2, end=True), stream=d.stream)
    stream.report(outcome(3), stream=d.stream)
    time.sleep(0.5)
    assert len(recorder.outcomes_only()) == 1
    (d2,) = stream.submit(batch(step=4)).result(timeout=10)  # decisions keep coming
    assert d2.gamma == 4 and d2.stream == 1
    assert [o.step for o in recorder.received[-1].request.outcomes] == [2, 3]
    assert stream.connected and stream.stats.streams_opened == 1
    assert stream.stats.request_errors == 0  # the refusal is not a decision's error
    assert stream.stats.outcome_errors == 1
    stream.report(outcome(5), stream=d.stream)
    assert not stream.flush(timeout=10)  # an explicit flush still tries, and says it failed
    assert stream.stats.outcome_errors == 2
    balanced(stream)


def test_the_outbox_is_bounded(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0, outbox_limit=4)
    (d,) = stream.submit(batch()).result(timeout=10)
    for step in range(7):
        stream.report(outcome(step), stream=d.stream)
    assert stream.stats.outcomes_dropped == 3
    assert stream.flush(timeout=10)
    assert [o.step for _, o in recorder.outcomes()] == [0, 1, 2, 3]
    balanced(stream)


def test_close_sends_what_is_queued(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    recorder, _ = server
    stream = open_stream(outcome_flush_s=30.0)
    (d,) = stream.submit(batch()).result(timeout=10)
    stream.report(outcome(1), stream=d.stream)
    stream.close(flush_timeout_s=10)
    assert [o.step for _, o in recorder.outcomes()] == [1]
    stream.report(outcome(2), stream=d.stream)  # after close: dropped, counted, no raise
    assert stream.stats.outcomes_dropped == 1
    balanced(stream)


def test_a_stream_that_answers_nothing_is_replaced(server, open_stream) -> None:  # type: ignore[no-untyped-def]
    servicer, address = server
    fresh: list[grpc.Channel] = []

    def new_channel() -> grpc.Channel:
        fresh.append(grpc.insecure_channel(address))
        return fresh[-1]

    stream = open_stream(stall_timeout_s=0.5, channel_factory=new_channel)
    swallowed = stream.submit(batch(SWALLOW))
    started = time.monotonic()
    with pytest.raises(PredictorUnavailable):
        swallowed.result(timeout=10)
    assert 0.4 < time.monotonic() - started < 5.0
    assert stream.stats.stalls == 1
    # The next stream is a new server-side call and is answered.
    deadline = time.monotonic() + 10
    while True:
        try:
            decisions = stream.submit(batch("after")).result(timeout=2)
            break
        except PredictorUnavailable:
            assert time.monotonic() < deadline, "no stream answered after the stall"
            time.sleep(0.05)
    assert decisions[0].routing_key == "after"
    assert servicer.calls >= 2
    assert stream.stats.stalls == 1  # an answered stream is not cancelled
    assert len(fresh) == 1  # the next stream went over a new channel (closed with the stream)


def test_stall_timeout_is_validated(server) -> None:  # type: ignore[no-untyped-def]
    _, address = server
    channel = grpc.insecure_channel(address)
    try:
        with pytest.raises(ValueError, match="stall_timeout_s"):
            DecisionStream(channel, target=address, stall_timeout_s=0.0)
    finally:
        channel.close()
