"""Wall-clock tokens/s of every γ policy through the real worker engine, beside
transformers' own assisted generation, on the same prompts and the same pair.

    .venv/bin/python benchmarks/e2e.py --pair .cache/tiny-pair/demo \
        [--compression fp16 int8 nf4] [--limit 8] [--max-new-tokens 48] [--reps 3] \
        [--model seed-prev] [--model own-prev] [--repo REPO] [--json out.json] [--img-dir docs/img]

Policies: target only (`fixed:0`), `fixed:2/4/8`, `heuristic`, `remote` with the seed
objective (tokens_per_step) and with `goodput` for every `--model` (previous_step models in
`--repo`, served by a real `speckv-predictor serve` process over gRPC; with no `--repo` a
seed-data previous_step model is trained into a temporary one), and
`target.generate(assistant_model=draft)` with transformers' defaults and with
`num_assistant_tokens_schedule="heuristic"` (5 tokens to start, no confidence stop: the
pre-4.45 default). Repetitions are interleaved (every policy once per prompt per round, in
a rotated order) so drift on a shared machine hits all policies alike; we report the median
over rounds of tokens/s (all prompts of a round), the min–max spread, the speedup over target
only and, for remote policies, the share of wall time the loop waited for decisions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from speckv_eval.services import load_local_pair, pair_fingerprint, start_predictor

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = REPO_ROOT / "benchmarks" / "prompts" / "prompts.jsonl"


@dataclass
class Sample:
    tokens: int
    seconds: float
    wait_seconds: float = 0.0
    steps: int = 0
    cpu_seconds: float = 0.0  # this process, all threads (torch, gRPC client)


@dataclass
class PolicyResult:
    name: str
    rounds: list[list[Sample]] = field(default_factory=list)

    def tps(self, pick: list[int] | None = None) -> np.ndarray:
        """Tokens/s per round over all prompts, or over the prompt indices in `pick`."""
        out = []
        for r in self.rounds:
            chosen = r if pick is None else [r[i] for i in pick]
            out.append(sum(s.tokens for s in chosen) / sum(s.seconds for s in chosen))
        return np.asarray(out)


def train_seed_model(repo: Path, name: str) -> None:
    from predictor_service.training import TrainConfig, train_and_register

    train_and_register(
        TrainConfig(
            repo=repo, name=name, window="previous_step", heldout_runs=False, progress=False
        )
    )


def engine_runner(engine: Any, policy: Any, ids: list[int], n: int) -> Callable[[], Sample]:
    def go() -> Sample:
        c0, t0 = time.process_time(), time.perf_counter()
        res = engine.generate(ids, policy, max_new_tokens=n)
        return Sample(
            len(res.token_ids),
            time.perf_counter() - t0,
            res.stats.decision_wait_seconds,
            res.stats.num_steps,
            time.process_time() - c0,
        )

    return go


def hf_runner(pair: Any, ids: list[int], n: int, heuristic: bool) -> Callable[[], Sample]:
    import torch

    def go() -> Sample:
        saved = copy.deepcopy(pair.draft.generation_config)
        try:
            gc = pair.draft.generation_config
            if heuristic:
                gc.num_assistant_tokens = 5
                gc.num_assistant_tokens_schedule = "heuristic"
                gc.assistant_confidence_threshold = 0.0
            inp = torch.tensor([ids], dtype=torch.long, device=pair.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = pair.target.generate(
                    inp,
                    attention_mask=torch.ones_like(inp),
                    assistant_model=pair.draft,
                    max_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pair.tokenizer.pad_token_id,
                )
            return Sample(int(out.shape[1] - inp.shape[1]), time.perf_counter() - t0)
        finally:
            pair.draft.generation_config = saved

    return go


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of another process (Linux /proc), 0.0 where unreadable."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_compression(
    args: argparse.Namespace, comp: str, stream: Any | None, predictor_pid: int | None = None
) -> dict[str, Any]:
    import torch
    from speckv_client.types import ModelSelector, Objective, Window
    from tqdm import tqdm

    from decode_worker.config import EngineConfig, RemotePolicyConfig
    from decode_worker.engine import SpeculativeEngine
    from decode_worker.policies import FixedPolicy, HeuristicContextPolicy, HeuristicPolicy
    from decode_worker.remote_policy import RemotePolicy

    pair = load_local_pair(args.pair / "draft", args.pair / "target", comp, args.device)
    engine = SpeculativeEngine(pair, EngineConfig(default_max_new_tokens=args.max_new_tokens))
    engine.warmup()
    records = [json.loads(x) for x in args.prompts.read_text().splitlines() if x.strip()]
    if args.per_task:
        seen: dict[str, int] = {}
        chosen = []
        for r in records:
            if seen.get(r["task"], 0) < args.per_task:
                seen[r["task"]] = seen.get(r["task"], 0) + 1
                chosen.append(r)
        records = chosen
    elif args.limit:
        records = records[: args.limit]
    tasks = [str(r["task"]) for r in records]
    ids_list = [engine.encode(r["prompt"]) for r in records]
    n = args.max_new_tokens
    policies: dict[str, Callable[[list[int]], Callable[[], Sample]]] = {}

    def with_policy(policy: Any) -> Callable[[list[int]], Callable[[], Sample]]:
        return lambda ids: engine_runner(engine, policy, ids, n)

    for g in (0, 2, 4, 8):
        policies[f"fixed:{g}"] = with_policy(FixedPolicy(g))
    policies["heuristic"] = with_policy(HeuristicPolicy())
    policies["heuristic-ctx"] = with_policy(HeuristicContextPolicy())
    if stream is not None:
        for model in args.model:
            if args.windows.get(model) == "draft_plan":
                pol = RemotePolicy(
                    stream,
                    RemotePolicyConfig(
                        window=Window.DRAFT_PLAN,
                        objective=Objective.GOODPUT,
                        model=ModelSelector(name=model),
                    ),
                    engine.timing,
                )
                policies[f"remote {model} draft_plan"] = with_policy(pol)
                continue
            for obj in (Objective.TOKENS_PER_STEP, Objective.GOODPUT):
                pol = RemotePolicy(
                    stream,
                    RemotePolicyConfig(objective=obj, model=ModelSelector(name=model)),
                    engine.timing,
                )
                policies[f"remote {model} {obj.value}"] = with_policy(pol)
    policies["HF assisted (defaults)"] = lambda ids: hf_runner(pair, ids, n, heuristic=False)
    policies["HF assisted (heuristic)"] = lambda ids: hf_runner(pair, ids, n, heuristic=True)
    if args.policies:
        unknown = sorted(set(args.policies) - set(policies))
        if unknown:
            raise SystemExit(f"--policies: unknown {unknown}; known: {sorted(policies)}")
        keep = {"fixed:0", *args.policies}  # target only stays: it is the baseline
        policies = {k: v for k, v in policies.items() if k in keep}
    results = {name: PolicyResult(name) for name in policies}
    names = list(policies)
    predictor_cpu0 = process_cpu_seconds(predictor_pid) if predictor_pid else 0.0
    torch.manual_seed(0)
    total = args.reps * len(ids_list) * len(names)
    with tqdm(total=total, desc=f"{comp}: timed runs") as bar:
        for rep in range(args.reps):
            for r in results.values():
                r.rounds.append([])
            for i, ids in enumerate(ids_list):
                k = (rep + i) % len(names)
                for name in names[k:] + names[:k]:
                    results[name].rounds[-1].append(policies[name](ids)())
                    bar.update(1)
    predictor_cpu = (process_cpu_seconds(predictor_pid) - predictor_cpu0) if predictor_pid else 0.0
    remote_steps = sum(
        s.steps
        for name, r in results.items()
        if name.startswith("remote")
        for rnd in r.rounds
        for s in rnd
    )
    base = float(np.median(results["fixed:0"].tps()))
    by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
    base_task = {t: float(np.median(results["fixed:0"].tps(ix))) for t, ix in by_task.items()}
    rows = []
    for r in results.values():
        tps = r.tps()
        samples = [s for rnd in r.rounds for s in rnd]
        wall = sum(s.seconds for s in samples)
        rows.append(
            {
                "policy": r.name,
                "tok/s median": round(float(np.median(tps)), 1),
                "tok/s min": round(float(tps.min()), 1),
                "tok/s max": round(float(tps.max()), 1),
                "speedup vs target": round(float(np.median(tps)) / base, 3),
                "speedup by task": {
                    t: round(float(np.median(r.tps(ix))) / base_task[t], 3)
                    for t, ix in by_task.items()
                },
                "tokens/step": round(
                    sum(s.tokens for s in samples) / max(sum(s.steps for s in samples), 1), 2
                )
                if any(s.steps for s in samples)
                else None,
                "decision wait % of wall": round(
                    100 * sum(s.wait_seconds for s in samples) / wall, 3
                ),
                "wall ms/step": round(1e3 * wall / sum(s.steps for s in samples), 2)
                if any(s.steps for s in samples)
                else None,
                "worker CPU ms/step": round(
                    1e3 * sum(s.cpu_seconds for s in samples) / sum(s.steps for s in samples), 2
                )
                if any(s.steps for s in samples)
                else None,
            }
        )
    return {
        "compression": comp,
        "prompts": len(ids_list),
        "tasks": {t: len(ix) for t, ix in by_task.items()},
        "max_new_tokens": n,
        "rows": rows,
        # The predictor process's CPU over this compression's runs, per remote step.
        "predictor_cpu_ms_per_remote_step": round(1e3 * predictor_cpu / remote_steps, 3)
        if remote_steps
        else None,
    }


def plot_e2e(reports: list[dict[str, Any]], img_dir: Path) -> Path:
    """Median wall-clock tokens/s, one row per policy, one bar per compression."""
    import pandas as pd

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from speckv_eval.plots import policy_bars

    policies = [r["policy"] for r in reports[0]["rows"]]
    wide = pd.DataFrame({"policy": policies})
    for rep in reports:
        by_policy = {r["policy"]: r["tok/s median"] for r in rep["rows"]}
        wide[rep["compression"]] = [by_policy.get(p, float("nan")) for p in policies]
    return policy_bars(
        img_dir / "e2e_tokens_per_s.png",
        wide,
        "wall-clock tokens/s (median of rounds)",
        "Worker engine and HF assisted generation: wall-clock tokens/s",
    )


def _window(client: Any, model: str) -> str:
    """The window the model's versions declare (GetModel), waiting for the server."""
    from speckv_client.types import ModelState

    deadline = time.monotonic() + 30
    while True:
        try:
            info = client.get_model(model)
            ready = [v for v in info.versions if v.state == ModelState.READY]
            if ready:
                return str(ready[0].window)
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise SystemExit(f"--model {model}: no READY version on the predictor after 30 s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", type=Path, required=True, help="folder with draft/ and target/")
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--compression", nargs="+", default=["fp16", "int8", "nf4"])
    parser.add_argument("--limit", type=int, default=8, help="first N prompts (0: all)")
    parser.add_argument(
        "--per-task",
        type=int,
        default=0,
        help="instead of --limit: the first N prompts of every task (code, math, chat, "
        "summarization), with per-task speed-ups in the report",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=None, help="model repository to serve")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="model name(s) in --repo; previous_step models run with both objectives, "
        "draft_plan models as 'remote NAME draft_plan'",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=None,
        help="run only these policy names (as printed, e.g. fixed:2 heuristic "
        "'remote NAME goodput'); fixed:0 always runs as the baseline",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--img-dir", type=Path, default=None)
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="only redraw the PNG from a previous --json file into --img-dir",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        if args.img_dir is None:
            parser.error("--replot needs --img-dir")
        print(f"wrote {plot_e2e(json.loads(args.replot.read_text()), args.img_dir)}")
        return 0
    for sub in ("draft", "target"):
        if not (args.pair / sub).is_dir():
            parser.error(f"--pair {args.pair}: no {sub}/ inside; build it with speckv-tiny-pair")
    if args.reps < 1:
        parser.error("--reps must be ≥ 1")

    import torch
    from speckv_client.predictor import PredictorClient

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.repo is None:
        args.repo = Path(tmp.name) / "repo"
        train_seed_model(args.repo, "seed-prev")
        args.model = args.model or ["seed-prev"]
    args.model = args.model or []
    args.windows = {}
    proc = client = stream = None
    reports = []
    try:
        if args.model:
            proc = start_predictor(args.repo, default_model=args.model[0])
            client = PredictorClient(proc.address)
            args.windows = {m: _window(client, m) for m in args.model}
            stream = client.decision_stream()
            deadline = time.monotonic() + 15
            while not stream.connected and time.monotonic() < deadline:
                time.sleep(0.05)
        for comp in args.compression:
            load_start, t0 = os.getloadavg()[0], time.perf_counter()
            rep = run_compression(args, comp, stream, proc.pid if proc is not None else None)
            rep["seconds"] = round(time.perf_counter() - t0, 1)
            rep["load_average_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
            rep["command"] = "benchmarks/e2e.py " + " ".join(argv if argv else sys.argv[1:])
            rep["pair_fingerprint"] = pair_fingerprint(args.pair / "draft", args.pair / "target")
            reports.append(rep)
            print(
                f"\n## {comp}: {rep['prompts']} prompts × {args.reps} rounds, "
                f"{args.max_new_tokens} new tokens, {rep['seconds']} s, "
                f"load average {rep['load_average_1min'][0]} → {rep['load_average_1min'][1]}"
            )
            cols = list(rep["rows"][0])
            print(" | ".join(cols))
            for row in rep["rows"]:
                print(" | ".join(str(row[c]) for c in cols))
            if rep["predictor_cpu_ms_per_remote_step"] is not None:
                print(
                    "predictor process CPU per remote step: "
                    f"{rep['predictor_cpu_ms_per_remote_step']} ms"
                )
    finally:
        if stream is not None:
            stream.close()
        if client is not None:
            client.close()
        if proc is not None:
            proc.stop()
        tmp.cleanup()
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    if args.img_dir is not None:
        print(f"wrote {plot_e2e(reports, args.img_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
