"""Run the predictor container of the dev-cpu overlay as a local process, with the manifest's own
args, seed script, routing ConfigMap and token Secret (paths moved into a temp folder, loopback
only), and check what the probes and the runbook rely on: the probes' health service names,
NOT_SERVING until the seed Job registers a version, the routing file accepted, metrics on the
annotated port, and a SIGTERM stop well inside terminationGracePeriodSeconds."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.deploy.manifests import DEPLOY, find, render

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return -1  # not listening yet
            raise


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_predictor_pod_args_probes_seed_routing_metrics_and_sigterm(tmp_path: Path) -> None:
    objects = render(DEPLOY / "overlays" / "dev-cpu")
    deployment = find(objects, "Deployment", "speckv-predictor")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    routing_file = "/etc/speckv/routing/routing.json"
    routing_map = find(objects, "ConfigMap", "speckv-predictor-routing")
    (tmp_path / "routing.json").write_text(routing_map["data"]["routing.json"])
    repo = tmp_path / "models"
    repo.mkdir()
    token = base64.b64decode(find(objects, "Secret", "speckv-admin-token")["data"]["token"])

    port, metrics_port = free_port(), free_port()
    args = []
    for arg in container["args"]:
        name = arg.partition("=")[0]
        replaced = {
            "--repo": str(repo),
            "--routing-file": str(tmp_path / "routing.json"),
            "--host": "127.0.0.1",
            "--port": str(port),
            "--metrics-port": str(metrics_port),
            "--poll-seconds": "0.5",  # the manifest's 10 s, shortened for the test
        }.get(name)
        args.append(f"{name}={replaced}" if replaced is not None else arg)
    assert value_of(container["args"], "--routing-file") == routing_file

    env = {**os.environ, "SPECKV_ADMIN_TOKEN": token.decode()}
    log = (tmp_path / "predictor.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "speckv-predictor"), *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        readiness = container["readinessProbe"]["grpc"]["service"]
        liveness = container["livenessProbe"]["grpc"]["service"]
        serving, not_serving = 1, 2  # grpc.health.v1 ServingStatus
        wait_for(lambda: health(port, readiness) != -1, 30, "the predictor to listen")
        assert health(port, readiness) == not_serving, "ready with an empty model repository"
        assert health(port, liveness) == not_serving

        # The seed Job's own script, with /models moved to the temp repository.
        seed = find(objects, "Job", "speckv-predictor-seed")["spec"]["template"]["spec"]
        script = seed["containers"][0]["args"][0].replace("/models", str(repo))
        path_env = {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
        first = subprocess.run(
            ["/bin/sh", "-c", script], env=path_env, capture_output=True, text=True, timeout=300
        )
        assert first.returncode == 0, first.stderr[-2000:]
        assert (repo / "speckv-mlp16" / "1" / "manifest.json").is_file()
        again = subprocess.run(
            ["/bin/sh", "-c", script], env=path_env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0 and "nothing to do" in again.stdout
        assert not (repo / "speckv-mlp16" / "2").exists()

        wait_for(lambda: health(port, readiness) == serving, 30, "readiness to be SERVING")
        assert health(port, liveness) == serving

        def metrics() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()

        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == value_of(container["args"], "--metrics-port")
        wait_for(
            lambda: (
                'speckv_predictor_model_ready{model="speckv-mlp16",version="1"} 1.0' in metrics()
            ),
            10,
            "the model_ready metric",
        )
        log.flush()
        wait_for(
            lambda: "applied routing file" in (tmp_path / "predictor.log").read_text(),
            10,
            "the routing file to be applied",
        )

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=pod["terminationGracePeriodSeconds"])
        assert time.monotonic() - start < pod["terminationGracePeriodSeconds"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def value_of(args: list[str], flag: str) -> str:
    return next(a.partition("=")[2] for a in args if a.startswith(flag + "="))
