"""A refused request, shared by the registry (admin calls), the decider and the wire edge.

`servicer.py` maps each `ErrorKind` to a gRPC status (unary calls) or a per-message
`Error` (Decide), in one place.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"


class RequestRefused(Exception):
    """A refused request: which field, why, and what kind of failure (maps to a gRPC code)."""

    def __init__(self, kind: ErrorKind, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.kind = kind
        self.field = field
        self.message = message
