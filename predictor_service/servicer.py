"""The protobuf edge of the predictor: speckv.v1 messages in, registry and decider calls,
messages out.

Nothing below the servicer sees protobuf. Decide errors become a per-message `error` and
the stream stays open; unary calls map `RequestRefused` to a gRPC status in one place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np
from speckv.draft_plan import WINDOW_DRAFT_PLAN
from speckv.v1 import common_pb2 as cpb
from speckv.v1 import predictor_pb2 as pb
from speckv.v1 import predictor_pb2_grpc as pb_grpc
from speckv.vocabulary import OBJECTIVE_FROM_WIRE, WINDOW_FROM_WIRE
from speckv_client.convert import arm_stats_to_pb, outcomes_from_pb, plan_to_pb

from predictor_service.decider import DecideInput, Decider, DecideResult, Selector
from predictor_service.decisions import Objective, StepTiming
from predictor_service.outcomes import ArmKey, ArmStatsTracker, OutcomeConfig
from predictor_service.refusals import ErrorKind, RequestRefused
from predictor_service.registry import ModelRegistry, ModelView, VersionState, VersionStatus
from predictor_service.router import Routing
from predictor_service.wire import BadMessage, StreamLimits, check_selector, check_strings

log = logging.getLogger(__name__)

T = TypeVar("T")

# How many cells (rows x candidates) one reported outcome weighs when choosing the lane:
# a message whose cells plus OUTCOME_CELLS x outcomes exceed big_message_cells runs on the
# big-message lane, off the event loop (measured: docs/predictor.md, "Outcomes and arm
# statistics").
OUTCOME_CELLS = 4

# Wire enum values -> the names the decide path uses (speckv.vocabulary, the one table).
WINDOWS = WINDOW_FROM_WIRE
OBJECTIVES: dict[int, Objective | None] = {
    cpb.OBJECTIVE_UNSPECIFIED: None,
    **{v: Objective(name) for v, name in OBJECTIVE_FROM_WIRE.items()},
}
ERROR_CODES = {
    ErrorKind.INVALID_ARGUMENT: pb.ERROR_CODE_INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: pb.ERROR_CODE_NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: pb.ERROR_CODE_RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: pb.ERROR_CODE_UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: pb.ERROR_CODE_INVALID_ARGUMENT,
    ErrorKind.INTERNAL: pb.ERROR_CODE_INTERNAL,
}
STATUS_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
MODEL_STATES = {
    VersionState.LOADING: pb.MODEL_STATE_LOADING,
    VersionState.READY: pb.MODEL_STATE_READY,
    VersionState.FAILED: pb.MODEL_STATE_FAILED,
    VersionState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


def decide_input(req: pb.DecideRequest) -> DecideInput:
    """Protobuf → arrays; only shape problems protobuf can express are caught here."""
    rows = req.rows
    window = WINDOWS.get(req.window)
    if window is None:
        raise RequestRefused(
            ErrorKind.INVALID_ARGUMENT,
            "window",
            f"is {req.window}; set DECISION_WINDOW_SAME_STEP (1), PREVIOUS_STEP (2), PREFIX (3) "
            "or DRAFT_PLAN (4)",
        )
    if req.objective not in OBJECTIVES:
        raise RequestRefused(
            ErrorKind.INVALID_ARGUMENT,
            "objective",
            f"is {req.objective}; use OBJECTIVE_TOKENS_PER_STEP (1), OBJECTIVE_GOODPUT (2) or "
            "leave it unspecified for the model's default",
        )
    n = len(rows)
    if n == 1:  # the common single-sequence message: no per-row generators
        row = rows[0]
        if not row.HasField("signals") and window != WINDOW_DRAFT_PLAN:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "rows[0].signals",
                "is missing; send the four draft signals",
            )
        s = row.signals
        signals = np.array(
            [
                [
                    s.mean_draft_entropy,
                    s.mean_draft_confidence,
                    s.max_draft_entropy,
                    s.min_draft_confidence,
                ]
            ],
            dtype=np.float64,
        )
        keys: list[str] = [row.routing_key]
        steps: list[int] = [row.step]
        compression = np.array([row.compression], dtype=np.int64)
    else:
        values: list[tuple[float, float, float, float]] = []
        keys, steps, comps = [], [], []
        for i, row in enumerate(rows):
            if not row.HasField("signals") and window != WINDOW_DRAFT_PLAN:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    f"rows[{i}].signals",
                    "is missing; send the four draft signals",
                )
            s = row.signals
            values.append(
                (
                    s.mean_draft_entropy,
                    s.mean_draft_confidence,
                    s.max_draft_entropy,
                    s.min_draft_confidence,
                )
            )
            keys.append(row.routing_key)
            steps.append(row.step)
            comps.append(row.compression)
        signals = np.array(values, dtype=np.float64).reshape(n, 4)
        compression = np.array(comps, dtype=np.int64).reshape(n)
    timing = None
    if req.HasField("timing"):
        t = req.timing
        timing = StepTiming(
            t.draft_seconds_per_token,
            t.verify_base_seconds,
            t.verify_seconds_per_token,
            t.target_only_seconds,
        )
    m = req.model
    return DecideInput(
        keys=keys,
        steps=steps,
        signals=signals,
        compression=compression,
        window=window,
        gammas=list(req.gamma_candidates),
        objective=OBJECTIVES[req.objective],
        timing=timing,
        model=Selector(m.name, m.version, m.alias),
    )


def decide_response(
    request_id: int, inp: DecideInput, res: DecideResult, reconnect: bool
) -> pb.DecideResponse:
    choice = res.choice
    gammas = choice.gamma.tolist()
    acc = choice.acceptance.tolist()
    score = choice.score.tolist()
    cands = res.candidates
    Cand = pb.CandidateScore
    Dec = pb.Decision
    heads = [(g.version.name, g.version.version, g.arm) for g in res.groups]
    row_group = res.row_group.tolist() if res.row_group is not None else None
    decisions = []
    plans = res.plans
    for i, key in enumerate(inp.keys):
        name, version, arm = heads[row_group[i]] if row_group is not None else heads[0]
        if plans is not None:
            decisions.append(
                Dec(
                    routing_key=key,
                    step=inp.steps[i],
                    gamma=gammas[i],
                    model_name=name,
                    model_version=version,
                    arm=arm,
                    plan=plan_to_pb(plans[i]),
                )
            )
            continue
        a, s = acc[i], score[i]
        decisions.append(
            Dec(
                routing_key=key,
                step=inp.steps[i],
                gamma=gammas[i],
                candidates=[
                    Cand(gamma=c, predicted_acceptance=a[j], score=s[j])
                    for j, c in enumerate(cands)
                ],
                model_name=name,
                model_version=version,
                arm=arm,
            )
        )
    return pb.DecideResponse(request_id=request_id, decisions=decisions, reconnect=reconnect)


def routing_to_pb(r: Routing) -> pb.Routing:
    return pb.Routing(
        weights=[pb.RouteWeight(target=t, weight=w) for t, w in r.weights],
        salt=r.salt,
        shadow_version=r.shadow_version,
        aliases=dict(r.aliases),
    )


def routing_from_pb(r: pb.Routing) -> Routing:
    return Routing(
        weights=tuple((w.target, w.weight) for w in r.weights),
        salt=r.salt,
        shadow_version=r.shadow_version,
        aliases=dict(r.aliases),
    )


def version_to_pb(st: VersionStatus, aliases: tuple[str, ...] = ()) -> pb.ModelVersionInfo:
    info = pb.ModelVersionInfo(version=st.version, state=MODEL_STATES[st.state], error=st.error)
    if st.loaded is not None:
        m = st.loaded.manifest
        info.window = m.window
        info.feature_names.extend(m.feature_names)
        info.gamma_candidates.extend(m.gamma_candidates)
        info.manifest_json = st.loaded.manifest_json
        info.aliases.extend(aliases)
    return info


def model_to_pb(v: ModelView) -> pb.ModelInfo:
    info = pb.ModelInfo(name=v.name, is_default=v.is_default)
    info.versions.extend(
        version_to_pb(s, v.aliases_by_version.get(s.version, ())) for s in v.versions
    )
    if v.routing is not None:
        info.routing.CopyFrom(routing_to_pb(v.routing))
    return info


def default_replica(port: int = 0) -> str:
    """This process's identity in GetArmStats: hostname:pid, plus :port when known (two
    servers in one process, as in tests, are still told apart)."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}:{port}" if port else base


class DecideStream:
    """One open Decide stream; the lock keeps a drain notice from interleaving with a write."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self.lock = asyncio.Lock()


class PredictorServicer(pb_grpc.PredictorServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        decider: Decider,
        limits: StreamLimits | None = None,
        outcomes: OutcomeConfig | None = None,
    ) -> None:
        self.registry = registry  # admin calls: load, unload, routing, listings
        self.decider = decider  # Decide and Predict
        self.metrics = decider.metrics
        self.limits = limits or StreamLimits()
        self.tracker = ArmStatsTracker(outcomes, arm_known=self.arm_known)
        # Set by the server once its port is bound.
        self.replica = default_replica()
        self.streams: set[DecideStream] = set()
        self.draining = False
        # Large messages are decided, built and serialised here, one at a time in arrival
        # order, while the event loop keeps answering small messages (onnxruntime and
        # protobuf serialisation release the GIL for most of that work).
        self.big_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-big")

    async def Decide(
        self,
        request_iterator: AsyncIterator[pb.DecideRequest | BadMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        limit = self.limits.max_decide_streams
        if len(self.streams) >= limit:
            self.metrics.errors.labels("Decide", "resource_exhausted", "").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self.streams)} Decide streams are open; at most {limit} "
                "(--max-decide-streams); retry later or use another replica",
            )
        stream = DecideStream(context)
        self.streams.add(stream)
        metrics = self.metrics
        metrics.open_streams.inc()
        loop = asyncio.get_running_loop()
        big = self.limits.big_message_cells
        try:
            if self.draining:
                async with stream.lock:
                    await context.write(pb.DecideResponse(reconnect=True))
            async for req in request_iterator:
                answer: pb.DecideResponse | bytes
                if isinstance(req, BadMessage):
                    answer, result = self._refused(req.request_id, req.error, ""), None
                elif (
                    len(req.rows) * max(1, len(req.gamma_candidates))
                    + OUTCOME_CELLS * len(req.outcomes)
                    > big
                ):
                    answer, result = await loop.run_in_executor(
                        self.big_lane, self._decide_serialized, req
                    )
                else:
                    answer, result = self._decide_one(req)
                async with stream.lock:
                    await context.write(answer)
                if result is not None and result.shadow is not None:
                    try:
                        if isinstance(answer, bytes):  # a big message: off the loop too
                            await loop.run_in_executor(self.big_lane, self._shadow, result)
                        else:
                            self._shadow(result)
                    except Exception:
                        log.exception("shadow scoring failed (the answer was already sent)")
        finally:
            self.streams.discard(stream)
            metrics.open_streams.dec()

    def _shadow(self, result: DecideResult) -> None:
        """Score the shadow and remember its predictions until the steps' outcomes arrive."""
        scores = self.decider.score_shadow(result)
        if scores is not None:
            self.tracker.remember_shadow(scores)

    def arm_known(self, key: ArmKey) -> bool:
        """May an outcome be credited to (model, version, arm)? Yes when this server decided
        through it, or when the model's version is loaded and the arm is one its routing can
        name (`pinned`, `v<N>`, a current alias): outcomes of a replica that restarted or of
        a stream that moved here still count, while made-up names never become series."""
        if self.metrics.has_arm(key):
            return True
        model, version, arm = key
        try:
            table = self.registry.table(model)
        except RequestRefused:
            return False
        if version not in table.versions:
            return False
        return arm in ("pinned", f"v{version}") or arm in table.aliases

    def _take_outcomes(self, req: pb.DecideRequest) -> pb.DecideResponse | None:
        """Count the outcomes a message carries; a refusal only when there are too many.

        A malformed outcome is counted as rejected and dropped here, never an error for the
        message: the rows beside it are decided as usual.
        """
        outcomes = req.outcomes
        cap = self.tracker.config.max_outcomes_per_message
        if len(outcomes) > cap:
            return self._refused(
                req.request_id,
                RequestRefused(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    "outcomes",
                    f"has {len(outcomes)} outcomes; at most {cap} per message "
                    "(--max-outcomes-per-message); send them over several messages "
                    "(none of these were counted)",
                ),
                req.model.name,
            )
        try:
            summary = self.tracker.record(outcomes_from_pb(req.outcomes))
            self.metrics.record_outcomes(summary)
        except Exception:  # counting outcomes never costs the rows their decisions
            log.exception("counting the outcomes of Decide request %d failed", req.request_id)
        return None

    def _refused(self, request_id: int, e: RequestRefused, model: str) -> pb.DecideResponse:
        self.metrics.errors.labels("Decide", e.kind.value, model).inc()
        err = pb.Error(code=ERROR_CODES[e.kind], field=e.field, message=e.message)
        return pb.DecideResponse(request_id=request_id, error=err, reconnect=self.draining)

    def _decide_serialized(self, req: pb.DecideRequest) -> tuple[bytes, DecideResult | None]:
        """`_decide_one` with the answer serialised (the big-message lane's whole job)."""
        resp, result = self._decide_one(req)
        return resp.SerializeToString(), result

    def _decide_one(self, req: pb.DecideRequest) -> tuple[pb.DecideResponse, DecideResult | None]:
        metrics = self.metrics
        metrics.decide_messages.inc()
        if req.outcomes:
            refused = self._take_outcomes(req)
            if refused is not None:
                return refused, None
            if not req.rows:  # outcomes only: an empty answer, no decisions, no error
                return pb.DecideResponse(request_id=req.request_id, reconnect=self.draining), None
        metrics.decide_batch_rows.observe(len(req.rows))
        try:
            limits = self.limits
            check_strings(req, limits.max_routing_key_bytes, limits.max_name_bytes)
            inp = decide_input(req)
            result = self.decider.decide(inp)
            return decide_response(req.request_id, inp, result, self.draining), result
        except RequestRefused as e:
            model = req.model.name or self.registry.config.default_model or ""
            return self._refused(req.request_id, e, model), None
        except Exception as e:  # the server never crashes on input
            log.exception("Decide request %d failed", req.request_id)
            metrics.errors.labels("Decide", ErrorKind.INTERNAL.value, req.model.name).inc()
            err = pb.Error(code=pb.ERROR_CODE_INTERNAL, field="", message=f"internal error: {e}")
            return pb.DecideResponse(
                request_id=req.request_id, error=err, reconnect=self.draining
            ), None

    async def notify_reconnect(self) -> int:
        """Tell every open stream to reconnect elsewhere; returns how many were told."""
        self.draining = True
        told = 0
        for stream in list(self.streams):
            try:
                async with stream.lock:
                    await stream.context.write(pb.DecideResponse(reconnect=True))
                told += 1
            except Exception as e:  # a stream that is already closing
                log.debug("could not notify a stream: %s", e)
        return told

    async def _unary(
        self, context: grpc.aio.ServicerContext, rpc: str, fn: Callable[[], Awaitable[T]]
    ) -> T:
        self.metrics.messages.labels(rpc).inc()
        try:
            return await fn()
        except RequestRefused as e:
            self.metrics.errors.labels(rpc, e.kind.value, "").inc()
            await context.abort(
                STATUS_CODES[e.kind], f"{e.field}: {e.message}" if e.field else e.message
            )
        raise AssertionError("unreachable")

    async def Predict(
        self, request: pb.PredictRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        async def run() -> pb.PredictResponse:
            if isinstance(request, BadMessage):
                raise request.error
            m = request.model
            self._check_predict_strings(request)
            out, version, arm = self.decider.predict(
                Selector(m.name, m.version, m.alias),
                request.routing_key,
                [list(r.values) for r in request.rows],
            )
            return pb.PredictResponse(
                predicted_acceptance=out.tolist(),
                model_name=version.name,
                model_version=version.version,
                arm=arm,
            )

        return await self._unary(context, "Predict", run)

    def _check_predict_strings(self, request: pb.PredictRequest) -> None:
        limits = self.limits
        key = request.routing_key
        if (
            len(key) > limits.max_routing_key_bytes // 4
            and len(key.encode()) > limits.max_routing_key_bytes
        ):
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "routing_key",
                f"is {len(key.encode())} bytes; at most {limits.max_routing_key_bytes} "
                "(--max-routing-key-bytes)",
            )
        check_selector(request.model.name, request.model.alias, limits.max_name_bytes)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def run() -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[model_to_pb(v) for v in self.registry.models()])

        return await self._unary(context, "ListModels", run)

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        async def run() -> pb.GetModelResponse:
            return pb.GetModelResponse(model=model_to_pb(self.registry.model(request.name)))

        return await self._unary(context, "GetModel", run)

    async def GetRouting(
        self, request: pb.GetRoutingRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRoutingResponse:
        async def run() -> pb.GetRoutingResponse:
            return pb.GetRoutingResponse(
                routing=routing_to_pb(self.registry.routing(request.model_name))
            )

        return await self._unary(context, "GetRouting", run)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        async def run() -> pb.LoadModelResponse:
            loop = asyncio.get_running_loop()
            # Loading validates and warms in a worker thread; decisions keep flowing meanwhile.
            st = await loop.run_in_executor(None, self.registry.load, request.name, request.version)
            view = self.registry.model(request.name)
            return pb.LoadModelResponse(
                version=version_to_pb(st, view.aliases_by_version.get(st.version, ()))
            )

        return await self._unary(context, "LoadModel", run)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        async def run() -> pb.UnloadModelResponse:
            self.registry.unload(request.name, request.version)
            return pb.UnloadModelResponse()

        return await self._unary(context, "UnloadModel", run)

    async def SetRouting(
        self, request: pb.SetRoutingRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRoutingResponse:
        async def run() -> pb.SetRoutingResponse:
            r = self.registry.set_routing(request.model_name, routing_from_pb(request.routing))
            return pb.SetRoutingResponse(routing=routing_to_pb(r))

        return await self._unary(context, "SetRouting", run)

    # ----- outcomes and arm statistics ---------------------------------------------------

    def _check_model_name(self, name: str) -> None:
        """'' (every model) or a model this server knows, else NOT_FOUND naming the choices."""
        if not name:
            return
        limit = self.limits.max_name_bytes
        if len(name) > limit // 4 and len(name.encode()) > limit:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "model_name",
                f"is {len(name.encode())} bytes; at most {limit}",
            )
        known = [m.name for m in self.registry.models()]
        if name not in known:
            raise RequestRefused(
                ErrorKind.NOT_FOUND,
                "model_name",
                f"unknown model {name!r}; this server has {known or 'no models'}",
            )

    async def GetArmStats(
        self, request: pb.GetArmStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetArmStatsResponse:
        async def run() -> pb.GetArmStatsResponse:
            window = request.window_seconds
            if not (math.isfinite(window) and window >= 0):
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    "window_seconds",
                    f"is {window}; send a finite number of seconds >= 0 (0 = since reset)",
                )
            self._check_model_name(request.model_name)

            def build() -> pb.GetArmStatsResponse:
                report = self.tracker.report(
                    request.model_name, window, request.include_sequences, self.replica
                )
                return arm_stats_to_pb(report)

            # Up to --arm-stats-max-sequences records per arm: built off the event loop.
            return await asyncio.get_running_loop().run_in_executor(None, build)

        return await self._unary(context, "GetArmStats", run)

    async def ResetArmStats(
        self, request: pb.ResetArmStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetArmStatsResponse:
        async def run() -> pb.ResetArmStatsResponse:
            self._check_model_name(request.model_name)
            self.tracker.reset(request.model_name)
            log.info("arm statistics reset for %s", request.model_name or "every model")
            return pb.ResetArmStatsResponse()

        return await self._unary(context, "ResetArmStats", run)
