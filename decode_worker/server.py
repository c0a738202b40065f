"""Assemble and run a worker: pair → engine → policies → gRPC server with health.

`WorkerServer` is used both by `speckv-worker serve` and in-process (tests, evaluation):
it takes an already loaded pair, so a test loads the tiny pair once and starts as many
servers over it as it needs. Shutdown: health flips to NOT_SERVING, in-flight
generations get `shutdown_grace_s` to finish, then the predictor stream closes, the step
recorder publishes its open file and the metrics endpoint stops.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from speckv.v1 import decoder_pb2, decoder_pb2_grpc

from decode_worker.batching import BatchScheduler, DecisionCoalescer
from decode_worker.config import WorkerConfig
from decode_worker.engine import PairLike, SpeculativeEngine
from decode_worker.metrics import WorkerMetrics
from decode_worker.records import RotatingStepRecorder, StepRecorder, StepSink
from decode_worker.remote_policy import RemotePolicy
from decode_worker.servicer import DecoderServicer, Policies, RequestLimits, ServiceInfo

log = logging.getLogger(__name__)

# Threads beyond the admitted generations: health checks, GetInfo, reflection and refusals.
SPARE_THREADS = 8

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


@dataclass
class _Predictor:
    client: Any
    stream: Any


class WorkerServer:
    """A running decode worker; `address` is `host:port` once `start` returned."""

    def __init__(
        self, config: WorkerConfig, pair: PairLike, *, describe: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.pair = pair
        self.metrics = WorkerMetrics()
        if config.log_steps and config.record is not None:
            raise ValueError(
                "--log-steps and --record-steps both record steps; give one (--record-steps "
                "DIR is the production one: rotating files, every step)"
            )
        recorder: StepSink | None = None
        self.rotating_recorder: RotatingStepRecorder | None = None
        if config.record is not None:
            self.rotating_recorder = RotatingStepRecorder(config.record)
            recorder = self.rotating_recorder
        elif config.log_steps:
            recorder = StepRecorder(config.log_steps)
        rotating = self.rotating_recorder
        self.metrics.read_records_dropped(lambda: rotating.dropped if rotating else 0)
        self.recorder = recorder
        self.engine = SpeculativeEngine(pair, config.engine, recorder=recorder)
        self._predictor: _Predictor | None = None
        # --batching on: rows' Decide submissions of one batch step go out as one message.
        self.coalescer: DecisionCoalescer | None = None
        remote = None
        if config.predictor:
            from speckv_client.predictor import PredictorClient

            client = PredictorClient(config.predictor)
            remote_config = config.remote
            if config.learn_window or config.check_window:
                from decode_worker.discovery import resolve_remote

                name = config.remote.model.name if config.remote.model else ""
                explicit = None if config.learn_window else config.remote.window
                try:
                    remote_config, how = resolve_remote(
                        config.remote,
                        explicit,
                        client,
                        name,
                        wait_s=10.0 if config.learn_window else 1.0,
                    )
                except Exception:
                    client.close()
                    raise
                log.info("remote policy: %s", how)
            stream = client.decision_stream()
            self._predictor = _Predictor(client, stream)
            self.metrics.read_stream_stats(lambda: stream.stats)
            self.metrics.read_gauge(
                "predictor_connected",
                "1 while the Decide stream to the predictor is open",
                lambda: 1.0 if stream.connected else 0.0,
            )
            if config.batching:
                self.coalescer = DecisionCoalescer(stream)
            remote = RemotePolicy(self.coalescer or stream, remote_config, self.engine.timing)
        self.policies = Policies(config.policy, remote)
        self.scheduler: BatchScheduler | None = None
        if config.batching:
            self.scheduler = BatchScheduler(
                self.engine,
                max_batch_size=config.max_batch_size,
                max_queue=config.max_queue,
                coalescer=self.coalescer,
            )
            st = self.scheduler.stats
            for name, text, read in (
                ("batch_steps", "Batch steps run", lambda: st.steps),
                ("batch_row_steps", "Sequence steps run in batches", lambda: st.row_steps),
                ("batch_step_seconds", "Seconds in batch steps", lambda: st.step_seconds),
                (
                    "batch_forward_seconds",
                    "Seconds of batch steps in draft and verify forwards",
                    lambda: st.forward_seconds,
                ),
                ("batch_joins", "Prefill forwards of joining requests", lambda: st.joins),
                (
                    "batch_join_seconds",
                    "Seconds in prefills of joining requests",
                    lambda: st.join_seconds,
                ),
                (
                    "batch_decide_messages",
                    "Decide messages the batch sent (one per batch step at most)",
                    lambda: st.decide_messages,
                ),
            ):
                self.metrics.read_gauge(name, text, read)
            self.metrics.read_counters(
                "batch_width_steps",
                "Batch steps by rows in the batch and verify width (the step's longest draft; "
                "0: a step without drafting)",
                ("rows", "width"),
                lambda: {(str(b), str(w)): n for (b, w), n in dict(st.shapes).items()},
            )
        desc = describe or {}
        info = ServiceInfo(
            draft_model=desc.get("draft_model", config.draft),
            target_model=desc.get("target_model", config.target),
            target_dtype=desc.get("target_dtype", ""),
            device=desc.get("device", str(self.engine.device)),
            predictor_address=config.predictor,
        )
        self.limits = RequestLimits.of(config, self.engine.max_positions)
        self.metrics.finish_wiring()
        self.servicer = DecoderServicer(
            self.engine,
            self.policies,
            info,
            self.limits,
            metrics=self.metrics,
            scheduler=self.scheduler,
        )
        self.health = health.HealthServicer()
        # No maximum_concurrent_rpcs: gRPC would count health checks and GetInfo against it
        # and refuse them under load. Generate admits `max_concurrent_requests` itself;
        # the spare threads answer health, GetInfo and refusals while generations run.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=SPARE_THREADS
                + (
                    config.max_batch_size + config.max_queue
                    if config.batching
                    else config.max_concurrent_requests
                ),
                thread_name_prefix="speckv-worker",
            ),
            options=[("grpc.max_receive_message_length", self.limits.receive_bytes())],
        )
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _add_reflection(self._server)
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_http: Any = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> WorkerServer:
        """Bind, warm up (timing model), then report SERVING."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}; is it in use?")
        if self.config.metrics_port is not None:
            self._start_metrics(self.config.host, self.config.metrics_port)
        self._server.start()
        if self.config.warmup:
            self.engine.warmup()
            if self.scheduler is not None:
                self.scheduler.warmup()  # batched costs per batch size (batch-goodput)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _start_metrics(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            httpd, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as err:
            raise OSError(
                f"could not serve metrics on {host}:{port} (--metrics-port): {err}"
            ) from err
        self._metrics_http = httpd
        self.metrics_port = int(httpd.server_address[1])

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.metrics_port}/metrics" if self.metrics_port else ""

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, let in-flight generations finish, then release everything."""
        self.health.enter_graceful_shutdown()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._server.stop(grace).wait()
        if self.scheduler is not None:
            self.scheduler.close(timeout=5.0)  # clients are gone: their rows cancel at once
        if self._predictor is not None:
            self._predictor.stream.close()
            self._predictor.client.close()
        if self.recorder is not None:
            self.recorder.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def __enter__(self) -> WorkerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0.5)


def _add_reflection(server: grpc.Server) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:  # reflection is a convenience, not a requirement
        return
    from grpc_health.v1 import health_pb2 as hpb

    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            hpb.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
