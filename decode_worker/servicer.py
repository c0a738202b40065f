"""`speckv.v1.DecoderService`: the protobuf edge of the engine.

Requests become engine calls here and engine results become messages here; nothing
below this module sees protobuf. Refused requests raise `RequestError`/`PolicyError`,
which `_refuse` turns into INVALID_ARGUMENT in one place.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from speckv.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from speckv_client import convert
from speckv_client.types import ModelSelector, Objective

import decode_worker
from decode_worker.batching import BatchScheduler, QueueFull
from decode_worker.config import WorkerConfig
from decode_worker.engine import FinishReason, GenerationResult, RequestError, SpeculativeEngine
from decode_worker.engine import StepResult as EngineStep
from decode_worker.metrics import WorkerMetrics
from decode_worker.policies import GammaPolicy, PolicyError, parse_local_policy
from decode_worker.remote_policy import RemotePolicy
from decode_worker.sampling import SamplingParams

log = logging.getLogger(__name__)

# Fixed bounds of the short strings a request may carry (docs/worker.md, "Limits").
MAX_POLICY_BYTES = 64
MAX_SELECTOR_BYTES = 128
# The retry hint sent with a RESOURCE_EXHAUSTED refusal (gRPC's standard trailer, which a
# retry policy honours); a fixed choice, not a measured generation time.
RETRY_PUSHBACK_MS = 500


@dataclass(frozen=True)
class RequestLimits:
    """What one Generate request may carry; checked before any work (docs/worker.md)."""

    max_prompt_bytes: int
    max_stop_strings: int
    max_stop_string_bytes: int
    max_request_id_bytes: int
    max_concurrent_requests: int

    @classmethod
    def of(cls, config: WorkerConfig, max_positions: int) -> RequestLimits:
        return cls(
            max_prompt_bytes=config.prompt_bytes_limit(max_positions),
            max_stop_strings=config.max_stop_strings,
            max_stop_string_bytes=config.max_stop_string_bytes,
            max_request_id_bytes=config.max_request_id_bytes,
            max_concurrent_requests=config.max_concurrent_requests,
        )

    def receive_bytes(self) -> int:
        """gRPC's receive limit for the worker: the largest valid request plus room for
        the other fields; a larger message is refused by gRPC before it is read."""
        stops = self.max_stop_strings * (self.max_stop_string_bytes + 8)
        return self.max_prompt_bytes + stops + self.max_request_id_bytes + (64 << 10)


@dataclass(frozen=True)
class ServiceInfo:
    """What GetInfo reports beyond the engine itself."""

    draft_model: str
    target_model: str
    target_dtype: str
    device: str
    predictor_address: str


class Policies:
    """The worker's default policy and the per-request overrides it accepts."""

    def __init__(self, default_spec: str, remote: RemotePolicy | None) -> None:
        self.remote = remote
        self.default_spec = default_spec
        self.default = self.resolve(default_spec, None, None)

    def resolve(
        self, spec: str, model: ModelSelector | None, objective: Objective | None
    ) -> GammaPolicy:
        local = parse_local_policy(spec)
        if local is not None:
            if model is not None or objective is not None:
                raise PolicyError(
                    f"predictor_model and objective apply to the remote policy only, "
                    f"but this request runs policy {spec!r}; drop them or use policy 'remote'"
                )
            return local
        if self.remote is None:
            raise PolicyError(
                "policy 'remote' needs a predictor, and this worker was started without "
                "--predictor; use fixed:N or heuristic, or restart the worker with --predictor"
            )
        if model is None and objective is None:
            return self.remote
        return self.remote.with_overrides(model=model, objective=objective)


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    """Generate admits at most `limits.max_concurrent_requests` generations (a counter on
    Generate only: GetInfo and health are never refused for load). Every streamed step and
    finished generation is observed in `metrics` (docs/worker.md, "Metrics"); an admitted
    generation counts as queued until its first step, then as active."""

    def __init__(
        self,
        engine: SpeculativeEngine,
        policies: Policies,
        info: ServiceInfo,
        limits: RequestLimits,
        metrics: WorkerMetrics | None = None,
        scheduler: BatchScheduler | None = None,
    ) -> None:
        self.engine = engine
        self.policies = policies
        self.info = info
        self.limits = limits
        # With batching on, the scheduler's batch + queue bound Generate instead of the counter.
        self.scheduler = scheduler
        self.metrics = metrics or WorkerMetrics()
        self._admitted = 0
        self._admit_lock = threading.Lock()

    @property
    def running(self) -> int:
        """Generations admitted and not yet finished."""
        return self._admitted

    def Generate(
        self, request: decoder_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[decoder_pb2.GenerateResponse]:
        try:
            self._check(request)
        except RequestError as err:
            _refuse(context, str(err))
            return
        if not self._admit():
            n = self.limits.max_concurrent_requests
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"worker busy: {n} generations are running, the limit "
                f"(--max-concurrent-requests {n}); retry after about {RETRY_PUSHBACK_MS} ms "
                "with backoff, or use another worker",
            )
            return
        self.metrics.queued.inc()
        started = [False]
        try:
            yield from self._generate(request, context, started)
        finally:
            (self.metrics.active if started[0] else self.metrics.queued).dec()
            with self._admit_lock:
                self._admitted -= 1

    def _admit(self) -> bool:
        with self._admit_lock:
            if self.scheduler is None and self._admitted >= self.limits.max_concurrent_requests:
                return False
            self._admitted += 1
            return True

    def _generate(
        self,
        request: decoder_pb2.GenerateRequest,
        context: grpc.ServicerContext,
        started: list[bool],
    ) -> Iterator[decoder_pb2.GenerateResponse]:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        try:
            run = self._start(request, cancelled)
        except QueueFull as err:  # batching: the batch and the queue are full
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
            return
        except (RequestError, PolicyError, ValueError) as err:
            _refuse(context, str(err))
            return
        metrics = self.metrics
        counted = 0.0  # generation seconds already added to the metrics
        last = time.perf_counter()
        for step in run:
            if not started[0]:
                started[0] = True
                metrics.queued.dec()
                metrics.active.inc()
            now = time.perf_counter()
            metrics.observe_step(step, now - last)
            counted += now - last
            last = now
            if cancelled.is_set():
                break
            yield decoder_pb2.GenerateResponse(chunk=_chunk_to_pb(step))
        if run.result is not None:
            metrics.observe_generation(run.result, counted)
        elif cancelled.is_set():
            metrics.generations.labels(FinishReason.CANCELLED.value).inc()
        if run.result is not None and not cancelled.is_set():
            yield decoder_pb2.GenerateResponse(summary=_summary_to_pb(run.result))

    def _check(self, request: decoder_pb2.GenerateRequest) -> None:
        """Every client-supplied value against its limit, before any work (no tokenizing):
        RequestError names the field and the limit."""
        lim = self.limits
        if not request.prompt:
            raise RequestError("prompt is empty; send the text to continue")
        # len(str) <= UTF-8 bytes <= 4 * len(str): a huge prompt is refused without encoding.
        if len(request.prompt) > lim.max_prompt_bytes or (
            4 * len(request.prompt) > lim.max_prompt_bytes
            and len(request.prompt.encode()) > lim.max_prompt_bytes
        ):
            raise RequestError(
                f"prompt is over {lim.max_prompt_bytes} UTF-8 bytes, this worker's limit "
                "(--max-prompt-bytes; by default 32 bytes per model position); shorten it"
            )
        _check_string("request_id", request.request_id, lim.max_request_id_bytes,
                      "--max-request-id-bytes")  # fmt: skip
        if any(not ch.isprintable() for ch in request.request_id):
            raise RequestError(
                "request_id must be printable text (no control characters); "
                f"got {request.request_id[:32]!r}"
            )
        if len(request.stop) > lim.max_stop_strings:
            raise RequestError(
                f"stop has {len(request.stop)} strings; this worker's limit is "
                f"{lim.max_stop_strings} (--max-stop-strings)"
            )
        for i, stop in enumerate(request.stop):
            _check_string(f"stop[{i}]", stop, lim.max_stop_string_bytes,
                          "--max-stop-string-bytes")  # fmt: skip
        _check_string("policy", request.policy, MAX_POLICY_BYTES, "fixed")
        if request.HasField("predictor_model"):
            sel = request.predictor_model
            _check_string("predictor_model.name", sel.name, MAX_SELECTOR_BYTES, "fixed")
            _check_string("predictor_model.alias", sel.alias, MAX_SELECTOR_BYTES, "fixed")
            if sel.version < 0:
                raise RequestError(
                    f"predictor_model.version must be ≥ 0 (0: the alias or default), "
                    f"got {sel.version}"
                )
        if (
            request.objective != common_pb2.OBJECTIVE_UNSPECIFIED
            and convert.objective_from_pb(request.objective) is None
        ):
            raise RequestError(f"objective: unknown enum value {request.objective}")
        if not (math.isfinite(request.temperature) and request.temperature >= 0):
            raise RequestError(
                f"temperature must be finite and ≥ 0 (0 is greedy), got {request.temperature}"
            )
        if not 0.0 <= request.top_p <= 1.0:
            raise RequestError(f"top_p must be in [0, 1] (0 or 1: off), got {request.top_p}")
        limit = self.engine.max_new_tokens_limit
        if request.max_new_tokens > limit:
            raise RequestError(
                f"max_new_tokens {request.max_new_tokens} is above this worker's limit {limit} "
                "(--max-new-tokens-limit, at most the pair's positions - 1)"
            )

    def _start(self, request: decoder_pb2.GenerateRequest, cancelled: threading.Event):  # type: ignore[no-untyped-def]
        model = None
        if request.HasField("predictor_model"):
            sel = request.predictor_model
            if sel.name or sel.version or sel.alias:
                model = ModelSelector(name=sel.name, version=sel.version, alias=sel.alias)
        objective = convert.objective_from_pb(request.objective)
        spec = request.policy or self.policies.default_spec
        policy = self.policies.resolve(spec, model, objective)
        top_p = request.top_p if request.top_p > 0 else 1.0
        sampling = SamplingParams(
            temperature=request.temperature, top_p=top_p, seed=int(request.seed)
        )
        prompt_ids = self.engine.encode(request.prompt)
        start = self.scheduler.submit if self.scheduler is not None else self.engine.start
        return start(
            prompt_ids,
            policy,
            sampling=sampling,
            max_new_tokens=int(request.max_new_tokens),
            stop=tuple(request.stop),
            request_id=request.request_id,
            cancelled=cancelled.is_set,
        )

    def GetInfo(
        self, request: decoder_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> decoder_pb2.GetInfoResponse:
        remote = self.policies.remote
        cfg = remote.config if remote is not None else None
        return decoder_pb2.GetInfoResponse(
            draft_model=self.info.draft_model,
            target_model=self.info.target_model,
            compression=convert.compression_to_pb(self.engine.pair.compression),
            target_dtype=self.info.target_dtype,
            device=self.info.device,
            policy=self.policies.default.spec,
            predictor_address=self.info.predictor_address,
            window=convert.window_to_pb(cfg.window if cfg else None),
            objective=convert.objective_to_pb(cfg.objective if cfg else None),
            fallback_gamma=cfg.fallback_gamma if cfg else 0,
            max_new_tokens_limit=self.engine.max_new_tokens_limit,
            concurrency=(self.scheduler or self.engine).concurrency,
            version=decode_worker.__version__,
        )


def _refuse(context: grpc.ServicerContext, reason: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)


def _check_string(field: str, value: str, limit: int, flag: str) -> None:
    # len(str) <= UTF-8 bytes <= 4 * len(str): encode only when the length cannot decide.
    if len(value) > limit or (4 * len(value) > limit and len(value.encode()) > limit):
        where = "a fixed limit" if flag == "fixed" else flag
        raise RequestError(
            f"{field} is over {limit} UTF-8 bytes, this worker's limit ({where}); "
            f"got {len(value.encode())} bytes"
        )


def _chunk_to_pb(step: EngineStep) -> decoder_pb2.TokenChunk:
    d = step.decision
    stats = decoder_pb2.StepStats(
        step=step.step,
        gamma=step.gamma,
        accepted=step.accepted,
        tokens_produced=len(step.token_ids),
        source=convert.source_to_pb(d.source),
        model_name=d.model_name,
        model_version=d.model_version,
        arm=d.arm,
        draft_seconds=step.draft_seconds,
        verify_seconds=step.verify_seconds,
        decision_wait_seconds=d.wait_seconds,
        signals=None if step.signals is None else convert.signals_to_pb(step.signals),
    )
    return decoder_pb2.TokenChunk(text=step.text, token_ids=list(step.token_ids), step=stats)


def _summary_to_pb(result: GenerationResult) -> decoder_pb2.GenerationSummary:
    s = result.stats
    return decoder_pb2.GenerationSummary(
        new_tokens=len(result.token_ids),
        steps=s.num_steps,
        tokens_per_step=s.tokens_per_step,
        acceptance_rate=s.acceptance_rate,
        mean_gamma=s.mean_gamma,
        wall_seconds=result.wall_seconds,
        tokens_per_second=result.tokens_per_second,
        remote_decisions=s.remote_decisions,
        fallback_decisions=s.fallback_decisions,
        local_decisions=s.local_decisions,
        decision_wait_seconds=s.decision_wait_seconds,
        finish_reason=convert.finish_reason_to_pb(result.finish_reason),
        text=result.text,
        request_id=result.request_id,
        model_versions=s.model_versions,
    )
