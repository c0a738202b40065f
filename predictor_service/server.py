"""The predictor's gRPC server lifecycle: bind, load, serve, poll, drain.

`PredictorServer` runs on an asyncio loop: the CLI runs it in the main thread; tests and
other in-process users call `start()` (a background thread with its own loop) and `stop()`,
or `await start_async()` / `drain_async()` from their own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from concurrent.futures import Future
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.auth import SERVICE, AdminTokenInterceptor
from predictor_service.decider import Decider
from predictor_service.metrics import PredictorMetrics
from predictor_service.registry import ModelRegistry
from predictor_service.server_config import ServerConfig as ServerConfig
from predictor_service.servicer import PredictorServicer, default_replica
from predictor_service.wire import lenient_deserializer

log = logging.getLogger(__name__)


class _Handlers:
    """Catches the generated code's handlers so two of them can be changed before use."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, dict(handlers)


def _serialize_decide(resp: Any) -> bytes:
    """Big answers arrive already serialised (off the event loop); the rest are messages."""
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


def add_servicer(servicer: PredictorServicer, server: grpc.aio.Server, max_bytes: int) -> None:
    """The generated registration, with Decide and Predict decoded by `lenient_deserializer`.

    gRPC ends a stream when its deserializer raises; these never raise, so a message that is
    too large or not valid protobuf (non-UTF-8 string) is answered on its own.
    """
    from speckv.v1 import predictor_pb2 as pb

    caught = _Handlers()
    pb_grpc.add_PredictorServiceServicer_to_server(servicer, caught)
    h = caught.handlers
    h["Decide"] = h["Decide"]._replace(
        request_deserializer=lenient_deserializer(pb.DecideRequest, max_bytes, "Decide"),
        response_serializer=_serialize_decide,
    )
    h["Predict"] = h["Predict"]._replace(
        request_deserializer=lenient_deserializer(pb.PredictRequest, max_bytes, "Predict")
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(caught.service, h),))
    server.add_registered_method_handlers(caught.service, h)


class PredictorServer:
    """One gRPC predictor: registry, decider, servicer, health, reflection, metrics and polling."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = PredictorMetrics()
        self.registry = ModelRegistry(config.registry_config(), self.metrics)
        self.decider = Decider(self.registry, config.decider_config(), self.metrics)
        self.servicer = PredictorServicer(
            self.registry, self.decider, config.limits(), config.outcome_config()
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._metrics_http: Any = None
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    # ----- asyncio API ---------------------------------------------------------------

    async def start_async(self) -> int:
        """Bind, report NOT_SERVING, load the repository, then SERVING; returns the port."""
        cfg = self.config
        cfg.check()
        if cfg.switch_interval_s is not None:
            # The big-message lane and the event loop share the GIL; a short switch interval
            # bounds how long a small message waits for it (default 5 ms).
            sys.setswitchinterval(cfg.switch_interval_s)
        self._stopped = asyncio.Event()
        interceptors = [AdminTokenInterceptor(cfg.admin_token)] if cfg.admin_token else []
        server = grpc.aio.server(interceptors=interceptors, options=cfg.grpc_options())
        add_servicer(self.servicer, server, cfg.max_message_bytes)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        target = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())]
            )
            self.port = server.add_secure_port(target, creds)
        else:
            self.port = server.add_insecure_port(target)
        if self.port == 0:
            raise OSError(f"cannot bind {target}; is the port in use?")
        self.servicer.replica = default_replica(self.port)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        scheme = "tls" if cfg.tls_cert else "insecure"
        print(f"listening on {self.address} ({scheme})", flush=True)
        log.info("listening on %s (%s)", self.address, scheme)
        if cfg.metrics_port is not None:
            httpd, _ = start_http_server(
                cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry
            )
            self._metrics_http = httpd
            self.metrics_port = int(httpd.server_address[1])
            print(f"metrics on http://{cfg.host}:{self.metrics_port}/metrics", flush=True)
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(None, self.registry.scan)
        for line in report:
            log.info("%s", line)
        if cfg.routing_file is not None:
            await loop.run_in_executor(
                None, self.registry.apply_routing_file, cfg.routing_file, True
            )
        await self._update_health()
        n = self.registry.ready_count
        if n:
            print(f"serving {n} model version(s) from {cfg.repo}", flush=True)
        else:
            print(f"no model version could be loaded from {cfg.repo}; NOT_SERVING", flush=True)
        if cfg.poll_seconds is not None:
            self._poll_task = asyncio.create_task(self._poll(cfg.poll_seconds))
        return self.port

    async def _poll(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            try:
                for line in await loop.run_in_executor(None, self.registry.scan):
                    log.info("poll: %s", line)
                if self.config.routing_file is not None:
                    await loop.run_in_executor(
                        None, self.registry.apply_routing_file, self.config.routing_file, False
                    )
                await self._update_health()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll of %s failed; will retry", self.config.repo)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)  # type: ignore[arg-type]

    async def _update_health(self) -> None:
        if self._stopping:
            return
        ok = self.registry.ready_count > 0
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def drain_async(self, grace: float | None = None) -> None:
        """NOT_SERVING, tell streams to reconnect, let them finish for `grace` s, then stop."""
        if self._stopping:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        told = await self.servicer.notify_reconnect()
        log.info("draining: told %d open stream(s) to reconnect; grace %.1f s", told, grace)
        while self.servicer.streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        self.servicer.big_lane.shutdown(wait=False)
        if self._metrics_http is not None:
            # shutdown() waits up to the HTTP server's 0.5 s poll; keep the loop free meanwhile.
            await loop.run_in_executor(None, self._metrics_http.shutdown)
            self._metrics_http.server_close()
        log.info("stopped")
        if self._stopped is not None:
            self._stopped.set()

    async def wait_async(self) -> None:
        assert self._stopped is not None, "start the server first"
        await self._stopped.wait()

    # ----- thread API (tests, benchmarks, embedding) ----------------------------------

    def start(self) -> int:
        """Start on a background thread with its own loop; returns the bound port once loaded."""
        started: Future[int] = Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                started.set_result(loop.run_until_complete(self.start_async()))
            except BaseException as e:
                started.set_exception(e)
                loop.close()
                return
            loop.run_until_complete(self.wait_async())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=main, name="predictor-server", daemon=True)
        self._thread.start()
        return started.result(timeout=120)

    def run_coroutine(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop (from another thread) and wait for it."""
        assert self._loop is not None, "start() the server first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def drain(self, grace: float | None = None) -> None:
        self.stop(grace)

    def stop(self, grace: float | None = 0.0) -> None:
        """Drain and stop a server started with `start()`; waits for its thread."""
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            timeout = 30.0 + (grace or self.config.grace_seconds)
            with contextlib.suppress(RuntimeError):
                self.run_coroutine(self.drain_async(grace), timeout=timeout)
            self._thread.join(timeout=timeout)

    def __enter__(self) -> PredictorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0.0)
