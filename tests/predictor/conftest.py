"""A real predictor server (in-process, its own thread and loop) on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from speckv.v1 import predictor_pb2_grpc as pb_grpc

from predictor_service.server import PredictorServer, ServerConfig
from tests.predictor.helpers import MODEL, TOKEN


@pytest.fixture
def start_server() -> Iterator[Callable[..., PredictorServer]]:
    """Factory: start a server with ServerConfig overrides; every one is stopped afterwards."""
    started: list[PredictorServer] = []

    def start(repo: Path, **overrides: object) -> PredictorServer:
        config = ServerConfig(repo=repo, host="127.0.0.1", port=0, **overrides)  # type: ignore[arg-type]
        server = PredictorServer(config)
        server.start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop(0.0)


@pytest.fixture
def server(model_repo: Path, start_server: Callable[..., PredictorServer]) -> PredictorServer:
    return start_server(model_repo, default_model=MODEL, admin_token=TOKEN)


@pytest.fixture
def channel(server: PredictorServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.address)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.PredictorServiceStub:
    return pb_grpc.PredictorServiceStub(channel)
