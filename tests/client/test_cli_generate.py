"""`speckv generate` and DecoderClient against a real worker (tiny pair) and a real predictor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from speckv_client.cli import ExitCode
from speckv_client.decoder import DecoderClient
from speckv_client.types import DecisionSource, GenerationSummary, TokenChunk

from tests.client.servers import PredictorProcess, WorkerProcess

MODEL = "speckv-mlp16"
PROMPT = "Return the value of"
SUMMARY = re.compile(
    r"^(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s, [\d.]+ tokens/step, mean gamma [\d.]+, "
    r"acceptance [\d.]+, decisions remote (\d+) / fallback (\d+) / local (\d+), finish \w+"
)


@pytest.fixture
def pair_root(tiny_pair_dir: Path) -> Path:
    """The tiny test pair (tests/conftest.py: built once, cached)."""
    return tiny_pair_dir


@pytest.fixture
def worker(pair_root: Path, model_repo: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    predictor = PredictorProcess(model_repo, tmp_path / "predictor.log")
    try:
        w = WorkerProcess(
            pair_root,
            predictor.address,
            tmp_path / "worker.log",
            "--predictor-model",
            MODEL,
            "--max-new-tokens-limit",
            "256",
        )
        try:
            yield w
        finally:
            w.stop()
    finally:
        predictor.kill()


def speckv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speckv_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_generate_streams_text_and_summary(worker: WorkerProcess) -> None:
    w = ("--worker", worker.address)
    out = speckv("generate", *w, PROMPT, "--max-new-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) > 1  # the text (the tiny pair may well emit whitespace), then "\n"
    m = SUMMARY.match(out.stderr.strip().splitlines()[-1])
    assert m, out.stderr
    tokens, remote, fallback, local = map(int, m.groups())
    assert 0 < tokens <= 24
    assert remote > 0 and local == 0, out.stderr
    assert remote + fallback >= 1

    js = speckv("generate", *w, PROMPT, "--max-new-tokens", "24", "--json")
    assert js.returncode == 0, js.stderr
    events = [json.loads(line) for line in js.stdout.splitlines()]
    assert events[-1]["event"] == "summary"
    chunks = [e for e in events if e["event"] == "chunk"]
    assert chunks and all(e["step"]["gamma"] >= 0 for e in chunks)
    assert "".join(e["text"] for e in chunks) == events[-1]["text"]
    # Greedy is deterministic: the same text as the streamed run.
    assert out.stdout == events[-1]["text"] + "\n"

    fixed = speckv("generate", *w, PROMPT, "--max-new-tokens", "24", "--policy", "fixed:4")
    assert fixed.returncode == 0, fixed.stderr
    m = SUMMARY.match(fixed.stderr.strip().splitlines()[-1])
    assert m and int(m.group(2)) == 0 and int(m.group(4)) > 0, fixed.stderr
    assert fixed.stdout == out.stdout  # lossless: the policy changes speed, not text


@pytest.mark.slow
def test_generate_errors_and_cancellation(worker: WorkerProcess) -> None:
    w = ("--worker", worker.address)
    too_many = speckv("generate", *w, "hi", "--max-new-tokens", "100000")
    assert too_many.returncode == ExitCode.REFUSED, too_many.stderr
    assert "max_new_tokens" in too_many.stderr and "Traceback" not in too_many.stderr
    bogus = speckv("generate", *w, "hi", "--policy", "bogus")
    assert bogus.returncode == ExitCode.REFUSED, bogus.stderr
    assert "bogus" in bogus.stderr

    with DecoderClient(worker.address) as dc:
        info = dc.info()
        assert info.max_new_tokens_limit == 256
        events = dc.generate("class A:", max_new_tokens=200)
        first = next(events)
        assert isinstance(first, TokenChunk) and first.step is not None
        assert first.step.source in (DecisionSource.REMOTE, DecisionSource.FALLBACK)
        events.close()  # cancels the RPC; the worker stops that generation
        text, summary = dc.generate_text("class A:", max_new_tokens=8)
        assert isinstance(summary, GenerationSummary)
        assert summary.new_tokens <= 8 and text == summary.text
