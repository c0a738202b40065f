"""The fallback renderer must render deploy/ exactly as kubectl does, and refuse the rest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.deploy import kustomize_subset
from tests.deploy.manifests import DEPLOY, OVERLAYS, render


def keyed(objects: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_subset_matches_kubectl(overlay: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: nothing to compare the subset renderer with")
    real = keyed(render(DEPLOY / "overlays" / overlay, "kubectl"))
    subset = keyed(render(DEPLOY / "overlays" / overlay, "subset"))
    assert set(real) == set(subset)
    for key, obj in real.items():
        assert subset[key] == obj, f"{overlay}: {key} differs from kubectl kustomize"


def test_subset_refuses_features_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(kustomize_subset.UnsupportedKustomization, match="commonLabels"):
        kustomize_subset.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator:\n- name: x\n  literals: [a=b]\n"
    )
    with pytest.raises(kustomize_subset.UnsupportedKustomization, match="disableNameSuffixHash"):
        kustomize_subset.render(tmp_path)


def test_strategic_merge_keys_lists_by_name_and_replaces_the_rest() -> None:
    original = {
        "containers": [{"name": "a", "args": ["x"], "env": [{"name": "E", "value": "1"}]}],
        "tolerations": [{"key": "t"}],
    }
    patch = {
        "containers": [{"name": "a", "args": ["y"], "env": [{"name": "F", "value": "2"}]}],
        "tolerations": [{"key": "u"}],
    }
    merged = kustomize_subset.strategic_merge(original, patch)
    assert merged == {
        "containers": [
            {
                "name": "a",
                "args": ["y"],
                "env": [{"name": "F", "value": "2"}, {"name": "E", "value": "1"}],
            }
        ],
        "tolerations": [{"key": "u"}],
    }
