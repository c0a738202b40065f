"""The A/B loop end to end at test size, as `make loop` runs it (benchmarks/loop.py).

Real services as subprocesses: `speckv-predictor serve`, a recording `speckv-worker serve
--record-steps`, `speckv-predictor train --data DIR`, a canary, a serving worker, `speckv ab
--json` and `speckv promote` / `speckv rollback`. The loop itself fails (exit 1) when any
generation fails or the predictor's per-arm counts differ from what the client saw streamed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOOP = REPO / "benchmarks" / "loop.py"


def _run_loop(tmp_path: Path, pair: Path, *extra: str) -> dict[str, object]:
    out = tmp_path / "loop.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            str(LOOP),
            "--cache",
            str(tmp_path / "cache"),
            "--pair",
            str(pair),
            "--threads",
            "1",
            "--train-prompts",
            "6",
            "--eval-prompts",
            "8",
            "--eval-reps",
            "2",
            "--max-new-tokens",
            "16",
            "--json-out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(300)
def test_loop_records_retrains_canaries_and_acts_on_the_verdict(
    tmp_path: Path, tiny_pair_dir: Path
) -> None:
    result = _run_loop(tmp_path, tiny_pair_dir, "--canary-weight", "50")
    assert result["failures"] == []
    assert int(str(result["records"])) > 0  # the recording worker wrote complete files
    ab = result["ab"]
    assert isinstance(ab, dict)
    arms = {a["arm"]: a for a in ab["arms"]}
    # Sticky 50/50 over 16 sequences: both arms decided something (hash split, salt fixed).
    assert set(arms) == {"stable", "canary"}
    assert arms["stable"]["version"] == 1 and arms["canary"]["version"] == 2
    assert sum(a["sequences"] for a in arms.values()) == 16
    for a in arms.values():
        assert a["steps"] > 0 and a["tokens"] >= a["steps"]
        assert a["ci_low"] <= a["tokens_per_second"] <= a["ci_high"]
    verdict = str(result["verdict"])
    action = str(result["action"])
    if verdict.startswith("v2 is faster"):
        assert action == "promoted v2"
    else:
        assert action.startswith("rolled back")
    # The routing now in force follows the action.
    routing = result["routing_after"]
    assert isinstance(routing, dict)
    if action == "promoted v2":
        assert routing["aliases"]["stable"] == 2
    else:
        assert routing["aliases"]["stable"] == 1
    assert routing["weights"] == {"stable": 100.0} or routing["weights"].get("canary", 0) == 0
