"""Registration is immutable and atomic, bad data is named precisely, and the CLI reports JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from predictor_service import training
from predictor_service.dataset import DataError
from predictor_service.training import TrainConfig, VersionExistsError, train_and_register


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _train_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "predictor_service.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_existing_version_is_refused_and_left_untouched(model_repo: Path, seed_csv: Path) -> None:
    before = _tree(model_repo)
    with pytest.raises(VersionExistsError, match=r"speckv-mlp16/1 exists already.*--version 3"):
        train_and_register(
            TrainConfig(
                repo=model_repo,
                name="speckv-mlp16",
                window="previous_step",
                data=seed_csv,
                version=1,
                progress=False,
            )
        )
    assert _tree(model_repo) == before


def test_default_version_is_the_next_free_one(model_repo: Path, seed_csv: Path) -> None:
    result = train_and_register(
        TrainConfig(
            repo=model_repo,
            name="speckv-mlp16",
            window="previous_step",
            data=seed_csv,
            heldout_runs=False,
            progress=False,
        )
    )
    assert result.version == 3
    assert result.heldout_runs_mse is None
    assert sorted(p.name for p in (model_repo / "speckv-mlp16").iterdir()) == ["1", "2", "3"]


HEADER = (
    "compression,gamma,task,step,accepted,acceptance_rate,tokens_produced,"
    "mean_draft_entropy,mean_draft_confidence,max_draft_entropy,min_draft_confidence"
)
GOOD = "fp16,2,code,{step},0,0.5,1,2.0,0.6,2.9,0.4"


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "steps.csv"
    p.write_text(text)
    return p


def _good_lines(n: int = 4) -> list[str]:
    return [GOOD.format(step=i) for i in range(n)]


@pytest.mark.parametrize(
    ("make", "column", "line"),
    [
        # line numbers are 1-based CSV lines; line 1 is the header
        (lambda: "", None, None),
        (lambda: HEADER + "\n", None, None),
        (
            lambda: (
                HEADER.replace(",min_draft_confidence", "")
                + "\n"
                + "\n".join(s.rsplit(",", 1)[0] for s in _good_lines())
            ),
            "min_draft_confidence",
            1,
        ),
        (
            lambda: "\n".join(
                [
                    HEADER,
                    *_good_lines(2),
                    "fp16,2,code,2,0,0.5,1,nan,0.6,2.9,0.4",
                    GOOD.format(step=3),
                ]
            ),
            "mean_draft_entropy",
            4,
        ),
        (
            lambda: "\n".join([HEADER, *_good_lines(1), "fp32,2,code,1,0,0.5,1,2.0,0.6,2.9,0.4"]),
            "compression",
            3,
        ),
        (
            lambda: "\n".join([HEADER, *_good_lines(4), "fp16,two,code,0,0,0.5,1,2.0,0.6,2.9,0.4"]),
            "gamma",
            6,
        ),
        (
            lambda: "\n".join([HEADER, *_good_lines(2), "fp16,2,code,2,0,,1,2.0,0.6,2.9,0.4"]),
            "acceptance_rate",
            4,
        ),
        (
            lambda: "\n".join([HEADER, *_good_lines(2), "fp16,2,code,5,0,0.5,1,2.0,0.6,2.9,0.4"]),
            "step",
            4,
        ),
    ],
    ids=[
        "empty",
        "header-only",
        "missing-column",
        "nan",
        "unknown-compression",
        "non-numeric",
        "empty-cell",
        "step-gap",
    ],
)
def test_bad_data_names_column_and_line_and_writes_nothing(
    tmp_path: Path, make: object, column: str | None, line: int | None
) -> None:
    assert callable(make)
    data = _csv(tmp_path, make())
    repo = tmp_path / "repo"
    with pytest.raises(DataError) as err:
        train_and_register(
            TrainConfig(repo=repo, name="m", window="same_step", data=data, progress=False)
        )
    msg = str(err.value)
    assert str(data) in msg
    if column is not None:
        assert repr(column) in msg and f"line {line}" in msg, msg
    else:
        assert "empty" in msg or "no data rows" in msg, msg
    assert not repo.exists()


def test_failure_while_publishing_leaves_no_folder(
    model_repo: Path, seed_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after model.onnx and weights.npz are written must not leave any folder."""

    def disk_full(self: object, folder: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.Manifest, "write", disk_full)
    before = sorted(p.name for p in (model_repo / "speckv-mlp16").iterdir())
    with pytest.raises(OSError, match="No space left"):
        train_and_register(
            TrainConfig(
                repo=model_repo,
                name="speckv-mlp16",
                window="previous_step",
                data=seed_csv,
                heldout_runs=False,
                progress=False,
            )
        )
    assert sorted(p.name for p in (model_repo / "speckv-mlp16").iterdir()) == before


def test_onnx_disagreement_is_fatal(
    tmp_path: Path, seed_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "MAX_ONNX_ABS_DIFF", 0.0)
    with pytest.raises(training.TrainError, match="ONNX export differs"):
        train_and_register(
            TrainConfig(
                repo=tmp_path,
                name="m",
                window="same_step",
                data=seed_csv,
                heldout_runs=False,
                progress=False,
            )
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_prints_one_json_line_last(tmp_path: Path, seed_csv: Path) -> None:
    proc = _train_cli(
        "--data",
        str(seed_csv),
        "--repo",
        str(tmp_path),
        "--name",
        "cli",
        "--window",
        "same_step",
        "--skip-heldout-runs",
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert set(out) == {
        "name",
        "version",
        "window",
        "test_mse",
        "test_corr",
        "heldout_runs_mse",
        "heldout_runs_corr",
        "onnx_max_abs_diff",
    }
    assert (out["name"], out["version"], out["window"]) == ("cli", 1, "same_step")
    assert out["test_mse"] == pytest.approx(0.0896, abs=0.0005)
    assert out["test_corr"] == pytest.approx(0.6853, abs=0.0005)
    assert out["onnx_max_abs_diff"] <= 1e-5
    assert "refit on all" in proc.stderr  # progress goes to stderr

    again = _train_cli(
        "--repo", str(tmp_path), "--name", "cli", "--window", "same_step", "--version", "1"
    )
    assert again.returncode == 2
    assert "exists already" in again.stderr and again.stdout == ""


def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    data = _csv(
        tmp_path, "\n".join([HEADER, *_good_lines(1), "int4,2,code,1,0,0.5,1,2,0.6,2.9,0.4"])
    )
    repo = tmp_path / "repo"
    proc = _train_cli(
        "--data", str(data), "--repo", str(repo), "--name", "m", "--window", "same_step"
    )
    assert proc.returncode == 2
    assert "column 'compression', line 3" in proc.stderr
    assert proc.stdout == ""
    assert not repo.exists()
