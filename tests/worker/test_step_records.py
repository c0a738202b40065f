"""Production step recording (`speckv-worker serve --record-steps DIR`, issue 10): rotation,
the size and file caps, crash safety (kill -9 mid-write), a full disk, SIGTERM, and
`speckv-predictor train --data DIR` on what a real worker wrote."""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from speckv.v1 import decoder_pb2, decoder_pb2_grpc
from speckv_client.types import DecisionSource, DraftSignals

from decode_worker.config import EngineConfig, RecordConfig, WorkerConfig
from decode_worker.engine import SpeculativeEngine, StepResult
from decode_worker.metrics import WorkerMetrics
from decode_worker.policies import FixedPolicy, GammaDecision
from decode_worker.records import (
    COLUMNS,
    OTHER_HOST_STALE_S,
    TEMP_NAME,
    RotatingStepRecorder,
    StepRecord,
    complete_record_files,
)
from decode_worker.server import WorkerServer
from predictor_service.dataset import read_step_records, window_data
from tests.worker.engine_helpers import prompts, random_pair, target_greedy

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
WORKER = str(Path(sys.executable).with_name("speckv-worker"))
FINAL = re.compile(r"^steps-\d{8}T\d{6}Z-\d+-\d{6,}\.csv$")


def signals(x: float) -> DraftSignals:
    return DraftSignals(
        mean_draft_entropy=x,
        mean_draft_confidence=0.5,
        max_draft_entropy=x + 1,
        min_draft_confidence=0.25,
    )


def record(
    seq: str, step: int, gamma: int = 2, accepted: int = 1, prev: DraftSignals | None = None
) -> StepRecord:
    """A step record as the engine builds it (a real StepResult, hand-set numbers)."""
    result = StepResult(
        step=step,
        gamma=gamma,
        accepted=accepted,
        token_ids=tuple(range(accepted + 1)),
        text="",
        decision=GammaDecision(gamma, DecisionSource.LOCAL),
        signals=signals(float(step)) if gamma else None,
        token_signals=(),
        drafted=gamma,
        draft_seconds=0.001,
        verify_seconds=0.002,
        draft_tokens_processed=gamma,
        target_tokens_processed=gamma + 1,
        draft_cache_len=10 + step,
        target_cache_len=10 + step,
    )
    return StepRecord(seq, "live", "fp16", result, prev, 0.0, 0.5)


def rows_of(path: Path) -> list[list[str]]:
    """Every row of a record file; fails unless the file is whole (header, full rows)."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == COLUMNS, path
    assert all(len(r) == len(COLUMNS) for r in rows[1:]), path
    return rows[1:]


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_rotation_keeps_every_file_under_the_size_cap_and_every_record(tmp_path: Path) -> None:
    rec = RotatingStepRecorder(RecordConfig(str(tmp_path), max_bytes=4096, max_seconds=3600))
    for i in range(200):
        rec.write(record(f"s{i // 20}", i % 20))
    assert hidden(tmp_path) != []  # the open file is a hidden temp until it is closed
    rec.close()
    files = complete_record_files(tmp_path)
    assert len(files) >= 5 and all(FINAL.match(f.name) for f in files)
    assert set(tmp_path.iterdir()) == set(files) and hidden(tmp_path) == []
    assert all(f.stat().st_size <= 4096 for f in files)
    rows = [r for f in files for r in rows_of(f)]
    assert [(r[11], int(r[3])) for r in rows] == [(f"s{i // 20}", i % 20) for i in range(200)]
    assert rec.written == 200 and rec.dropped == 0 and rec.files_completed == len(files)
    # The trainer reads the directory as one data set; runs span files by sequence id.
    data = read_step_records(tmp_path)
    assert data.rows == 200 and data.n_runs == 10 and len(data.files) == len(files)


def test_max_files_keeps_the_newest_complete_files(tmp_path: Path) -> None:
    rec = RotatingStepRecorder(
        RecordConfig(str(tmp_path), max_bytes=4096, max_seconds=3600, max_files=3)
    )
    for i in range(300):
        rec.write(record("s", i))
    rec.close()
    files = complete_record_files(tmp_path)
    assert len(files) == 3 and set(tmp_path.iterdir()) == set(files)
    steps = [int(r[3]) for f in files for r in rows_of(f)]
    assert steps[-1] == 299 and steps == list(range(steps[0], 300)) and steps[0] > 0
    assert rec.files_deleted == rec.files_completed - 3 > 0


def test_an_idle_file_becomes_readable_after_max_seconds(tmp_path: Path) -> None:
    rec = RotatingStepRecorder(RecordConfig(str(tmp_path), max_seconds=0.3))
    try:
        rec.write(record("s", 0))
        deadline = time.monotonic() + 10
        while not complete_record_files(tmp_path):
            assert time.monotonic() < deadline, "the timer never closed the idle file"
            time.sleep(0.05)
        (f,) = complete_record_files(tmp_path)
        assert len(rows_of(f)) == 1 and hidden(tmp_path) == []
        rec.write(record("s", 1))  # the next record starts a new file
        assert len(hidden(tmp_path)) == 1
    finally:
        rec.close()
    assert len(complete_record_files(tmp_path)) == 2


def test_previous_step_features_are_the_signals_the_worker_sent(tmp_path: Path) -> None:
    """A γ = 0 step drafts nothing: the next step's previous_step features are the latest
    drafted step's signals (what RemoteSequencePolicy sends), not a join on step - 1."""
    a, c = signals(0.0), signals(2.0)
    rec = RotatingStepRecorder(RecordConfig(str(tmp_path)))
    for r in (
        record("q", 0, gamma=2, accepted=2),
        record("q", 1, gamma=0, accepted=0, prev=a),
        record("q", 2, gamma=4, accepted=1, prev=a),
        record("q", 3, gamma=2, accepted=0, prev=c),
    ):
        rec.write(r)
    rec.close()
    (f,) = complete_record_files(tmp_path)
    gamma0 = rows_of(f)[1]
    assert gamma0[1] == "0" and gamma0[5] == "" and gamma0[7:11] == ["", "", "", ""]
    data = read_step_records(tmp_path)
    assert data.skipped_undrafted == 1 and data.rows == 3
    prev = window_data(data, "previous_step")
    assert data.step[prev.record_index].tolist() == [2, 3]
    assert prev.x.tolist() == [[0.0, 0.5, 1.0, 0.25, 0, 4], [2.0, 0.5, 3.0, 0.25, 0, 2]]
    assert prev.y.tolist() == [0.25, 0.0]


def test_full_disk_drops_and_counts_records_and_generation_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every write fails with ENOSPC (/dev/full stands in for the record file)."""
    torch.set_num_threads(1)
    metrics = WorkerMetrics()
    rec = RotatingStepRecorder(
        RecordConfig(str(tmp_path)), opener=lambda path: os.open("/dev/full", os.O_WRONLY)
    )
    metrics.read_records_dropped(lambda: rec.dropped)
    metrics.finish_wiring()
    pair = random_pair(seed=0)
    engine = SpeculativeEngine(pair, EngineConfig(), recorder=rec)
    caplog.set_level(logging.WARNING, logger="decode_worker.records")
    prompt = prompts(1)[0]
    result = engine.generate(prompt, FixedPolicy(3), max_new_tokens=24)
    assert list(result.token_ids) == target_greedy(pair.target, prompt, 24)
    assert rec.dropped == result.stats.num_steps > 1 and rec.written == 0
    assert metrics.value("speckv_worker_records_dropped_total") == result.stats.num_steps
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "No space left" in drops[0].getMessage()  # once a minute
    rec.close()
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_cannot_be_made_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"--record-steps .*file/records: cannot create"):
        RotatingStepRecorder(RecordConfig(str(tmp_path / "file" / "records")))


def test_a_vanished_directory_drops_the_open_files_records(tmp_path: Path) -> None:
    d = tmp_path / "records"
    rec = RotatingStepRecorder(RecordConfig(str(d)))
    for i in range(5):
        rec.write(record("s", i))
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    rec.close()  # the link to the final name fails: counted, never raised
    assert rec.dropped == 5 and rec.written == 0 and rec.files_completed == 0


# Writes records in a loop (a real recorder in a real process) until it is killed.
_WRITER = textwrap.dedent(
    """
    import sys, time
    from decode_worker.config import RecordConfig
    from decode_worker.records import RotatingStepRecorder
    from tests.worker.test_step_records import record
    rec = RotatingStepRecorder(
        RecordConfig(sys.argv[1], max_bytes=8192, max_seconds=3600, max_files=1000000)
    )
    i = 0
    while True:
        rec.write(record(f"s{i // 25}", i % 25))
        i += 1
        time.sleep(0.0002)
    """
)


def test_kill_9_mid_write_leaves_only_complete_files(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while len(complete_record_files(tmp_path)) < 3:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the writer made no files"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    temps = hidden(tmp_path)
    assert temps and all(TEMP_NAME.match(t) for t in temps)  # killed with a file open
    files = complete_record_files(tmp_path)
    rows = [r for f in files for r in rows_of(f)]  # every visible file parses fully
    assert all(f.stat().st_size <= 8192 for f in files)
    ids = [int(r[11][1:]) * 25 + int(r[3]) for r in rows]
    assert ids == list(range(len(ids)))  # complete files hold consecutive records
    assert read_step_records(tmp_path).rows == len(rows)  # the trainer ignores the temp
    # A worker starting on the directory removes the dead process's temp file.
    rec = RotatingStepRecorder(RecordConfig(str(tmp_path)))
    rec.close()
    assert rec.stale_removed == len(temps) and hidden(tmp_path) == []


def test_other_hosts_temp_files_are_removed_only_when_long_untouched(tmp_path: Path) -> None:
    """A directory shared by several pods: another pod's open file is never touched; one its
    pod left behind (untouched longer than any writer keeps a file open) is removed."""
    live = tmp_path / ".steps-other_pod-1-3.csv.tmp"
    gone = tmp_path / ".steps-gone_pod-1-7.csv.tmp"
    for p in (live, gone):
        p.write_text(",".join(COLUMNS) + "\n")
    old = time.time() - OTHER_HOST_STALE_S - 60
    os.utime(gone, (old, old))
    rec = RotatingStepRecorder(RecordConfig(str(tmp_path)))
    rec.close()
    assert rec.stale_removed == 1 and hidden(tmp_path) == [live.name]


# A real file that stops growing: RLIMIT_FSIZE makes the write crossing the limit short and
# later ones fail (EFBIG), as a disk that fills up mid-file does.
_FILLS_UP = textwrap.dedent(
    """
    import json, resource, signal, sys
    from decode_worker.config import RecordConfig
    from decode_worker.records import RotatingStepRecorder
    from tests.worker.test_step_records import record
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
    rec = RotatingStepRecorder(RecordConfig(sys.argv[1]))
    for i in range(50):
        rec.write(record("s", i))
    rec.close()
    print(json.dumps({"written": rec.written, "dropped": rec.dropped}))
    """
)


def test_a_disk_filling_up_mid_file_keeps_the_file_whole(tmp_path: Path) -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _FILLS_UP, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    (f,) = complete_record_files(tmp_path)
    rows = rows_of(f)  # the partly written row was cut off again
    assert len(rows) == counts["written"] > 0
    assert counts["dropped"] == 50 - counts["written"] > 0
    assert [int(r[3]) for r in rows] == list(range(len(rows)))


# --- a real worker ---

NEW = 20


@pytest.fixture
def worker_records(loaded_pair, tmp_path: Path) -> Iterator[tuple[WorkerServer, Path]]:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    d = tmp_path / "records"
    config = WorkerConfig(
        draft="tiny-draft",
        target="tiny-target",
        policy="heuristic",
        warmup=False,
        record=RecordConfig(str(d), max_bytes=8192),
        engine=EngineConfig(default_max_new_tokens=NEW, max_new_tokens_limit=64),
    )
    server = WorkerServer(config, loaded_pair("fp16")).start()
    yield server, d
    server.stop(0.5)


def _generate(address: str, **kw: object) -> decoder_pb2.GenerationSummary:
    with grpc.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        events = list(stub.Generate(decoder_pb2.GenerateRequest(**kw), timeout=120))
    assert events[-1].HasField("summary")
    return events[-1].summary


PROMPTS = [
    "def add(a, b):",
    "import os\n\n",
    "class Node:",
    "for i in range(",
    "return self.",
    "if x is None:",
]


def test_a_model_trains_on_the_records_a_real_worker_wrote(
    worker_records: tuple[WorkerServer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from predictor_service.cli import main as predictor_main

    server, d = worker_records
    summaries = {}
    for i, prompt in enumerate(PROMPTS):
        policy = ("heuristic", "fixed:3", "fixed:0")[i % 3]
        summaries[f"r{i}"] = _generate(
            server.address, prompt=prompt, policy=policy, request_id=f"r{i}"
        )
    server.stop(0.5)  # publishes the open file
    files = complete_record_files(d)
    assert len(files) >= 2 and hidden(d) == []
    rows = [r for f in files for r in rows_of(f)]
    for rid, s in summaries.items():  # every step of every sequence, γ = 0 included
        mine = [r for r in rows if r[11] == rid]
        assert [int(r[3]) for r in mine] == list(range(s.steps))
        assert sum(int(r[6]) for r in mine) == s.new_tokens
        assert sum(int(r[1]) for r in mine) == round(s.mean_gamma * s.steps)
    assert {r[1] for r in rows if r[11] in ("r2", "r5")} == {"0"}  # the fixed:0 requests
    assert {r[21] for r in rows} == {"local"}
    drafted = sum(1 for r in rows if r[1] != "0")
    repo = tmp_path / "repo"
    args = ["train", "--data", str(d), "--repo", str(repo), "--name", "own"]
    code = predictor_main([*args, "--window", "previous_step", "--skip-heldout-runs", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = (repo / "own" / "1" / "manifest.json").read_text()
    assert f'"path": "{d}"' in manifest and f'"rows": {drafted}' in manifest

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".steps-host-1-1.csv.tmp").write_text("being written")
    capsys.readouterr()
    assert predictor_main([*args[:2], str(empty), *args[3:], "--window", "same_step"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no step-record files" in err


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [WORKER, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_serve_records_every_step_and_sigterm_publishes_the_file(
    tiny_pair_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "records"
    proc = _serve(
        "--draft", str(tiny_pair_dir / "draft"), "--target", str(tiny_pair_dir / "target"),
        "--device", "cpu", "--policy", "fixed:2", "--port", "0", "--threads", "1",
        "--no-warmup", "--record-steps", str(d), "--record-max-seconds", "3600",
        "--metrics-port", "0",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while len(lines) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith(("listening on", "metrics on")):
                lines.append(line.split()[-1])
        assert len(lines) == 2, proc.stderr.read() if proc.stderr else ""
        address, metrics_url = lines
        a = _generate(address, prompt="def add(a, b):", max_new_tokens=12)
        b = _generate(address, prompt="import os", max_new_tokens=6, policy="fixed:0")
        assert complete_record_files(d) == [] and len(hidden(d)) == 1  # still being written
        scraped = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert f"speckv_worker_steps_total {float(a.steps + b.steps)}" in scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (f,) = complete_record_files(d)
    rows = rows_of(f)
    assert hidden(d) == [] and len(rows) == a.steps + b.steps
    assert [r[1] for r in rows[a.steps :]] == ["0"] * b.steps
    assert sum(int(r[6]) for r in rows) == a.new_tokens + b.new_tokens == 18
