"""A small kustomize renderer for exactly the features deploy/ uses, for machines without kubectl.

The CI check prefers the real renderer (`kubectl kustomize`, or a `kustomize` binary); this
subset is the fallback, and test_kustomize_subset.py checks that it renders both overlays
exactly as `kubectl kustomize` does wherever kubectl exists. It supports: `resources` (files
and directories with a kustomization.yaml), `namespace`, `labels` (metadata only), `images`,
`patches` (strategic merge, by file or inline, no `target`), `configMapGenerator` and
`secretGenerator` (files and literals) with `generatorOptions.disableNameSuffixHash: true`.
Anything else is refused with an error rather than rendered wrongly.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "labels",
        "images",
        "patches",
        "configMapGenerator",
        "secretGenerator",
        "generatorOptions",
    }
)
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "PersistentVolume",
        "StorageClass",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "IngressClass",
        "RuntimeClass",
    }
)
# Strategic-merge keys of the lists these manifests patch (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature this subset does not implement; use kubectl."""


@dataclass(frozen=True)
class ImageRule:
    name: str
    new_name: str | None
    new_tag: str | None
    digest: str | None


def render(directory: Path) -> list[Obj]:
    """Build the kustomization in `directory`, like `kubectl kustomize directory`."""
    directory = Path(directory)
    path = next((directory / f for f in KUSTOMIZATION_FILES if (directory / f).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no kustomization.yaml in {directory}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(
            f"{path}: {sorted(unknown)} not supported by the subset renderer; "
            "render with `kubectl kustomize` instead"
        )

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(render(target))
        else:
            objects.extend(d for d in yaml.safe_load_all(target.read_text()) if d)

    options = spec.get("generatorOptions", {})
    generators = spec.get("configMapGenerator", []) + spec.get("secretGenerator", [])
    if generators and options != {"disableNameSuffixHash": True}:
        raise UnsupportedKustomization(
            f"{path}: generators need generatorOptions.disableNameSuffixHash: true here "
            "(the subset does not compute kustomize's name hashes)"
        )
    objects.extend(_config_map(directory, g) for g in spec.get("configMapGenerator", []))
    objects.extend(_secret(directory, g) for g in spec.get("secretGenerator", []))

    for patch_entry in spec.get("patches", []):
        objects = _apply_patch(directory, patch_entry, objects)
    if "namespace" in spec:
        _set_namespace(objects, spec["namespace"])
    for label_entry in spec.get("labels", []):
        if label_entry.get("includeSelectors") or label_entry.get("includeTemplates"):
            raise UnsupportedKustomization(
                f"{path}: labels with includeSelectors/includeTemplates are not supported"
            )
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label_entry["pairs"])
    rules = [
        ImageRule(i["name"], i.get("newName"), i.get("newTag"), i.get("digest"))
        for i in spec.get("images", [])
    ]
    for obj in objects:
        _set_images(obj, rules)
    return objects


def _generated_data(directory: Path, generator: Obj) -> dict[str, str]:
    unknown = set(generator) - {"name", "files", "literals", "type"}
    if unknown:
        raise UnsupportedKustomization(f"generator {generator['name']}: {sorted(unknown)}")
    data: dict[str, str] = {}
    for item in generator.get("files", []):
        key, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = (directory / file).read_text()
    for item in generator.get("literals", []):
        key, _, value = item.partition("=")
        data[key] = value
    return data


def _config_map(directory: Path, generator: Obj) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"]},
        "data": _generated_data(directory, generator),
    }


def _secret(directory: Path, generator: Obj) -> Obj:
    data = _generated_data(directory, generator)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "type": generator.get("type", "Opaque"),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _apply_patch(directory: Path, entry: Obj, objects: list[Obj]) -> list[Obj]:
    if "target" in entry or "options" in entry:
        raise UnsupportedKustomization("patches with target/options are not supported")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    if isinstance(patch, list):
        raise UnsupportedKustomization("JSON 6902 patches are not supported")
    matches = [
        i
        for i, obj in enumerate(objects)
        if obj["kind"] == patch["kind"]
        and obj["apiVersion"] == patch["apiVersion"]
        and obj["metadata"]["name"] == patch["metadata"]["name"]
    ]
    if len(matches) != 1:
        raise ValueError(
            f"patch {entry} matches {len(matches)} objects "
            f"({patch['kind']}/{patch['metadata']['name']}); it must match exactly one"
        )
    objects = list(objects)
    objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    return objects


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes' strategic merge for the lists in MERGE_KEYS; other lists are replaced.

    Items of a keyed list that are new in the patch come first, in the patch's order, then
    the original items (merged with their patch item where keys match): what kustomize does.
    """
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_key = {item[key]: item for item in patch}
        original_keys = {item[key] for item in original}
        result = [copy.deepcopy(item) for item in patch if item[key] not in original_keys]
        for item in original:
            result.append(strategic_merge(item, by_key[item[key]]) if item[key] in by_key else item)
        return result
    return copy.deepcopy(patch)


def _set_namespace(objects: list[Obj], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        elif obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj["metadata"]["namespace"] = namespace


def _split_image(image: str) -> tuple[str, str]:
    """('repo/name', ':tag' or '@sha256:...' or '')."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_images(node: Any, rules: list[ImageRule]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    _rewrite_image(container, rules)
            _set_images(value, rules)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, rules)


def _rewrite_image(container: Obj, rules: list[ImageRule]) -> None:
    if "image" not in container:
        return
    name, suffix = _split_image(container["image"])
    for rule in rules:
        if rule.name != name:
            continue
        if rule.digest:
            suffix = "@" + rule.digest
        elif rule.new_tag:
            suffix = ":" + rule.new_tag
        container["image"] = (rule.new_name or name) + suffix
        return
