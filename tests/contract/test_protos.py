"""The committed stubs are exactly what grpc_tools generates from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
V1 = PROTO_DIR / "speckv" / "v1"


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    protos = sorted(V1.glob("*.proto"))
    assert protos, "no .proto files found"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *[str(p) for p in protos],
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "speckv" / "v1").iterdir())
    committed = sorted(
        p.relative_to(PROTO_DIR)
        for p in V1.iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )
    assert generated == committed, "stub files differ from the .proto set: run `make protos`"
    stale = [
        str(rel)
        for rel in generated
        if (tmp_path / rel).read_bytes() != (PROTO_DIR / rel).read_bytes()
    ]
    assert not stale, f"committed stubs are stale, run `make protos`: {stale}"


def test_stubs_import_as_speckv_v1() -> None:
    from speckv.v1 import decoder_pb2_grpc, predictor_pb2, predictor_pb2_grpc

    assert predictor_pb2.DESCRIPTOR.package == "speckv.v1"
    assert hasattr(predictor_pb2_grpc, "PredictorServiceStub")
    assert hasattr(decoder_pb2_grpc, "DecoderServiceStub")


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    """`buf ARGS` through npx in the repository; skips when buf cannot be fetched."""
    try:
        proc = subprocess.run(
            ["npx", "-y", "@bufbuild/buf", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("buf could not be fetched from the npm registry in time")
    if proc.returncode != 0 and "npm ERR" in proc.stderr:
        pytest.skip(f"buf could not be installed from the npm registry: {proc.stderr[-300:]}")
    return proc


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed")
def test_buf_lint_passes() -> None:
    proc = _buf("lint", "protos")
    assert proc.returncode == 0, f"buf lint failed:\n{proc.stdout}\n{proc.stderr}"


# The contract as first released (issues 2–6 landed at this commit); every later change
# must be backward compatible with it: new optional fields and enum values only.
RELEASE_REF = "9bec699"


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed")
def test_buf_breaking_against_release(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no released contract to compare with")
    have = subprocess.run(
        ["git", "cat-file", "-e", f"{RELEASE_REF}^{{commit}}"], cwd=REPO, capture_output=True
    )
    if have.returncode != 0:
        pytest.skip(f"release commit {RELEASE_REF} is not in this clone (shallow?)")
    archive = subprocess.run(
        ["git", "archive", RELEASE_REF, "protos"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    proc = _buf("breaking", "protos", "--against", str(tmp_path / "protos"))
    assert proc.returncode == 0, f"buf breaking against {RELEASE_REF} failed:\n{proc.stdout}"
