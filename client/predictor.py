"""Typed sync client for `speckv.v1.PredictorService`.

Every unary call has a deadline; the read-only ones (Predict, ListModels, GetModel,
GetRouting, GetArmStats) are retried on UNAVAILABLE by gRPC itself through the channel's
service config. Admin calls (LoadModel, UnloadModel, SetRouting, ResetArmStats) carry the
admin token and are never retried: the caller sees exactly what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import grpc
from speckv.v1 import predictor_pb2, predictor_pb2_grpc
from speckv_client import convert
from speckv_client.channel import ChannelConfig, TlsConfig, open_channel
from speckv_client.decision_stream import MAX_MESSAGE_BYTES, STALL_TIMEOUT_S, DecisionStream
from speckv_client.errors import (
    InvalidArgument,
    PredictorRequestError,
    PredictorUnavailable,
    from_rpc_error,
)
from speckv_client.types import (
    ArmStatsReport,
    DecideBatch,
    Decision,
    ModelInfo,
    ModelSelector,
    ModelVersionInfo,
    Prediction,
    RouteWeight,
    Routing,
)

SERVICE = "speckv.v1.PredictorService"
IDEMPOTENT_METHODS = ("Predict", "ListModels", "GetModel", "GetRouting", "GetArmStats")
STABLE_ALIAS = "stable"

_T = TypeVar("_T")


class PredictorClient:
    """Client for one predictor address (`host:port` or `dns:///name:port`)."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        admin_token: str | None = None,
        timeout_s: float = 5.0,
        channel_config: ChannelConfig | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        config = channel_config or ChannelConfig()
        if tls is not None:
            config = replace(config, tls=tls)
        self.target = target
        self.timeout_s = timeout_s
        self._config = config
        self._admin_metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        )
        self._channel = open_channel(target, config, SERVICE, IDEMPOTENT_METHODS)
        self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)

    # --- lifecycle ---

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, service="predictor", target=self.target) from None

    # --- decisions ---

    def decision_stream(
        self,
        *,
        seed: int | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> DecisionStream:
        """A long-lived, self-reconnecting Decide stream on this client's channel.

        Close the stream before the client (closing the channel breaks the stream).
        """
        return DecisionStream(
            self._channel,
            target=self.target,
            backoff=self._config.reconnect,
            seed=seed,
            max_message_bytes=max_message_bytes,
            stall_timeout_s=stall_timeout_s,
            channel_factory=lambda: open_channel(
                self.target, self._config, SERVICE, IDEMPOTENT_METHODS
            ),
        )

    def decide(self, batch: DecideBatch, *, timeout_s: float | None = None) -> list[Decision]:
        """One Decide message on a short-lived stream (for tools, not for the decode loop)."""
        request = convert.decide_request_to_pb(batch, 1)
        timeout = timeout_s or self.timeout_s

        def run() -> predictor_pb2.DecideResponse:
            call = self._stub.Decide(iter([request]), timeout=timeout)
            try:
                for response in call:
                    if response.request_id == request.request_id:
                        return response
            finally:
                call.cancel()
            raise PredictorUnavailable(
                f"predictor at {self.target} closed the Decide stream without an answer"
            )

        response = self._call(run)
        if response.HasField("error"):
            err = response.error
            raise PredictorRequestError(convert.error_code_name(err.code), err.field, err.message)
        return convert.decisions_from_pb(response)

    def predict(
        self,
        rows: Sequence[Sequence[float]],
        *,
        model: ModelSelector | None = None,
        routing_key: str = "",
    ) -> Prediction:
        """Raw predicted acceptance for feature vectors in the model's manifest order."""
        request = convert.predict_request_to_pb(rows, model, routing_key)
        response = self._call(lambda: self._stub.Predict(request, timeout=self.timeout_s))
        return convert.prediction_from_pb(response)

    # --- repository (read) ---

    def list_models(self) -> list[ModelInfo]:
        response = self._call(
            lambda: self._stub.ListModels(predictor_pb2.ListModelsRequest(), timeout=self.timeout_s)
        )
        return [convert.model_info_from_pb(m) for m in response.models]

    def get_model(self, name: str) -> ModelInfo:
        response = self._call(
            lambda: self._stub.GetModel(
                predictor_pb2.GetModelRequest(name=name), timeout=self.timeout_s
            )
        )
        return convert.model_info_from_pb(response.model)

    def get_routing(self, model: str) -> Routing:
        response = self._call(
            lambda: self._stub.GetRouting(
                predictor_pb2.GetRoutingRequest(model_name=model), timeout=self.timeout_s
            )
        )
        return convert.routing_from_pb(response.routing)

    # --- outcomes and arm statistics (one replica per call) ---

    def arm_stats(
        self, model_name: str = "", window_seconds: float = 0.0, include_sequences: bool = True
    ) -> ArmStatsReport:
        """What each arm's decisions produced, as counted by the ONE replica that answers.

        `model_name` "" = every model; `window_seconds` 0 = since the last reset, else only
        sequences with an outcome in the last that-many seconds; `include_sequences` fills
        each arm's per-sequence totals (at most --arm-stats-max-sequences, the most recent).
        `report.replica` names the replica (hostname:pid:port): to cover a Service with
        several replicas, call each address and sum (docs/predictor.md).
        """
        request = predictor_pb2.GetArmStatsRequest(
            model_name=model_name,
            window_seconds=window_seconds,
            include_sequences=include_sequences,
        )
        response = self._call(lambda: self._stub.GetArmStats(request, timeout=self.timeout_s))
        return convert.arm_stats_from_pb(response)

    def reset_arm_stats(self, model_name: str = "") -> None:
        """Admin: start this replica's since-reset counts afresh ("" = every model)."""
        self._call(
            lambda: self._stub.ResetArmStats(
                predictor_pb2.ResetArmStatsRequest(model_name=model_name),
                timeout=self.timeout_s,
                metadata=self._admin_metadata,
            )
        )

    # --- admin ---

    def load_model(self, name: str, version: int) -> ModelVersionInfo:
        """Load, validate and warm a version (it takes traffic only once routed to)."""
        response = self._call(
            lambda: self._stub.LoadModel(
                predictor_pb2.LoadModelRequest(name=name, version=version),
                timeout=self.timeout_s,
                metadata=self._admin_metadata,
            )
        )
        return convert.version_info_from_pb(response.version)

    def unload_model(self, name: str, version: int) -> None:
        self._call(
            lambda: self._stub.UnloadModel(
                predictor_pb2.UnloadModelRequest(name=name, version=version),
                timeout=self.timeout_s,
                metadata=self._admin_metadata,
            )
        )

    def set_routing(self, model: str, routing: Routing) -> Routing:
        """Replace the model's routing; returns the routing now in force."""
        request = predictor_pb2.SetRoutingRequest(
            model_name=model, routing=convert.routing_to_pb(routing)
        )
        response = self._call(
            lambda: self._stub.SetRouting(
                request, timeout=self.timeout_s, metadata=self._admin_metadata
            )
        )
        return convert.routing_from_pb(response.routing)

    def rollback(self, model: str) -> Routing:
        """Route 100% to the `stable` alias and clear the shadow; salt and aliases are kept.

        Refused (InvalidArgument) when the model has no `stable` alias: there is then
        nothing to roll back to; set one with `set_routing` (CLI: `speckv route`).
        """
        current = self.get_routing(model)
        if STABLE_ALIAS not in current.aliases:
            raise InvalidArgument(
                f"model {model!r} has no {STABLE_ALIAS!r} alias to roll back to "
                f"(aliases: {current.aliases or 'none'}); set one, e.g. "
                f"`speckv route {model} stable=100 --alias stable=<VERSION>`"
            )
        return self.set_routing(
            model,
            Routing(
                weights=(RouteWeight(target=STABLE_ALIAS, weight=100.0),),
                salt=current.salt,
                shadow_version=0,
                aliases=dict(current.aliases),
            ),
        )
