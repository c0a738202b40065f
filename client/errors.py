"""Exceptions of the client library; gRPC status codes become these in one place.

Callers (the decode worker, the CLI) branch on the exception type, never on
`grpc.StatusCode`, so the transport can change without touching them.
"""

from __future__ import annotations

import grpc


class SpeckvError(Exception):
    """Base of every error the client library raises."""

    def __init__(self, message: str, *, code: str = "", details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


class PredictorUnavailable(SpeckvError):
    """The predictor cannot be reached, or did not answer in time, or the stream broke."""


class WorkerUnavailable(SpeckvError):
    """The decode worker cannot be reached, or did not answer in time."""


class AdminAuthError(SpeckvError):
    """An admin call was refused: missing or wrong `--admin-token` (UNAUTHENTICATED)."""


class NotFound(SpeckvError):
    """Unknown model, version or alias."""


class InvalidArgument(SpeckvError):
    """The server refused the request's values (INVALID_ARGUMENT / FAILED_PRECONDITION)."""


class PredictorRequestError(SpeckvError):
    """A per-message error on the Decide stream; the stream itself stays open.

    `code` is the proto ErrorCode name without its prefix ("INVALID_ARGUMENT",
    "NOT_FOUND", ...), `field` the offending field ("rows[2].signals.mean_draft_entropy").
    """

    def __init__(self, code: str, field: str, message: str) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"{code}{where}: {message}", code=code, details=message)
        self.field = field


def from_rpc_error(err: grpc.RpcError, *, service: str, target: str) -> SpeckvError:
    """Map a failed call's status to the library's exception (the one mapping helper).

    `service` is "predictor" or "worker"; it picks which *Unavailable class an
    unreachable server becomes and goes into the message with `target`.
    """
    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    name = code.name if code is not None else "UNKNOWN"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        cls: type[SpeckvError] = (
            PredictorUnavailable if service == "predictor" else WorkerUnavailable
        )
        what = (
            "did not answer in time"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else ("is unreachable")
        )
        return cls(
            f"{service} at {target} {what} ({name}: {details}); "
            "check the address and that the server is running",
            code=name,
            details=details,
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AdminAuthError(
            f"{service} at {target} refused the admin call ({name}: {details}); "
            "pass the server's token with --admin-token or SPECKV_ADMIN_TOKEN",
            code=name,
            details=details,
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"not found: {details}", code=name, details=details)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    ):
        return InvalidArgument(f"refused ({name}): {details}", code=name, details=details)
    return SpeckvError(
        f"{service} at {target} failed ({name}): {details}", code=name, details=details
    )
