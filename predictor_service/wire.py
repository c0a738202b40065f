"""Bytes on the wire before they are messages: per-message limits and lenient decoding.

gRPC hands a Decide message to its deserializer; if that raises, the whole stream ends.
The predictor's deserializers never raise: a message that is too large or does not parse
(a `string` field that is not UTF-8) becomes a `BadMessage` with the request_id read from
the raw bytes, and the servicer answers it with a per-message error on a stream that stays
open. Only what gRPC itself refuses before the deserializer runs (a message over the
transport limit, `transport_limit()`) still ends the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from speckv.v1 import predictor_pb2 as pb

from predictor_service.refusals import ErrorKind, RequestRefused

# The per-message limits' defaults are defined with the server's flags (server_config.py).
from predictor_service.server_config import (
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    MAX_ROUTING_KEY_BYTES,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# How many top-level fields the request_id scan of a refused message looks at (bounded work
# on hostile bytes; every serializer writes field 1 first).
_SCAN_FIELDS = 64


@dataclass(frozen=True)
class StreamLimits:
    """Per-message and per-server bounds of the Decide/Predict edge (flags in server.py)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_routing_key_bytes: int = MAX_ROUTING_KEY_BYTES
    max_name_bytes: int = MAX_NAME_BYTES
    max_decide_streams: int = 1024
    # Messages with more rows x candidates than this run on the big-message lane (one
    # thread) so they never hold the event loop that answers everyone's small messages.
    big_message_cells: int = 256


def transport_limit(max_message_bytes: int) -> int:
    """gRPC's own receive limit: 4× the answered limit, at least gRPC's default 4 MiB.

    Messages between the two get a per-message RESOURCE_EXHAUSTED answer; above it gRPC
    ends the stream (it never hands such a message to the server).
    """
    return max(4 << 20, 4 * max_message_bytes)


@dataclass(frozen=True)
class BadMessage:
    """A message the server could not turn into a request, with what to answer."""

    request_id: int
    error: RequestRefused


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def request_id_of(data: bytes) -> int:
    """Field 1 (uint64 request_id) of raw DecideRequest bytes, 0 when it cannot be found."""
    pos = 0
    try:
        for _ in range(_SCAN_FIELDS):
            if pos >= len(data):
                return 0
            tag, pos = _varint(data, pos)
            number, kind = tag >> 3, tag & 7
            if kind == 0:
                value, pos = _varint(data, pos)
                if number == 1:
                    return value
            elif kind == 1:
                pos += 8
            elif kind == 2:
                size, pos = _varint(data, pos)
                pos += size
            elif kind == 5:
                pos += 4
            else:
                return 0
    except ValueError:
        return 0
    return 0


_LENIENT: dict[str, type[Message]] = {}


def _lenient_class(descriptor: Any) -> type[Message]:
    """The same message with every `string` field as `bytes`, so invalid UTF-8 still parses."""
    name = descriptor.full_name
    cls = _LENIENT.get(name)
    if cls is not None:
        return cls
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()

    def add(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)

        def loosen(messages: Any) -> None:
            for m in messages:
                for f in m.field:
                    if m.options.map_entry and f.name == "key":
                        continue  # map keys cannot be bytes; a bad one stays unnamed
                    if f.type == FieldDescriptor.TYPE_STRING:
                        f.type = FieldDescriptor.TYPE_BYTES
                loosen(m.nested_type)

        loosen(proto.message_type)
        pool.Add(proto)

    add(descriptor.file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    _LENIENT[name] = cls
    return cls


def _bad_utf8(strict: Any, msg: Message, prefix: str = "") -> Iterator[str]:
    """Paths of `string` fields (by the strict descriptor) whose bytes are not UTF-8."""
    for field, value in msg.ListFields():
        sfield = strict.fields_by_number.get(field.number)
        if sfield is None:
            continue
        repeated = bool(sfield.is_repeated)
        path = prefix + sfield.name
        values = list(value) if repeated else [value]
        for i, v in enumerate(values):
            where = f"{path}[{i}]" if repeated else path
            if sfield.type == FieldDescriptor.TYPE_STRING:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    yield where
            elif sfield.type == FieldDescriptor.TYPE_MESSAGE:
                sub = sfield.message_type
                if sub is not None and not sub.GetOptions().map_entry:
                    yield from _bad_utf8(sub, v, where + ".")


def undecodable(cls: type[Message], data: bytes, e: DecodeError) -> RequestRefused:
    """Why `data` does not parse as `cls`, naming the field when it is a non-UTF-8 string."""
    try:
        loose = _lenient_class(cls.DESCRIPTOR).FromString(data)
    except Exception:  # not protobuf at all (or a bad map key): say what the parser said
        return RequestRefused(
            ErrorKind.INVALID_ARGUMENT, "", f"the message is not a valid {cls.__name__}: {e}"
        )
    for path in _bad_utf8(cls.DESCRIPTOR, loose):
        return RequestRefused(
            ErrorKind.INVALID_ARGUMENT, path, "is not valid UTF-8; string fields must be UTF-8"
        )
    return RequestRefused(
        ErrorKind.INVALID_ARGUMENT, "", f"the message is not a valid {cls.__name__}: {e}"
    )


def lenient_deserializer(
    cls: type[M], max_bytes: int, what: str
) -> Callable[[bytes], M | BadMessage]:
    """A gRPC request deserializer that returns a `BadMessage` instead of raising."""

    def decode(data: bytes) -> M | BadMessage:
        if len(data) > max_bytes:
            return BadMessage(
                request_id_of(data),
                RequestRefused(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    "",
                    f"the {what} message is {len(data)} bytes; at most {max_bytes} are "
                    "answered (--max-message-bytes); split the batch",
                ),
            )
        try:
            return cls.FromString(data)
        except DecodeError as e:
            try:
                return BadMessage(request_id_of(data), undecodable(cls, data, e))
            except Exception:  # never end the stream over a message we cannot explain
                log.exception("explaining an undecodable %s message failed", what)
                why = RequestRefused(ErrorKind.INVALID_ARGUMENT, "", f"not a valid message: {e}")
                return BadMessage(request_id_of(data), why)

    return decode


def check_strings(req: pb.DecideRequest, max_key_bytes: int, max_name_bytes: int) -> None:
    """Bound the client-supplied strings of a Decide message (RequestRefused names the field)."""
    for i, row in enumerate(req.rows):
        key = row.routing_key
        if len(key) > max_key_bytes // 4 and len(key.encode()) > max_key_bytes:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                f"rows[{i}].routing_key",
                f"is {len(key.encode())} bytes; at most {max_key_bytes} (--max-routing-key-bytes)",
            )
    check_selector(req.model.name, req.model.alias, max_name_bytes)


def check_selector(name: str, alias: str, max_name_bytes: int) -> None:
    for field, value in (("model.name", name), ("model.alias", alias)):
        if len(value) > max_name_bytes // 4 and len(value.encode()) > max_name_bytes:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                field,
                f"is {len(value.encode())} bytes; at most {max_name_bytes}",
            )
