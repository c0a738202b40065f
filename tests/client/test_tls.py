"""TLS from the client library and the CLI against the real predictor (self-signed cert)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from speckv_client.channel import TlsConfig
from speckv_client.cli import ExitCode
from speckv_client.errors import PredictorUnavailable
from speckv_client.predictor import PredictorClient

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture
def tls_predictor(model_repo: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from predictor_service.server import PredictorServer, ServerConfig

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=predictor.test",
         "-addext", "subjectAltName=DNS:predictor.test"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = PredictorServer(ServerConfig(repo=model_repo, tls_cert=cert, tls_key=key))
    port = server.start()
    try:
        yield f"127.0.0.1:{port}", cert
    finally:
        server.stop(0.0)


def test_tls_library_and_cli(tls_predictor: tuple[str, Path]) -> None:
    address, cert = tls_predictor
    tls = TlsConfig(ca_cert=cert, server_name="predictor.test")
    with PredictorClient(address, tls=tls) as pc:
        assert {m.name for m in pc.list_models()} >= {"speckv-mlp16"}
    with PredictorClient(address, timeout_s=1.0) as plain, pytest.raises(PredictorUnavailable):
        plain.list_models()
    cli = [sys.executable, "-m", "speckv_client.cli"]
    ok = subprocess.run(
        [*cli, "--tls-ca", str(cert), "--tls-server-name", "predictor.test",
         "models", "list", "--predictor", address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "speckv-mlp16" in ok.stdout
    wrong_name = subprocess.run(
        [*cli, "--tls-ca", str(cert), "--timeout", "2", "models", "list", "--predictor", address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong_name.returncode == ExitCode.UNREACHABLE, wrong_name.stderr
    assert "Traceback" not in wrong_name.stderr
