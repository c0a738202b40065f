"""Fixtures of the client tests; the server helpers live in `servers.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.servers import ADMIN_TOKEN, RunningPredictor


@pytest.fixture
def predictor(model_repo: Path) -> Iterator[RunningPredictor]:
    """The real predictor server (in-process thread), admin token set, port 0."""
    from predictor_service.server import PredictorServer, ServerConfig

    server = PredictorServer(
        ServerConfig(repo=model_repo, admin_token=ADMIN_TOKEN, grace_seconds=1.0)
    )
    port = server.start()
    try:
        yield RunningPredictor(f"127.0.0.1:{port}", port, model_repo)
    finally:
        server.stop(0.0)
