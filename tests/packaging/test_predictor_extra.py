"""A predictor-only install works and does not pull in torch (the predictor image stays small).

Builds a fresh virtual environment and installs `.[predictor]` from this checkout
(non-editable, through pip's normal resolver), so it needs the package index; about a
minute with a warm pip cache.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_predictor_extra_imports_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python")

    install = _run(
        [py, "-m", "pip", "install", "--quiet", f"{REPO}[predictor]"],
        timeout=1000,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"

    check = _run(
        [
            py,
            "-c",
            "import importlib.util, predictor_service, predictor_service.manifest, "
            "onnxruntime, speckv.v1.predictor_pb2_grpc;"
            "print(predictor_service.__file__);"
            "print('torch' if importlib.util.find_spec('torch') else 'no-torch');"
            "print('sklearn' if importlib.util.find_spec('sklearn') else 'no-sklearn')",
        ],
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    file_line, torch_line, sklearn_line = check.stdout.split()
    # The installed copy, not this checkout, was imported.
    assert str(env_dir) in file_line
    assert torch_line == "no-torch"
    assert sklearn_line == "no-sklearn"
    assert _run([py, "-m", "pip", "show", "torch"], timeout=120).returncode != 0

    # The command line builds without the train extra (training imports sklearn lazily).
    cli = str(Path(py).parent / "speckv-predictor")
    for sub in ("train", "serve"):
        helped = _run([cli, sub, "--help"], timeout=120)
        assert helped.returncode == 0, helped.stderr
