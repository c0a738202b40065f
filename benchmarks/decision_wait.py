"""How long the decode loop waits for the predictor: previous_step (pipelined) vs prefix.

    .venv/bin/python benchmarks/decision_wait.py [--prompts 8] [--new-tokens 48] [--json out.json]

The real engine on the tiny test pair (fp16, CPU), the real predictor server in its own
process (`speckv-predictor serve`, so the two do not share a GIL) over a freshly trained
repository, and the real client stream. For every step the engine records
`decision_wait_seconds` (time the loop blocked on the answer) and the step's draft and
verify time. In the `previous_step` window the request goes out when drafting ends and the
answer is read after verification, so the wait should be close to zero; in the `prefix`
window it is one round trip per step.

Asserted bound (exit 1 when broken): in the previous_step window the median wait over
remote-decided steps is under 0.5 ms and the mean wait is under 5% of the mean step time
(draft + verify), and at least 90% of the steps after the first were decided remotely.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from speckv_eval.services import start_predictor

REPO = Path(__file__).resolve().parents[1]
SEED_CSV = REPO / "predictor_service" / "data" / "speckv-paper" / "phase2_step_results.csv"
PROMPTS = REPO / "benchmarks" / "prompts" / "prompts.jsonl"
PAIR_CACHE = REPO / ".cache" / "tiny-pair" / "test-seed0"

MEDIAN_WAIT_BOUND_S = 0.5e-3
MEAN_WAIT_SHARE_BOUND = 0.05
REMOTE_SHARE_BOUND = 0.9


def _train_repo(root: Path) -> None:
    from predictor_service.training import TrainConfig, train_and_register

    for name, window in (
        ("speckv-mlp16", "previous_step"),
        ("speckv-mlp16-same-step", "same_step"),
    ):
        train_and_register(
            TrainConfig(
                repo=root,
                name=name,
                window=window,
                data=SEED_CSV,
                version=1,
                seed=42,
                heldout_runs=False,
                progress=False,
            )
        )


def _run_window(
    engine: Any, stream: Any, window: str, prompts: list[str], new: int
) -> dict[str, Any]:
    from speckv_client.types import ModelSelector, Objective, Window
    from tqdm import tqdm

    from decode_worker.config import RemotePolicyConfig
    from decode_worker.policies import DecisionSource
    from decode_worker.remote_policy import RemotePolicy

    config = RemotePolicyConfig(
        window=Window(window),
        objective=Objective.GOODPUT,
        decision_timeout_s=0.010,
        model=ModelSelector(name="speckv-mlp16-same-step") if window == "prefix" else None,
    )
    policy = RemotePolicy(stream, config, engine.timing)
    waits, step_times, sources = [], [], []
    for prompt in tqdm(prompts, desc=window, leave=False):
        result = engine.generate(engine.encode(prompt), policy, max_new_tokens=new)
        for s in result.steps[1:] if window == "previous_step" else result.steps:
            sources.append(s.decision.source)
            step_times.append(s.draft_seconds + s.verify_seconds)
            if s.decision.source == DecisionSource.REMOTE:
                waits.append(s.decision.wait_seconds)
    w = np.asarray(waits) if waits else np.zeros(1)
    return {
        "window": window,
        "steps": len(sources),
        "remote_share": sum(x == DecisionSource.REMOTE for x in sources) / max(len(sources), 1),
        "wait_ms_median": float(np.median(w) * 1e3),
        "wait_ms_p99": float(np.quantile(w, 0.99) * 1e3),
        "wait_ms_mean": float(w.mean() * 1e3),
        "step_ms_mean": float(np.mean(step_times) * 1e3),
        "wait_share_of_step": float(w.mean() / np.mean(step_times)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)

    import torch
    from speckv_client.predictor import PredictorClient
    from speckv_tinypair.builder import TinyPairConfig, ensure_tiny_pair

    from decode_worker.config import EngineConfig
    from decode_worker.engine import SpeculativeEngine
    from decode_worker.pair import PairConfig, load_pair

    torch.set_num_threads(args.threads)
    pair_root = ensure_tiny_pair(TinyPairConfig(out=PAIR_CACHE, size="test", seed=0)).root
    pair = load_pair(
        PairConfig(draft=str(pair_root / "draft"), target=str(pair_root / "target"), device="cpu")
    )
    engine = SpeculativeEngine(pair, EngineConfig())
    engine.warmup()
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line]
    prompts = prompts[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _train_repo(repo)
        proc = start_predictor(repo, default_model="speckv-mlp16")
        client = PredictorClient(proc.address)
        stream = client.decision_stream()
        try:
            deadline = time.monotonic() + 15
            while not stream.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            reports = [
                _run_window(engine, stream, w, prompts, args.new_tokens)
                for w in ("previous_step", "prefix")
            ]
        finally:
            stream.close()
            client.close()
            proc.stop()
    prev = reports[0]
    checks = {
        f"previous_step median wait < {MEDIAN_WAIT_BOUND_S * 1e3} ms": prev["wait_ms_median"]
        < MEDIAN_WAIT_BOUND_S * 1e3,
        f"previous_step mean wait < {MEAN_WAIT_SHARE_BOUND:.0%} of a step": prev[
            "wait_share_of_step"
        ]
        < MEAN_WAIT_SHARE_BOUND,
        f"previous_step remote share ≥ {REMOTE_SHARE_BOUND:.0%}": prev["remote_share"]
        >= REMOTE_SHARE_BOUND,
    }
    report = {
        "pair": str(pair_root),
        "torch_threads": args.threads,
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "windows": reports,
        "checks": checks,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
