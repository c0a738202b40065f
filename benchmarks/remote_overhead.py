"""Worker-process CPU per step of the `remote` policy vs `fixed:2`, on the demo tiny pair.

    flock /tmp/bench.lock .venv/bin/python benchmarks/remote_overhead.py \
        [--prompts 6] [--new-tokens 48] [--rounds 3] [--repo R] [--json out.json]

The real engine (torch, 1 thread) on the cached demo pair, the real predictor in its own
process (`speckv-predictor serve`; a model is trained into a temporary repository with
`speckv-predictor train` unless `--repo` names one holding `speckv-mlp16`) and the real
client stream. Three arms run on the same greedy prompts, interleaved prompt by prompt:

- `fixed:2`;
- `remote {2}`: the remote policy with γ candidates (2,), so every step has the same shape
  as `fixed:2` (same tokens, same forwards) and any difference is the remote machinery;
- `remote goodput`: the remote policy as served (candidates 2, 4, 6, 8);
- with `--plan-model DIR` (a draft_plan version folder, e.g.
  .cache/selector/repo/speckv-instep/1, copied into the served repository):
  `plan in-process` — the worker's own `RemotePlanSequence` over an in-process submitter
  (the replay's `InProcessPredictor`: the predictor's plan code, no gRPC) — and `plan remote`,
  the same policy over the real stream; same plans, same steps, so remote − in-process is
  what the split costs per step in the draft_plan window;
- with `--aio-prototype`, also `aio {2}`: `remote {2}` over a minimal grpc.aio Decide
  stream on one event-loop thread (`_AioPrototype`: no reconnect, no fallback handling) —
  the alternative to the sync stream's request-iterator, channel-spin and reader threads,
  kept here so the comparison in docs/worker.md can be rerun.

Per arm and round: wall time, worker-process CPU (`time.process_time`, all threads), the
main thread's CPU (`time.thread_time`) and the predictor process's CPU (/proc), each divided
by the number of steps. The report gives the median over rounds and remote − fixed:2.
Why: on a CPU pair a step is ~12 ms, so a millisecond of client CPU per decision is a
visible share of the step (docs/results.md §4.2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "benchmarks" / "prompts" / "prompts.jsonl"
PAIR = REPO / ".cache" / "tiny-pair" / "demo-seed0"
MODEL = "speckv-mlp16"


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _train(repo: Path) -> None:
    subprocess.run(
        [
            *(_cli("speckv-predictor"), "train", "--repo", str(repo), "--name", MODEL),
            *("--window", "previous_step", "--skip-heldout-runs", "--quiet"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


class _AioPrototype:
    """Decide over grpc.aio, all I/O on one loop thread; `submit` as DecisionStream's."""

    connected = True

    def __init__(self, address: str) -> None:
        import asyncio
        import itertools
        from concurrent.futures import Future

        import grpc
        from speckv.v1 import predictor_pb2_grpc
        from speckv_client import convert

        self._convert = convert
        self._future = Future
        self._ids = itertools.count(1)
        self._pending: dict[int, Any] = {}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="aio-prototype", daemon=True).start()

        async def setup() -> None:
            self.channel = grpc.aio.insecure_channel(address)
            self.call = predictor_pb2_grpc.PredictorServiceStub(self.channel).Decide()
            self.queue: asyncio.Queue[Any] = asyncio.Queue()

            async def reader() -> None:
                async for resp in self.call:
                    future = self._pending.pop(resp.request_id, None)
                    if future is not None:
                        future.set_result(convert.decisions_from_pb(resp))

            async def writer() -> None:
                while True:
                    await self.call.write(await self.queue.get())

            self._tasks = (self.loop.create_task(reader()), self.loop.create_task(writer()))

        asyncio.run_coroutine_threadsafe(setup(), self.loop).result(10)

    def submit(self, batch: Any) -> Any:
        future: Any = self._future()
        request = self._convert.decide_request_to_pb(batch, 0)
        request.request_id = next(self._ids)
        self._pending[request.request_id] = future
        self.loop.call_soon_threadsafe(self.queue.put_nowait, request)
        return future

    def report(self, outcome: Any, stream: int = 0) -> None:
        """The prototype measures decision latency only; outcomes are not sent."""

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            await self.channel.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of another process (clock ticks, usually 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Totals:
    """Sums of one arm over the prompts of one round."""

    def __init__(self) -> None:
        self.steps = self.tokens = self.drafted = self.remote = 0
        self.wall = self.cpu = self.main = self.pred = 0.0

    def run(self, engine: Any, policy: Any, ids: list[int], new: int, pid: int) -> None:
        from decode_worker.policies import DecisionSource

        pred0 = _proc_cpu_s(pid)
        wall0, cpu0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
        result = engine.generate(ids, policy, max_new_tokens=new)
        self.wall += time.perf_counter() - wall0
        self.cpu += time.process_time() - cpu0
        self.main += time.thread_time() - main0
        self.pred += _proc_cpu_s(pid) - pred0
        self.steps += result.stats.num_steps
        self.tokens += len(result.token_ids)
        for s in result.steps:
            self.drafted += s.gamma
            self.remote += s.decision.source == DecisionSource.REMOTE

    def report(self) -> dict[str, float]:
        n = self.steps
        return {
            "steps": n,
            "tokens_per_step": self.tokens / n,
            "mean_gamma": self.drafted / n,
            "remote_share": self.remote / n,
            "wall_ms_per_step": self.wall / n * 1e3,
            "cpu_ms_per_step": self.cpu / n * 1e3,
            "main_thread_cpu_ms_per_step": self.main / n * 1e3,
            "other_threads_cpu_ms_per_step": (self.cpu - self.main) / n * 1e3,
            "predictor_cpu_ms_per_step": self.pred / n * 1e3,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compression", default="fp16", choices=("fp16", "int8", "nf4"))
    parser.add_argument("--repo", default="", help=f"existing repository with {MODEL}")
    parser.add_argument("--json", default="", help="also write the report here")
    parser.add_argument(
        "--aio-prototype", action="store_true", help="add the grpc.aio prototype arm"
    )
    parser.add_argument(
        "--plan-model", default="", help="draft_plan version folder: add the plan arms"
    )
    args = parser.parse_args(argv)

    import torch
    from speckv_client.predictor import PredictorClient
    from speckv_client.types import Objective
    from speckv_eval.services import start_predictor

    from decode_worker.config import EngineConfig, RemotePolicyConfig
    from decode_worker.engine import SpeculativeEngine
    from decode_worker.pair import PairConfig, load_pair
    from decode_worker.policies import FixedPolicy
    from decode_worker.remote_policy import RemotePolicy

    torch.set_num_threads(1)
    if not (PAIR / "target").is_dir():
        print(f"no demo pair at {PAIR}: run `speckv-tiny-pair --size demo` first")
        return 2
    pair = load_pair(
        PairConfig(
            draft=str(PAIR / "draft"),
            target=str(PAIR / "target"),
            compression=args.compression,
            device="cpu",
        )
    )
    engine = SpeculativeEngine(pair, EngineConfig())
    engine.warmup()
    lines = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    prompts = [engine.encode(x["prompt"]) for x in lines[: args.prompts]]

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(args.repo) if args.repo else Path(tmp) / "repo"
        if not args.repo:
            _train(repo)
        plan_version = None
        if args.plan_model:
            import shutil

            from predictor_service.repository import load_version

            plan_version = load_version(Path(args.plan_model))
            dest = repo / plan_version.name / str(plan_version.version)
            if not dest.exists():
                shutil.copytree(args.plan_model, dest)
        proc = start_predictor(repo, default_model=MODEL)
        address = proc.address
        client = PredictorClient(address)
        stream = client.decision_stream()
        aio = _AioPrototype(address) if args.aio_prototype else None
        try:
            deadline = time.monotonic() + 15
            while not stream.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            goodput = RemotePolicyConfig(objective=Objective.GOODPUT, fallback_gamma=2)
            only2 = RemotePolicyConfig(
                objective=Objective.GOODPUT, gamma_candidates=(2,), fallback_gamma=2
            )
            arms: dict[str, Any] = {
                "fixed:2": FixedPolicy(2),
                "remote {2}": RemotePolicy(stream, only2, engine.timing),
                "remote goodput": RemotePolicy(stream, goodput, engine.timing),
            }
            if aio is not None:
                arms["aio {2}"] = RemotePolicy(aio, only2, engine.timing)
            if plan_version is not None:
                from speckv_client.types import ModelSelector, Window
                from speckv_eval.replay import InProcessPredictor

                plan_cfg = RemotePolicyConfig(
                    window=Window.DRAFT_PLAN,
                    objective=Objective.GOODPUT,
                    fallback_gamma=2,
                    model=ModelSelector(name=plan_version.name),
                )
                arms["plan in-process"] = RemotePolicy(
                    InProcessPredictor(plan_version, pair.comp_enc), plan_cfg, engine.timing
                )
                arms["plan remote"] = RemotePolicy(stream, plan_cfg, engine.timing)
            for policy in arms.values():  # one untimed pass: first-call costs
                engine.generate(prompts[0], policy, max_new_tokens=8)
            runs: dict[str, list[dict]] = {name: [] for name in arms}
            threads_seen = 0
            names = list(arms)
            for r in range(args.rounds):
                totals = {name: _Totals() for name in arms}
                # Interleaved per prompt, arm order rotated, so drift (load, clock) is shared.
                for i, ids in enumerate(prompts):
                    k = (i + r) % len(names)
                    for name in names[k:] + names[:k]:
                        totals[name].run(engine, arms[name], ids, args.new_tokens, proc.pid)
                    threads_seen = max(threads_seen, len(os.listdir("/proc/self/task")))
                for name in arms:
                    runs[name].append(totals[name].report())
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            if aio is not None:
                aio.close()
            stream.close()
            client.close()
            proc.stop()

    keys = [k for k in runs["fixed:2"][0] if k.endswith("per_step")]
    summary = {
        name: {k: statistics.median(run[k] for run in rs) for k in rs[0]}
        for name, rs in runs.items()
    }
    base = summary["fixed:2"]
    for name in arms:
        if name != "fixed:2":
            summary[name]["minus_fixed2"] = {k: summary[name][k] - base[k] for k in keys}
    if "plan remote" in summary:
        local = summary["plan in-process"]
        summary["plan remote"]["minus_plan_in_process"] = {
            k: summary["plan remote"][k] - local[k] for k in keys
        }
    report = {
        "pair": str(PAIR),
        "compression": args.compression,
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "worker_os_threads_max": threads_seen,
        "python_threads_at_end": [t.name for t in threading.enumerate()],
        "loadavg_end": os.getloadavg(),
        "median_over_rounds": summary,
        "rounds_raw": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rounds_raw"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
