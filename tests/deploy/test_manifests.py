"""CI check of deploy/: each overlay renders, every object is valid for the pinned Kubernetes
version, and the properties the deployment relies on hold (issue 5, "Deploy")."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSION,
    OVERLAYS,
    find,
    render,
    renderer,
    validation_errors,
)

Obj = dict[str, Any]
PREDICTOR = "speckv-predictor"
WORKER = "speckv-worker"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a dict (the manifests always use the `=` form)."""
    out = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            out[name] = value
    return out


def container(obj: Obj, name: str) -> Obj:
    pod = pod_spec(obj)
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['kind']}/{obj['metadata']['name']} has no container {name}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: Obj) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_renderer_is_reported() -> None:
    # Printed with -rA / in the report: which renderer the CI check used on this machine.
    assert renderer() in ("kubectl", "kustomize", "subset")


def test_every_object_is_valid_for_the_pinned_kubernetes(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    assert objects, f"overlay {name} rendered nothing"
    errors = validation_errors(objects)
    assert not errors, f"overlay {name} invalid for Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(
        errors
    )


def test_validation_rejects_bad_objects(overlay: tuple[str, list[Obj]]) -> None:
    """The check can fail: a typo'd field, a wrong type and an unknown apiVersion are caught."""
    _, objects = overlay
    deployment = find(objects, "Deployment", PREDICTOR)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    old_api = copy.deepcopy(find(objects, "HorizontalPodAutoscaler", PREDICTOR))
    old_api["apiVersion"] = "autoscaling/v2beta1"
    for bad in (typo, wrong_type, old_api):
        assert validation_errors([bad]), f"not caught: {json.dumps(bad)[:200]}"


def test_predictor_is_replicated_disruption_safe_and_autoscaled(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", PREDICTOR)
    assert deployment["spec"]["replicas"] >= 2
    labels = pod_labels(deployment)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)

    pdb = find(objects, "PodDisruptionBudget", PREDICTOR)
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    hpa = find(objects, "HorizontalPodAutoscaler", PREDICTOR)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": PREDICTOR,
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu and cpu[0]["resource"]["name"] == "cpu"
    assert "cpu" in container(deployment, "predictor")["resources"]["requests"]


def test_predictor_probes_are_native_grpc_on_the_served_port(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    predictor = container(find(objects, "Deployment", PREDICTOR), "predictor")
    port = int(flags(predictor["args"])["--port"])
    assert {p["name"]: p["containerPort"] for p in predictor["ports"]}["grpc"] == port
    readiness, liveness = predictor["readinessProbe"], predictor["livenessProbe"]
    assert readiness["grpc"] == {"port": port, "service": "speckv.v1.PredictorService"}
    assert liveness["grpc"]["port"] == port
    startup = predictor["startupProbe"]
    assert startup["grpc"]["port"] == port
    # An empty repository is NOT_SERVING: startup must wait longer than the seed Job trains.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for probe in (readiness, liveness, startup):
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set()


def test_predictor_service_is_headless_and_workers_dial_it_round_robin(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", PREDICTOR)
    predictor = container(deployment, "predictor")
    port = int(flags(predictor["args"])["--port"])
    service = find(objects, "Service", PREDICTOR)
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == port

    worker = container(find(objects, "Deployment", WORKER), "worker")
    target = flags(worker["args"])["--predictor"]
    assert target == f"dns:///{PREDICTOR}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    namespace_env = next(e for e in worker["env"] if e["name"] == "POD_NAMESPACE")
    assert namespace_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "speckv"


def test_routing_and_model_repository_come_from_volumes_with_polling(
    overlay: tuple[str, list[Obj]], tmp_path: Path
) -> None:
    _, objects = overlay
    deployment = find(objects, "Deployment", PREDICTOR)
    predictor = container(deployment, "predictor")
    args = flags(predictor["args"])
    assert float(args["--poll-seconds"]) > 0
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in predictor["volumeMounts"]}

    repo_mount = mounts[args["--repo"]]
    claim = volumes[repo_mount["name"]]["persistentVolumeClaim"]["claimName"]
    find(objects, "PersistentVolumeClaim", claim)
    assert repo_mount.get("readOnly") is True

    routing_dir, _, routing_file = args["--routing-file"].rpartition("/")
    routing_mount = mounts[routing_dir]
    # A subPath mount never sees ConfigMap updates; the whole point is live re-routing.
    assert "subPath" not in routing_mount
    config_map = find(objects, "ConfigMap", volumes[routing_mount["name"]]["configMap"]["name"])
    routing = json.loads(config_map["data"][routing_file])
    default_model = args["--default-model"]
    assert default_model in routing
    for model, rule in routing.items():
        weights = rule["weights"]
        assert weights and sum(weights.values()) > 0, model
        aliases = rule.get("aliases", {})
        for target in weights:
            assert target in aliases or target.isdigit(), f"{model}: unknown target {target}"

    try:
        from predictor_service.router import read_routing_file
    except ImportError as exc:
        pytest.skip(f"predictor routing not importable yet: {exc}")
    routing_path = tmp_path / routing_file
    routing_path.write_text(config_map["data"][routing_file])
    assert set(read_routing_file(routing_path)) == set(routing)

    # The jobs that register versions write into the same claim.
    for kind, name in (("Job", "speckv-predictor-seed"), ("CronJob", "speckv-predictor-train")):
        job = find(objects, kind, name)
        job_volumes = pod_spec(job)["volumes"]
        assert claim in [v.get("persistentVolumeClaim", {}).get("claimName") for v in job_volumes]
    assert find(objects, "CronJob", "speckv-predictor-train")["spec"]["suspend"] is True


def test_worker_outlives_predictor_streams_and_has_probes_and_limits(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, objects = overlay
    predictor_args = flags(container(find(objects, "Deployment", PREDICTOR), "predictor")["args"])
    stream_lifetime = float(predictor_args["--max-connection-age-seconds"]) + float(
        predictor_args["--grace-seconds"]
    )
    predictor_pod = pod_spec(find(objects, "Deployment", PREDICTOR))
    assert predictor_pod["terminationGracePeriodSeconds"] > float(predictor_args["--grace-seconds"])

    deployment = find(objects, "Deployment", WORKER)
    termination_grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert termination_grace > stream_lifetime
    worker = container(deployment, "worker")
    port = int(flags(worker["args"])["--port"])
    assert float(flags(worker["args"])["--shutdown-grace-s"]) < termination_grace
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port, probe
    assert worker["readinessProbe"]["grpc"]["service"] == "speckv.v1.DecoderService"
    service = find(objects, "Service", WORKER)
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    for key in ("cpu", "memory"):
        assert key in worker["resources"]["requests"] and key in worker["resources"]["limits"]


def test_worker_metrics_are_exposed_and_scrapable(overlay: tuple[str, list[Obj]]) -> None:
    """The worker serves /metrics on --metrics-port; the pod says so to Prometheus'
    annotation-based discovery and the Service names the port for a ServiceMonitor."""
    _, objects = overlay
    deployment = find(objects, "Deployment", WORKER)
    worker = container(deployment, "worker")
    port = int(flags(worker["args"])["--metrics-port"])
    assert port != int(flags(worker["args"])["--port"])
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["metrics"] == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = find(objects, "Service", WORKER)
    metrics = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert metrics["targetPort"] in ("metrics", port)


POD_OWNERS = (
    ("Deployment", PREDICTOR),
    ("Deployment", WORKER),
    ("Job", "speckv-predictor-seed"),
    ("CronJob", "speckv-predictor-train"),
)


def test_every_pod_runs_non_root_read_only_with_limits(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    kinds_with_pods = {"Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet", "Pod"}
    owners = [o for o in objects if o["kind"] in kinds_with_pods]
    assert {(o["kind"], o["metadata"]["name"]) for o in owners} == set(POD_OWNERS)
    for owner in owners:
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        pod = pod_spec(owner)
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"]["limits"]["memory"], where
            assert c.get("imagePullPolicy") == "IfNotPresent", where


def test_images_follow_the_overlay(overlay: tuple[str, list[Obj]]) -> None:
    name, objects = overlay
    images = {
        c["name"]: c["image"]
        for kind, owner in POD_OWNERS
        for c in pod_spec(find(objects, kind, owner))["containers"]
    }
    if name == "dev-cpu":
        assert images == {
            "predictor": "speckv-predictor:dev",
            "worker": "speckv-worker:dev-cpu",
            "train": "speckv-predictor-trainer:dev",
        }
    else:
        registry = "registry.example.com/speckv/"
        assert images == {
            "predictor": registry + "speckv-predictor:0.1.0",
            "worker": registry + "speckv-worker:0.1.0",
            "train": registry + "speckv-predictor-trainer:0.1.0",
        }


def test_gpu_overlay_requests_gpus_and_runs_nf4_from_a_volume() -> None:
    objects = render(DEPLOY / "overlays" / "gpu")
    deployment = find(objects, "Deployment", WORKER)
    worker = container(deployment, "worker")
    resources = worker["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    args = flags(worker["args"])
    assert args["--compression"] == "nf4"
    assert args["--device"] == "cuda"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    for path in (args["--draft"], args["--target"]):
        mount = next(m for m in worker["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        find(objects, "PersistentVolumeClaim", claim)
        assert mount["readOnly"] is True
    tolerations = pod_spec(deployment)["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # The admin token is the operator's Secret here, never a literal in the repository.
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_dev_cpu_overlay_is_cpu_only_with_the_tiny_pair() -> None:
    objects = render(DEPLOY / "overlays" / "dev-cpu")
    assert "nvidia.com/gpu" not in json.dumps(objects)
    worker = container(find(objects, "Deployment", WORKER), "worker")
    args = flags(worker["args"])
    assert args["--device"] == "cpu"
    assert args["--draft"].startswith("/opt/speckv/tiny-pair/")
    assert args["--target"].startswith("/opt/speckv/tiny-pair/")
    secret = find(objects, "Secret", "speckv-admin-token")
    assert "token" in secret["data"]


def _parser(module: str) -> argparse.ArgumentParser:
    """The real CLI parser, so the manifests cannot drift from the flags the services take."""
    try:
        if module == "predictor":
            from predictor_service.cli import build_parser

            return build_parser()
        # Only `serve`: the worker's other subcommands need not exist for this check.
        from decode_worker import serve_cli

        parser = argparse.ArgumentParser(prog="speckv-worker")
        serve_cli.add_arguments(parser.add_subparsers(required=True).add_parser("serve"))
        return parser
    except ImportError as exc:  # the service's serve_cli not written yet
        pytest.skip(f"{module} CLI not importable yet: {exc}")


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    # The kubelet expands $(VAR) from the container's env before the process sees its args;
    # do the same (POD_NAMESPACE comes from the downward API) so the CLI checks real values.
    args = [
        re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAMESPACE": "speckv"}.get(m[1], "x"), a)
        for a in args
    ]
    try:
        return parser.parse_args(args)
    except SystemExit as exc:  # argparse printed which flag is wrong
        raise AssertionError(f"the CLI refuses these manifest args: {args}") from exc


def test_manifest_args_are_accepted_by_the_real_clis(overlay: tuple[str, list[Obj]]) -> None:
    _, objects = overlay
    predictor = container(find(objects, "Deployment", PREDICTOR), "predictor")
    _parse(_parser("predictor"), predictor["args"])
    train = container(find(objects, "CronJob", "speckv-predictor-train"), "train")
    _parse(_parser("predictor"), train["args"])
    seed = container(find(objects, "Job", "speckv-predictor-seed"), "train")
    exec_line = next(line for line in seed["args"][0].splitlines() if "exec " in line)
    _parse(_parser("predictor"), shlex.split(exec_line)[2:])
    worker = container(find(objects, "Deployment", WORKER), "worker")
    parsed = _parse(_parser("worker"), worker["args"])
    from decode_worker import serve_cli

    config = serve_cli.build_config(parsed)  # the worker's own validation, no model loaded
    assert config.policy == "remote" and config.predictor.startswith("dns:///")
