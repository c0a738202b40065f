"""Bearer-token check for the admin RPCs; decision and read RPCs stay open.

One interceptor instead of a check in every handler, so a new admin RPC cannot forget it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

SERVICE = "speckv.v1.PredictorService"
ADMIN_METHODS = frozenset(
    f"/{SERVICE}/{m}" for m in ("LoadModel", "UnloadModel", "SetRouting", "ResetArmStats")
)


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses admin calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an admin token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method not in ADMIN_METHODS:
            return await continuation(handler_call_details)
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        why = (
            "missing authorization metadata"
            if not given
            else "the bearer token does not match the server's --admin-token"
        )
        return _refuse(
            f"{handler_call_details.method} is an admin call: {why}; send "
            "'authorization: Bearer <token>'"
        )


def _refuse(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)
