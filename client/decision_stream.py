"""One long-lived Decide stream per worker, multiplexing every sequence's decisions.

The decode worker calls `submit` at every decode step of every sequence, so it must
never block and must cost little: a request is converted, registered under a fresh
request_id and put on a queue that gRPC's request iterator drains; one reader thread
matches responses to futures by request_id. When the stream breaks, the futures in
flight fail with `PredictorUnavailable` (the worker falls back to its own gamma) and a
background thread opens a new stream with exponential backoff and jitter.

Step outcomes (`report`) wait in a bounded outbox and ride on the next `submit`; a
background flusher sends what no submit took within `outcome_flush_s` (at once when a
sequence ended) as an outcomes-only message whose answer nobody waits for
(docs/worker.md, "Outcome reporting").
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace

import grpc
from speckv.v1 import predictor_pb2, predictor_pb2_grpc
from speckv_client import convert
from speckv_client.channel import ReconnectBackoff
from speckv_client.errors import InvalidArgument, PredictorRequestError, PredictorUnavailable
from speckv_client.types import DecideBatch, Decision, StepOutcome

log = logging.getLogger(__name__)

_CLOSE = object()
"""Put on a stream's queue to half-close it (ends gRPC's request iterator)."""

MAX_MESSAGE_BYTES = 1 << 20
"""The largest Decide message sent: the predictor's default `--max-message-bytes`.

A larger batch fails its own future with `InvalidArgument` before anything is sent, so it
can never cost the other sequences on the shared stream their decisions.
"""
_REQUEST_ID_BYTES = 11  # field 1 tag + a uint64 varint, set after the size check
_OUTCOME_FIELD_BYTES = 4  # field 8 tag + the length varint of one StepOutcome (< 2 MiB)

OUTCOME_FLUSH_S = 0.05
"""How long a reported outcome waits for a `submit` to ride on before it is sent alone."""
OUTBOX_LIMIT = 8192
"""Outcomes queued at most; one more is dropped (and counted), so memory stays bounded."""
MAX_OUTCOMES_PER_MESSAGE = 512
"""Outcomes carried by one message at most (and never more than fit max_message_bytes)."""
STALL_TIMEOUT_S = 10.0
"""A stream that has left a message unanswered this long, and answered nothing since it was
sent, is cancelled and replaced: a healthy predictor answers in milliseconds, and a stream
that swallows messages without ever breaking (seen when a new stream reached a server in
the instant it stopped) would otherwise starve the worker of decisions for good."""


@dataclass
class DecisionStreamStats:
    """Counters since the stream object was created (read without locking; approximate)."""

    submitted: int = 0
    answered: int = 0
    request_errors: int = 0
    unavailable: int = 0
    streams_opened: int = 0
    reconnect_requests: int = 0
    # Streams cancelled because a message went unanswered for `stall_timeout_s`.
    stalls: int = 0
    # Step outcomes (`report`). Once nothing is queued or in flight:
    # outcomes_reported == outcomes_sent + outcomes_dropped.
    outcomes_reported: int = 0
    # Put on the wire, piggybacked on a submit or in an outcomes-only message.
    outcomes_sent: int = 0
    # Never sent: reported for a stream that is no longer current (its replica did not
    # make the decision's successor), queued on a stream that broke, the outbox full, the
    # stream closed, or not encodable.
    outcomes_dropped: int = 0
    # Outcomes-only messages sent (piggybacked outcomes cost no message).
    outcome_messages: int = 0
    # Outcomes-only messages answered with an error (an old predictor refuses a message
    # without rows) or lost with their stream before the answer.
    outcome_errors: int = 0


@dataclass(slots=True)
class _Queued:
    """One reported outcome in the outbox, encoded once when reported."""

    stream: int  # the stream whose decision it reports; 0: any (fallback/local)
    message: predictor_pb2.StepOutcome
    size: int  # bytes it adds to a DecideRequest
    at: float  # time.monotonic() when reported


@dataclass(slots=True)
class _Carrying:
    """A message in flight that carries outcomes; `done` is set when its answer came."""

    count: int
    outcomes_only: bool
    done: Future[bool] = field(default_factory=Future)


class _Stalled(Exception):
    """Why a stream that answered nothing for `stall_timeout_s` was ended."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer for {seconds:g} s (stall timeout)")


class _Stream:
    """One gRPC Decide call: its request queue, its futures in flight, its reader thread."""

    def __init__(self, stub: predictor_pb2_grpc.PredictorServiceStub, number: int) -> None:
        self.number = number
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.pending: dict[int, Future[list[Decision]]] = {}
        # Messages carrying outcomes, by request_id (a subset of `pending`'s ids plus the
        # outcomes-only ones, which have a future in `pending` too).
        self.carrying: dict[int, _Carrying] = {}
        # The server answered an outcomes-only message with an error (an old predictor):
        # outcomes then ride only on submits, except when `flush` is asked for.
        self.outcomes_refused = False
        self.draining = False
        self.answered = False
        self.ended = False
        # time.monotonic() since when a message has waited with no answer in between
        # (None: nothing unanswered); the connect loop cancels a stream stalled too long.
        self.waiting_since: float | None = None
        self.call = stub.Decide(self._requests())

    def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            item = self.queue.get()
            if item is _CLOSE:
                return
            yield item

    def half_close(self) -> None:
        self.queue.put(_CLOSE)

    def expect(self, request_id: int, future: Future[list[Decision]]) -> None:
        """An answer to `request_id` is now owed (starts the stall clock if it was idle)."""
        self.pending[request_id] = future
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()


class DecisionStream:
    """Submit `DecideBatch`es, get `Future[list[Decision]]`s; reconnects on its own.

    - `submit` never blocks. A batch over `max_message_bytes` fails its own future with
      `InvalidArgument` and is not sent (the stream and every other future are untouched).
      A future fails with `PredictorUnavailable` when no stream
      is open (during backoff) or the stream breaks before its answer, and with
      `PredictorRequestError` when the server refused that one message (the stream
      stays open and later messages are answered).
    - Reconnect: a stream that had answered is replaced at once; after n streams in a row
      that broke (or were told to reconnect) before answering anything, wait
      min(0.1 s * 2**(n-1), 2 s) +-20% jitter (`ReconnectBackoff`).
    - A response with `reconnect=true` (the server is draining) makes new submissions go
      to a new stream at once; the old stream is half-closed when its last answer arrives.
    - There is no deadline on the stream itself (it is meant to live for hours); the
      caller bounds each decision with `future.result(timeout)` and falls back.
    - Each Decision carries `stream`, the number of the stream (replica connection) that
      answered. `report(outcome, stream=n)` queues a step's outcome for that stream; it
      rides on the next `submit` on it, or goes alone after `outcome_flush_s` (at once for
      `sequence_end`). An outcome for a stream that is no longer current is dropped and
      counted (the replica that made the decision is not the one listening now).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        target: str,
        backoff: ReconnectBackoff | None = None,
        seed: int | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        outcome_flush_s: float = OUTCOME_FLUSH_S,
        outbox_limit: int = OUTBOX_LIMIT,
        max_outcomes_per_message: int = MAX_OUTCOMES_PER_MESSAGE,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        channel_factory: Callable[[], grpc.Channel] | None = None,
    ) -> None:
        if not 0.0 < outcome_flush_s <= 60.0:
            raise ValueError(f"outcome_flush_s must be in (0, 60] s, got {outcome_flush_s}")
        if not 0.0 < stall_timeout_s <= 3600.0:
            raise ValueError(f"stall_timeout_s must be in (0, 3600] s, got {stall_timeout_s}")
        if outbox_limit < 1 or max_outcomes_per_message < 1:
            raise ValueError(
                f"outbox_limit ({outbox_limit}) and max_outcomes_per_message "
                f"({max_outcomes_per_message}) must be ≥ 1"
            )
        self._max_message_bytes = max_message_bytes
        self._stall_timeout_s = stall_timeout_s
        self._outcome_flush_s = outcome_flush_s
        self._outbox_limit = outbox_limit
        self._max_outcomes = max_outcomes_per_message
        self._stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        self._channel = channel
        # After a stall, the next stream goes over a fresh channel from this factory (a
        # stalled call can leave its connection unusable); channels it made are ours to close.
        self._channel_factory = channel_factory
        self._owned_channel: grpc.Channel | None = None
        self._target = target
        self._backoff = backoff or ReconnectBackoff()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Wakes the outcome flusher: an outbox that became non-empty, a sequence end, a
        # new stream, close.
        self._flush_wake = threading.Condition(self._lock)
        self._outbox: deque[_Queued] = deque()
        self._flush_urgent = False
        self._outcome_log_budget = 3
        self._closed_event = threading.Event()
        self._closed = False
        self._current: _Stream | None = None
        self._streams: set[_Stream] = set()
        self._readers: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._failures = 0
        self._immediate = True
        self._channel_ready = False
        self.stats = DecisionStreamStats()
        self._number = 0
        channel.subscribe(self._on_connectivity, try_to_connect=True)
        # The first stream opens here (a call object returns at once), so a submit
        # right after construction is sent, not refused.
        self._immediate = False
        self._open_stream()
        self._connector = threading.Thread(
            target=self._connect_loop, name="speckv-decide-connect", daemon=True
        )
        self._connector.start()
        self._flusher = threading.Thread(
            target=self._flush_loop, name="speckv-decide-outcomes", daemon=True
        )
        self._flusher.start()

    # --- public ---

    @property
    def connected(self) -> bool:
        """A stream is open and the channel is READY (or the stream has answered)."""
        stream = self._current
        return not self._closed and stream is not None and (self._channel_ready or stream.answered)

    def submit(self, batch: DecideBatch) -> Future[list[Decision]]:
        """Send one Decide message; the future resolves to one Decision per row."""
        future: Future[list[Decision]] = Future()
        self.stats.submitted += 1
        try:
            request = convert.decide_request_to_pb(batch, 0)
        except (KeyError, ValueError, TypeError) as exc:
            future.set_exception(InvalidArgument(f"cannot encode DecideBatch: {exc!r}"))
            return future
        size = request.ByteSize() + _REQUEST_ID_BYTES
        if size > self._max_message_bytes:
            self.stats.request_errors += 1
            future.set_exception(
                InvalidArgument(
                    f"DecideBatch of {len(batch.rows)} rows encodes to about {size} bytes; at "
                    f"most {self._max_message_bytes} are sent per message (the predictor's "
                    "--max-message-bytes); split the batch or shorten the routing keys"
                )
            )
            return future
        with self._lock:
            stream = self._current
            if stream is None or self._closed:
                self.stats.unavailable += 1
                reason = "closed" if self._closed else "not connected (reconnecting)"
                future.set_exception(
                    PredictorUnavailable(f"decision stream to {self._target} is {reason}")
                )
                return future
            request_id = next(self._ids)
            stream.expect(request_id, future)
            request.request_id = request_id
            if self._outbox:
                self._attach_locked(stream, request, self._max_message_bytes - size, False)
            # Under the lock: outcomes reach the wire in the order they were reported.
            stream.queue.put(request)
        return future

    def report(self, outcome: StepOutcome, stream: int = 0) -> None:
        """Queue one step's outcome; never blocks, never raises.

        `stream` is the `Decision.stream` of the decision that decided the step (0 for a
        fallback or local step: any stream may carry it). An outcome for a stream that is
        not the current one is dropped and counted (`stats.outcomes_dropped`).
        """
        try:
            message = convert.outcome_to_pb(outcome)
            size = message.ByteSize() + _OUTCOME_FIELD_BYTES
        except (KeyError, ValueError, TypeError) as exc:
            with self._lock:
                self.stats.outcomes_reported += 1
                self.stats.outcomes_dropped += 1
                self._log_outcome_problem(f"cannot encode StepOutcome: {exc!r}")
            return
        with self._lock:
            self.stats.outcomes_reported += 1
            current = self._current
            if self._closed or (stream and (current is None or current.number != stream)):
                self.stats.outcomes_dropped += 1
                return
            if len(self._outbox) >= self._outbox_limit:
                self.stats.outcomes_dropped += 1
                self._log_outcome_problem(
                    f"outcome outbox full ({self._outbox_limit}); dropping outcomes"
                )
                return
            self._outbox.append(_Queued(stream, message, size, time.monotonic()))
            if outcome.sequence_end:
                self._flush_urgent = True
                self._flush_wake.notify()
            elif len(self._outbox) == 1:  # the flusher times the oldest outcome
                self._flush_wake.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Send every queued outcome now and wait for the answers of every message in
        flight that carries outcomes. True when all of them were answered without an
        error within `timeout`; False otherwise (no stream, a refusal, a timeout)."""
        waits: list[Future[bool]] = []
        with self._lock:
            stream = self._current
            if stream is not None and not self._closed:
                while self._outbox:
                    self._send_outcomes_locked(stream)
            sendable = not self._outbox
            for s in self._streams:
                waits.extend(c.done for c in s.carrying.values())
        if not waits:
            return sendable
        done, not_done = wait_futures(waits, timeout=timeout)
        return sendable and not not_done and all(f.result() for f in done)

    def decide(self, batch: DecideBatch, timeout_s: float) -> list[Decision]:
        """Blocking `submit(batch).result(timeout_s)`; a timeout is a PredictorUnavailable."""
        future = self.submit(batch)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout as exc:
            future.cancel()
            raise PredictorUnavailable(
                f"no decision from {self._target} within {timeout_s:g} s"
            ) from exc

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Send queued outcomes (waiting at most `flush_timeout_s` for their answers), then
        stop reconnecting, cancel the open streams and fail what is still in flight."""
        if self._closed:
            return
        if flush_timeout_s > 0:
            self.flush(flush_timeout_s)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
            self._current = None
            self.stats.outcomes_dropped += len(self._outbox)
            self._outbox.clear()
            self._wake.notify_all()
            self._flush_wake.notify_all()
        self._closed_event.set()
        for stream in streams:
            stream.half_close()
            stream.call.cancel()
        for reader in list(self._readers):
            reader.join(timeout=2.0)
        self._connector.join(timeout=2.0)
        self._flusher.join(timeout=2.0)
        with contextlib.suppress(ValueError):
            self._channel.unsubscribe(self._on_connectivity)
        if self._owned_channel is not None:
            self._owned_channel.close()

    def __enter__(self) -> DecisionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- background ---

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._channel_ready = state == grpc.ChannelConnectivity.READY

    def _connect_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and self._current is not None:
                    self._wake.wait(min(1.0, self._stall_timeout_s / 4))
                    stalled = self._stalled_locked()
                    if stalled is not None:
                        # Such a call may not even end when cancelled (its reader stays
                        # blocked), so it is ended here: what is pending fails, `_current`
                        # clears, and this loop opens the next stream.
                        self._lock.release()
                        try:
                            self._on_end(stalled, _Stalled(self._stall_timeout_s))
                            stalled.call.cancel()
                            self._replace_channel()
                        finally:
                            self._lock.acquire()
                if self._closed:
                    return
                immediate, self._immediate = self._immediate, False
                failures = self._failures
            if not immediate:
                delay = self._backoff.delay(max(failures - 1, 0), self._rng.random())
                if self._closed_event.wait(delay):
                    return
            if not self._open_stream():
                return

    def _replace_channel(self) -> None:
        """Move to a fresh channel from `channel_factory` (none: keep this one)."""
        if self._channel_factory is None:
            return
        try:
            channel = self._channel_factory()
        except Exception as err:  # keep the old channel rather than stop reconnecting
            log.warning("decision stream to %s: cannot open a new channel: %r", self._target, err)
            return
        old, old_owned = self._channel, self._owned_channel
        with contextlib.suppress(ValueError):
            old.unsubscribe(self._on_connectivity)
        with self._lock:
            self._channel, self._owned_channel = channel, channel
            self._stub = predictor_pb2_grpc.PredictorServiceStub(channel)
            self._channel_ready = False
        channel.subscribe(self._on_connectivity, try_to_connect=True)
        log.info("decision stream to %s: reconnecting over a new channel", self._target)
        if old_owned is not None:
            old_owned.close()  # also cancels whatever is still stuck on it

    def _stalled_locked(self) -> _Stream | None:
        """The current stream when a message has waited `stall_timeout_s` with no answer
        since (counted and logged once); else None."""
        stream = self._current
        if stream is None or stream.waiting_since is None or stream.ended:
            return None
        waited = time.monotonic() - stream.waiting_since
        if waited < self._stall_timeout_s:
            return None
        stream.waiting_since = None  # cancel once
        self.stats.stalls += 1
        log.warning(
            "decide stream %d to %s answered nothing for %.1f s with %d message(s) waiting; "
            "cancelling it and opening another",
            stream.number,
            self._target,
            waited,
            len(stream.pending),
        )
        return stream

    def _open_stream(self) -> bool:
        """Start a Decide call and its reader; False when closed (stop connecting)."""
        self._number += 1
        number = self._number
        try:
            stream = _Stream(self._stub, number)
        except ValueError:  # the channel was closed under us
            return False
        reader = threading.Thread(
            target=self._read, args=(stream,), name=f"speckv-decide-read-{number}", daemon=True
        )
        with self._lock:
            if self._closed:
                stream.half_close()
                stream.call.cancel()
                return False
            self._current = stream
            self._streams.add(stream)
            self._readers = [r for r in self._readers if r.is_alive()]
            self._readers.append(reader)
            self.stats.streams_opened += 1
            self._purge_locked(keep=number)
            self._flush_wake.notify()
        log.debug("decide stream %d to %s opened", number, self._target)
        reader.start()
        return True

    def _read(self, stream: _Stream) -> None:
        error: BaseException | None = None
        try:
            for response in stream.call:
                self._on_response(stream, response)
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:  # a closed channel raises ValueError
            error = exc
        self._on_end(stream, error)

    def _on_response(self, stream: _Stream, response: predictor_pb2.DecideResponse) -> None:
        close_now = False
        refused = response.HasField("error")
        with self._lock:
            future = stream.pending.pop(response.request_id, None)
            stream.waiting_since = time.monotonic() if stream.pending else None
            if future is not None and not stream.answered:
                stream.answered = True
                self._failures = 0
            carrying = stream.carrying.pop(response.request_id, None)
            if carrying is not None and carrying.outcomes_only and refused:
                self.stats.outcome_errors += 1
                if not stream.outcomes_refused:
                    stream.outcomes_refused = True
                    err = response.error
                    log.info(
                        "predictor %s refused an outcomes-only message (%s %s: %s); "
                        "outcomes ride on decision requests only on this stream",
                        self._target,
                        convert.error_code_name(err.code),
                        err.field,
                        err.message,
                    )
            if response.reconnect and not stream.draining:
                stream.draining = True
                self.stats.reconnect_requests += 1
                if self._current is stream:
                    self._current = None
                    # A draining server tells a brand-new stream to reconnect at once;
                    # only a stream that did real work earns an immediate successor.
                    if stream.answered:
                        self._immediate = True
                    else:
                        self._failures += 1
                    self._wake.notify_all()
                    # The draining replica made these decisions and still listens: send
                    # their outcomes to it before the stream half-closes.
                    if not stream.outcomes_refused:
                        while self._outbox:
                            self._send_outcomes_locked(stream)
                    self._purge_locked(keep=0)
            close_now = stream.draining and not stream.pending
        if carrying is not None:
            # A refused decision request still delivered its piggybacked outcomes (the
            # predictor takes them whatever it answers the rows); only a refused
            # outcomes-only message means they were not taken.
            _resolve_done(carrying.done, not (refused and carrying.outcomes_only))
        if close_now:
            stream.half_close()
        if future is None or (carrying is not None and carrying.outcomes_only):
            return
        if response.HasField("error"):
            self.stats.request_errors += 1
            err = response.error
            _resolve(
                future,
                exception=PredictorRequestError(
                    convert.error_code_name(err.code), err.field, err.message
                ),
            )
        else:
            self.stats.answered += 1
            decisions = [
                replace(d, stream=stream.number) for d in convert.decisions_from_pb(response)
            ]
            _resolve(future, result=decisions)

    # --- outcomes (callers hold self._lock) ---

    def _attach_locked(
        self,
        stream: _Stream,
        request: predictor_pb2.DecideRequest,
        budget: int,
        outcomes_only: bool,
    ) -> int:
        """Move outcomes from the front of the outbox onto `request` (at most
        `max_outcomes_per_message`, at most `budget` bytes); record the message as
        carrying them. Returns how many it took."""
        taken: list[predictor_pb2.StepOutcome] = []
        outbox = self._outbox
        while outbox and len(taken) < self._max_outcomes and outbox[0].size <= budget:
            item = outbox.popleft()
            budget -= item.size
            taken.append(item.message)
        if not taken and outcomes_only and outbox:
            # One outcome larger than a whole message (an absurd routing key): never sent.
            outbox.popleft()
            self.stats.outcomes_dropped += 1
            self._log_outcome_problem("a StepOutcome larger than max_message_bytes was dropped")
            return 0
        if taken:
            request.outcomes.extend(taken)
            stream.carrying[request.request_id] = _Carrying(len(taken), outcomes_only)
            self.stats.outcomes_sent += len(taken)
        if not outbox:
            self._flush_urgent = False
        return len(taken)

    def _send_outcomes_locked(self, stream: _Stream) -> None:
        """Send one outcomes-only message (a future nobody waits on) on `stream`."""
        request = predictor_pb2.DecideRequest(request_id=next(self._ids))
        budget = self._max_message_bytes - _REQUEST_ID_BYTES
        if self._attach_locked(stream, request, budget, True) == 0:
            return
        stream.expect(request.request_id, Future())
        self.stats.outcome_messages += 1
        stream.queue.put(request)

    def _purge_locked(self, keep: int) -> None:
        """Drop queued outcomes of streams other than `keep` (stream-0 outcomes stay)."""
        if not any(q.stream not in (0, keep) for q in self._outbox):
            return
        kept = deque(q for q in self._outbox if q.stream in (0, keep))
        self.stats.outcomes_dropped += len(self._outbox) - len(kept)
        self._outbox = kept

    def _log_outcome_problem(self, message: str) -> None:
        if self._outcome_log_budget > 0:
            self._outcome_log_budget -= 1
            log.warning("decision stream to %s: %s", self._target, message)

    def _flush_loop(self) -> None:
        """Send outcomes no submit took within outcome_flush_s (at once after a sequence
        end) as outcomes-only messages."""
        with self._lock:
            while not self._closed:
                stream = self._current
                if not self._outbox or stream is None or stream.outcomes_refused:
                    # Nothing to send, or nowhere to send it alone: a submit, a new
                    # stream or close wakes us.
                    self._flush_wake.wait()
                    continue
                if not self._flush_urgent:
                    due = self._outbox[0].at + self._outcome_flush_s - time.monotonic()
                    if due > 0:
                        self._flush_wake.wait(due)
                        continue
                while self._outbox:
                    self._send_outcomes_locked(stream)
                self._flush_urgent = False

    def _on_end(self, stream: _Stream, error: BaseException | None) -> None:
        with self._lock:
            if stream.ended:  # ended already (a stalled stream whose reader came back)
                return
            pending, stream.pending = stream.pending, {}
            stream.ended = True
            self._streams.discard(stream)
            if self._current is stream:
                self._current = None
                if stream.answered:
                    self._immediate = True  # a healthy stream ended: try again at once
                else:
                    self._failures += 1
                self._wake.notify_all()
                self._purge_locked(keep=0)
            carrying, stream.carrying = stream.carrying, {}
            lost = sum(1 for c in carrying.values() if c.outcomes_only)
            self.stats.outcome_errors += lost
            pending = {
                i: f
                for i, f in pending.items()
                if i not in carrying or not carrying[i].outcomes_only
            }
            closed = self._closed
        for c in carrying.values():
            _resolve_done(c.done, False)
        stream.half_close()  # releases gRPC's request iterator thread
        if closed:
            reason = "the client closed the stream"
        elif isinstance(error, grpc.Call):
            reason = f"{error.code().name}: {error.details()}"
        elif isinstance(error, _Stalled):
            reason = str(error)
        elif error is not None:
            reason = repr(error)
        else:
            reason = "the server ended the stream"
        if error is not None and not closed:
            log.info("decide stream %d to %s broke (%s)", stream.number, self._target, reason)
        if pending:
            self.stats.unavailable += len(pending)
            for future in pending.values():
                _resolve(
                    future,
                    exception=PredictorUnavailable(
                        f"decision stream to {self._target} ended before the answer ({reason})"
                    ),
                )


def _resolve_done(future: Future[bool], ok: bool) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_result(ok)


def _resolve(
    future: Future[list[Decision]],
    *,
    result: list[Decision] | None = None,
    exception: BaseException | None = None,
) -> None:
    """Set a future that the caller may already have cancelled (then do nothing)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result if result is not None else [])
    except InvalidStateError:
        pass
