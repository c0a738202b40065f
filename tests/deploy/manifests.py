"""Render deploy/ overlays and validate them against a pinned Kubernetes schema.

The renderer is the real one when the machine has it (`kubectl kustomize`, else a
`kustomize` binary); otherwise the subset in kustomize_subset.py, which the tests check
against kubectl wherever both exist. SPECKV_KUSTOMIZE=kubectl|kustomize|subset forces one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.deploy import kustomize_subset

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev-cpu", "gpu")
# The oldest Kubernetes minor these manifests promise to work on (native gRPC probes are GA
# since 1.27, autoscaling/v2 since 1.23); kubernetes-validate ships its schema offline.
KUBERNETES_VERSION = "1.30.0"


def renderer() -> str:
    """Which renderer render() uses here: 'kubectl', 'kustomize' or 'subset'."""
    forced = os.environ.get("SPECKV_KUSTOMIZE", "")
    if forced:
        if forced not in ("kubectl", "kustomize", "subset"):
            raise ValueError(f"SPECKV_KUSTOMIZE={forced!r}; use kubectl, kustomize or subset")
        return forced
    for tool in ("kubectl", "kustomize"):
        if shutil.which(tool):
            return tool
    return "subset"


def render(directory: Path, using: str | None = None) -> list[dict[str, Any]]:
    using = using or renderer()
    if using == "subset":
        return kustomize_subset.render(directory)
    command = (
        [using, "kustomize", str(directory)]
        if using == "kubectl"
        else [using, "build", str(directory)]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validation_errors(
    objects: list[dict[str, Any]], version: str = KUBERNETES_VERSION
) -> list[str]:
    """One line per invalid object (strict: unknown fields are errors too)."""
    errors = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    return errors


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]
