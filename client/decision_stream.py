"""One long-lived Decide stream per worker, multiplexing every sequence's decisions.

The decode worker calls `submit` at every decode step of every sequence, so it must
never block and must cost little: a request is converted, registered under a fresh
request_id and put on a queue that gRPC's request iterator drains; one reader thread
matches responses to futures by request_id. When the stream breaks, the futures in
flight fail with `PredictorUnavailable` (the worker falls back to its own gamma) and a
background thread opens a new stream with exponential backoff and jitter.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import random
import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
from speckv.v1 import predictor_pb2, predictor_pb2_grpc
from speckv_client import convert
from speckv_client.channel import ReconnectBackoff
from speckv_client.errors import InvalidArgument, PredictorRequestError, PredictorUnavailable
from speckv_client.types import DecideBatch, Decision

log = logging.getLogger(__name__)

_CLOSE = object()
"""Put on a stream's queue to half-close it (ends gRPC's request iterator)."""

MAX_MESSAGE_BYTES = 1 << 20
"""The largest Decide message sent: the predictor's default `--max-message-bytes`.

A larger batch fails its own future with `InvalidArgument` before anything is sent, so it
can never cost the other sequences on the shared stream their decisions.
"""
_REQUEST_ID_BYTES = 11  # field 1 tag + a uint64 varint, set after the size check


@dataclass
class DecisionStreamStats:
    """Counters since the stream object was created (read without locking; approximate)."""

    submitted: int = 0
    answered: int = 0
    request_errors: int = 0
    unavailable: int = 0
    streams_opened: int = 0
    reconnect_requests: int = 0


class _Stream:
    """One gRPC Decide call: its request queue, its futures in flight, its reader thread."""

    def __init__(self, stub: predictor_pb2_grpc.PredictorServiceStub, number: int) -> None:
        self.number = number
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.pending: dict[int, Future[list[Decision]]] = {}
        self.draining = False
        self.answered = False
        self.ended = False
        self.call = stub.Decide(self._requests())

    def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            item = self.queue.get()
            if item is _CLOSE:
                return
            yield item

    def half_close(self) -> None:
        self.queue.put(_CLOSE)


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
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        target: str,
        backoff: ReconnectBackoff | None = None,
        seed: int | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self._stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        self._channel = channel
        self._target = target
        self._backoff = backoff or ReconnectBackoff()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
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
            stream.pending[request_id] = future
        request.request_id = request_id
        stream.queue.put(request)
        return future

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

    def close(self) -> None:
        """Stop reconnecting, cancel the open streams, fail what is still in flight."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
            self._current = None
            self._wake.notify_all()
        self._closed_event.set()
        for stream in streams:
            stream.half_close()
            stream.call.cancel()
        for reader in list(self._readers):
            reader.join(timeout=2.0)
        self._connector.join(timeout=2.0)
        with contextlib.suppress(ValueError):
            self._channel.unsubscribe(self._on_connectivity)

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
                    self._wake.wait()
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
        with self._lock:
            future = stream.pending.pop(response.request_id, None)
            if future is not None and not stream.answered:
                stream.answered = True
                self._failures = 0
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
            close_now = stream.draining and not stream.pending
        if close_now:
            stream.half_close()
        if future is None:
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
            _resolve(future, result=convert.decisions_from_pb(response))

    def _on_end(self, stream: _Stream, error: BaseException | None) -> None:
        with self._lock:
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
            closed = self._closed
        stream.half_close()  # releases gRPC's request iterator thread
        if closed:
            reason = "the client closed the stream"
        elif isinstance(error, grpc.Call):
            reason = f"{error.code().name}: {error.details()}"
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
