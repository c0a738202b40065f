"""Aggregate tokens/s with N concurrent clients: the batching worker (`--batching on`)
against today's interleaved worker (`--batching off`) and transformers' own batched
`generate` without speculation, on the same prompts, the same pair, greedy.

    flock /tmp/bench.lock .venv/bin/python benchmarks/batch.py \
        --pair .cache/tiny-pair/demo-seed0 [--compression fp16 nf4] [--clients 1 2 4 8 16] \
        [--max-new-tokens 48] [--requests-per-client 2] [--min-requests 12] [--threads 2] \
        [--rounds 3] [--json benchmarks/results/batch.json] [--img docs/img/batch_tokens_per_s.png]

Arms (per compression; all started up front, idle ones use no CPU):
- `batched <policy>`: one `speckv-worker serve --batching on --max-batch-size 16` process
  per policy (`batch-goodput`, `fixed:0`, `fixed:2`, `fixed:4`), so `batch-goodput` learns
  its step costs from its own traffic only, as it would in production;
- `interleaved heuristic`: `speckv-worker serve --batching off --max-concurrent-requests 16`
  (the worker before batching; heuristic is its default policy without a predictor);
- `generate`: `target.generate` on batches of N prompts (left padding, greedy, no draft)
  in this process with the same torch threads.
Every arm gets one unmeasured short request first (first-request setup).

Each concurrency level runs max(N × requests-per-client, min-requests) requests from the
prompt mix (benchmarks/prompts/prompts.jsonl, cycled) through N client threads that each
send one streaming Generate at a time. The machine's speed drifts by tens of per cent over
minutes, so the arms are interleaved: a level's requests are split into `--rounds` rounds
(consecutive request indices, each round ≥ N requests; fewer rounds when there are too few
requests, said in the output), and in each round every arm runs the same request indices
back to back, the arm order rotated by one each round. A round of N requests (one per
client) measures a batch's ramp and drain as much as its steady state; with more requests
per round (e.g. `--requests-per-client 6 --rounds 2`: three per client) each client sends
its next request as its last one ends, as clients of a serving worker do (docs/results.md
§7, "Sustained load"). An arm's level aggregates its
rounds: tokens/s = all new tokens / the summed round walls (each from a round's first
request to its last answer), and `round_tokens_per_s` keeps each round's. Time per output
token per request = its wall / its tokens; p50 and p99 over all requests. The γ each row ran
(the chunks' StepStats.gamma) is averaged per level. `load` is the load average at the
start and at the end of the level. `batched batch-goodput` levels carry `vs_fixed` (its
tokens/s ÷ each fixed arm's, aggregated) and `vs_fixed_rounds` (per round); generate levels
carry `best_batched_vs_generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = REPO_ROOT / "benchmarks" / "prompts" / "prompts.jsonl"
DEMO_PAIR = REPO_ROOT / ".cache" / "tiny-pair" / "demo-seed0"
BATCHED_POLICIES = ("batch-goodput", "fixed:0", "fixed:2", "fixed:4")
GENERATE = "generate (batched, no speculation)"
GOODPUT = "batched batch-goodput"

# One request's (new tokens, seconds, γ of each chunk).
Sample = tuple[int, float, list[int]]


@dataclass
class Level:
    clients: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    mean_gamma: float
    steps: int
    load: list[list[float]]  # load averages at the level's start and end
    round_tokens_per_s: list[float] = field(default_factory=list)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _summary(clients: int, samples: list[Sample], wall: float, load: list[list[float]]) -> Level:
    tokens = sum(n for n, _, _ in samples)
    tpot = np.array([s / n * 1000 for n, s, _ in samples if n > 0])
    gammas = [g for _, _, gs in samples for g in gs]
    return Level(
        clients=clients,
        requests=len(samples),
        tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 2),
        tpot_p50_ms=round(float(np.percentile(tpot, 50)), 3),
        tpot_p99_ms=round(float(np.percentile(tpot, 99)), 3),
        mean_gamma=round(float(np.mean(gammas)), 3) if gammas else 0.0,
        steps=len(gammas),
        load=load,
    )


def split_rounds(n_requests: int, clients: int, rounds: int) -> list[list[int]]:
    """Request indices 0..n_requests-1 in consecutive blocks, one per round, sizes as even
    as possible; at most `rounds` rounds and fewer when that keeps each round ≥ `clients`
    requests (one round at least)."""
    r = max(1, min(rounds, n_requests // max(clients, 1)))
    size, extra = divmod(n_requests, r)
    out, start = [], 0
    for k in range(r):
        end = start + size + (1 if k < extra else 0)
        out.append(list(range(start, end)))
        start = end
    return out


def rotated(arms: Sequence[Any], k: int) -> list[Any]:
    """The arm order of round k: starts at arm k mod len(arms)."""
    j = k % len(arms)
    return [*arms[j:], *arms[:j]]


def request_tokens(i: int, new: int, mixed: bool) -> int:
    """Tokens request i asks for: `new`, or (mixed) new/3, 2·new, new/2, 4·new/3 in turn."""
    if not mixed:
        return new
    return max(1, [new // 3, 2 * new, new // 2, 4 * new // 3][i % 4])


def run_clients(
    address: str,
    prompts: list[str],
    clients: int,
    n_requests: int,
    policy: str,
    new: int,
    mixed: bool = False,
) -> Level:
    """Requests 0..n_requests-1 through `clients` threads (see client_samples)."""
    load = [loadavg()]
    samples, wall = client_samples(address, prompts, clients, range(n_requests), policy, new, mixed)
    return _summary(clients, samples, wall, [*load, loadavg()])


def client_samples(
    address: str,
    prompts: list[str],
    clients: int,
    indices: Sequence[int],
    policy: str,
    new: int,
    mixed: bool = False,
    tag: str = "",
) -> tuple[list[Sample], float]:
    """`clients` threads, each sending one streaming Generate at a time, for the requests
    `indices` (prompt and length of request i as everywhere); the samples and the wall."""
    import grpc
    from speckv.v1 import decoder_pb2, decoder_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = decoder_pb2_grpc.DecoderServiceStub(channel)
    lock = threading.Lock()
    samples: list[Sample] = []

    def request(i: int) -> None:
        req = decoder_pb2.GenerateRequest(
            prompt=prompts[i % len(prompts)],
            max_new_tokens=request_tokens(i, new, mixed),
            policy=policy,
            request_id=f"{tag}c{clients}-{policy}-{i}",
        )
        t0 = time.perf_counter()
        tokens, gammas = 0, []
        for msg in stub.Generate(req, timeout=600):
            if msg.HasField("chunk"):
                tokens += len(msg.chunk.token_ids)
                gammas.append(msg.chunk.step.gamma)
        with lock:
            samples.append((tokens, time.perf_counter() - t0, gammas))

    try:
        wall = closed_loop(indices, clients, request)
    finally:
        channel.close()
    return samples, wall


def closed_loop(indices: Sequence[int], clients: int, work: Callable[[int], None]) -> float:
    """`clients` threads, each taking the next of `indices` in order and running `work(i)`
    until none is left (one request in flight per client); the wall seconds. A failed
    request stops its thread; the first failure is raised once all have stopped."""
    lock = threading.Lock()
    todo = list(indices)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                work(i)
            except BaseException as err:  # recorded, raised below
                errors.append(err)
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]!r}")
    return wall


def generate_samples(
    pair: Any,
    prompts: list[str],
    clients: int,
    indices: Sequence[int],
    new: int,
    mixed: bool = False,
) -> tuple[list[Sample], float]:
    """transformers' batched generate on the requests `indices`: batches of `clients`
    prompts, left padded, greedy; a batch runs to its longest request, and a row's tokens
    beyond its own request (or after its EOS) are not counted. The samples and the wall."""
    import torch

    tok = pair.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = pair.target.generation_config.eos_token_id
    samples: list[Sample] = []
    t0 = time.perf_counter()
    for start in range(0, len(indices), clients):
        idx = list(indices[start : start + clients])
        batch = [prompts[i % len(prompts)] for i in idx]
        wants = [request_tokens(i, new, mixed) for i in idx]
        enc = tok(batch, return_tensors="pt", padding=True)
        s0 = time.perf_counter()
        with torch.inference_mode():
            out = pair.target.generate(
                enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max(wants),
                do_sample=False,
                pad_token_id=pad,
            )
        seconds = time.perf_counter() - s0
        for want, row in zip(wants, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            row = row[:want]
            n = len(row)
            if eos is not None and eos in row:
                n = row.index(eos) + 1
            samples.append((n, seconds, []))
    return samples, time.perf_counter() - t0


@dataclass
class ClientArm:
    """A worker arm: streaming Generates with `policy` to the worker at `address`."""

    name: str
    address: str
    policy: str

    def run(
        self,
        prompts: list[str],
        indices: Sequence[int],
        clients: int,
        new: int,
        mixed: bool,
        tag: str,
    ) -> tuple[list[Sample], float]:
        return client_samples(
            self.address, prompts, clients, indices, self.policy, new, mixed, tag=tag
        )


@dataclass
class GenerateArm:
    """transformers' batched generate in this process."""

    name: str
    pair: Any

    def run(
        self,
        prompts: list[str],
        indices: Sequence[int],
        clients: int,
        new: int,
        mixed: bool,
        tag: str,
    ) -> tuple[list[Sample], float]:
        return generate_samples(self.pair, prompts, clients, indices, new, mixed)


Arm = ClientArm | GenerateArm


def run_level(
    arms: Sequence[Arm],
    prompts: list[str],
    clients: int,
    rounds: list[list[int]],
    new: int,
    mixed: bool,
) -> dict[str, Level]:
    """Every arm on every round's requests, back to back, the order rotated each round; per
    arm the level over its rounds (summed tokens and walls, pooled requests)."""
    load0 = loadavg()
    runs: dict[str, list[tuple[list[Sample], float]]] = {arm.name: [] for arm in arms}
    for k, indices in enumerate(rounds):
        for arm in rotated(arms, k):
            runs[arm.name].append(arm.run(prompts, indices, clients, new, mixed, f"r{k}-"))
    load = [load0, loadavg()]
    out = {}
    for name, got in runs.items():
        lv = _summary(
            clients, [x for samples, _ in got for x in samples], sum(w for _, w in got), load
        )
        lv.round_tokens_per_s = [
            round(sum(n for n, _, _ in samples) / wall, 2) for samples, wall in got
        ]
        out[name] = lv
    return out


def ratios(levels: dict[str, dict[str, Any]]) -> None:
    """Adds `vs_fixed` / `vs_fixed_rounds` to the batch-goodput level (its tokens/s ÷ each
    fixed arm's, aggregated and per round) and `best_batched_vs_generate` to the generate
    level (the best batched arm's tokens/s ÷ generate's)."""
    gp = levels.get(GOODPUT)
    if gp is not None:
        fixed = [a for a in levels if a.startswith("batched fixed:")]
        gp["vs_fixed"] = {
            a: round(gp["tokens_per_s"] / levels[a]["tokens_per_s"], 3) for a in fixed
        }
        gp["vs_fixed_rounds"] = {
            a: [
                round(x / y, 3)
                for x, y in zip(
                    gp["round_tokens_per_s"], levels[a]["round_tokens_per_s"], strict=True
                )
            ]
            for a in fixed
        }
    gen = levels.get(GENERATE)
    batched = [a for a in levels if a.startswith("batched ")]
    if gen is not None and batched:
        best = max(batched, key=lambda a: levels[a]["tokens_per_s"])
        gen["best_batched_vs_generate"] = {
            "arm": best,
            "ratio": round(levels[best]["tokens_per_s"] / gen["tokens_per_s"], 3),
        }


def prompt_texts() -> list[str]:
    """The prompt mix's texts (PROMPTS; a malformed line is an error naming it)."""
    from speckv_eval.replay_run import load_prompts

    return [p.prompt for p in load_prompts(PROMPTS)]


def step_cost_log(sched: Any) -> list[tuple[int, int, float]]:
    """Hook a BatchScheduler's cost samples: every step its BatchCosts is given (batch
    size, verify width, seconds) is also appended to the returned list (catch-up steps after
    G = 0 runs are not samples and do not appear)."""
    log: list[tuple[int, int, float]] = []
    orig = sched.costs.add

    def add(b: int, w: int, sec: float, **kw: Any) -> None:
        log.append((b, w, sec))
        orig(b, w, sec, **kw)

    sched.costs.add = add
    return log


def local_engine_args(ap: argparse.ArgumentParser, max_new_tokens: int = 48) -> None:
    """The in-process benchmarks' options for `local_engine` (--pair, --compression,
    --threads) and their request length (--max-new-tokens)."""
    ap.add_argument("--pair", type=Path, default=DEMO_PAIR)
    ap.add_argument("--compression", default="fp16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def local_engine(
    pair_dir: Path, compression: str, threads: int, max_gamma: int = 8
) -> tuple[Any, Any, list[str], list[list[int]]]:
    """For the in-process benchmarks (batch_overhead.py, batch_policy.py,
    acceptance_alignment.py, row_replay_offline.py; options from `local_engine_args`):
    torch threads set, the pair loaded on the CPU, an engine over it, and the prompt mix as
    texts and token ids."""
    import torch
    from speckv_eval.services import load_local_pair

    from decode_worker.config import EngineConfig
    from decode_worker.engine import SpeculativeEngine

    torch.set_num_threads(threads)
    pair = load_local_pair(pair_dir / "draft", pair_dir / "target", compression, "cpu")
    eng = SpeculativeEngine(pair, EngineConfig(max_gamma=max_gamma))
    texts = prompt_texts()
    return pair, eng, texts, [eng.encode(t) for t in texts]


def start_worker(
    pair: Path, compression: str, threads: int, batching: bool, extra: tuple[str, ...] = ()
) -> Any:
    from speckv_eval.services import BIN, ServiceProcess

    cmd: list[str | Path] = [BIN / "speckv-worker", "serve", "--draft", pair / "draft"]
    cmd += ["--target", pair / "target", "--compression", compression, "--device", "cpu"]
    cmd += ["--policy", "heuristic", "--port", "0", "--threads", str(threads)]
    cmd += ["--max-new-tokens-limit", "512", "--shutdown-grace-s", "5"]
    if batching:
        cmd += ["--batching", "on", "--max-batch-size", "16", "--max-queue", "16"]
    else:
        cmd += ["--batching", "off", "--max-concurrent-requests", "16"]
    return ServiceProcess("speckv-worker", [*cmd, *extra], timeout_s=600)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("speckv_worker_batch_"):
            name, value = line.split()[:2]
            out[name.removeprefix("speckv_worker_")] = float(value)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_remote(args: argparse.Namespace, prompts: list[str], comp: str) -> dict[str, Any]:
    """The remote policy (previous_step, a seed-data model served by a real predictor
    process) on a batching worker: Decide messages per batch step, and worker / predictor
    CPU per sequence step beside fixed:2 on the same worker (the γ the seed model picks on
    this pair: compare like with like)."""
    import tempfile

    from speckv_eval.services import start_predictor

    from predictor_service.training import TrainConfig, train_and_register

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        train_and_register(
            TrainConfig(
                repo=repo,
                name="speckv-mlp16",
                window="previous_step",
                heldout_runs=False,
                progress=False,
            )
        )
        pred = start_predictor(repo, default_model="speckv-mlp16")
        port = free_port()
        extra: tuple[str, ...] = ("--predictor", pred.address, "--window", "previous_step")
        extra = (*extra, "--metrics-port", str(port))
        worker = start_worker(args.pair, comp, args.threads, batching=True, extra=extra)
        try:
            for pol in ("remote", "fixed:2"):
                run_clients(worker.address, prompts, 1, 1, pol, 8)
                for c in args.clients:
                    n = max(c * args.requests_per_client, args.min_requests)
                    m0, w0, p0 = scrape(port), proc_cpu(worker.pid), proc_cpu(pred.pid)
                    lv = asdict(
                        run_clients(worker.address, prompts, c, n, pol, args.max_new_tokens)
                    )
                    m1, w1, p1 = scrape(port), proc_cpu(worker.pid), proc_cpu(pred.pid)
                    steps = m1["batch_steps"] - m0["batch_steps"]
                    rows = m1["batch_row_steps"] - m0["batch_row_steps"]
                    msgs = m1["batch_decide_messages"] - m0["batch_decide_messages"]
                    lv.update(
                        batch_steps=int(steps),
                        mean_batch=round(rows / steps, 2) if steps else 0.0,
                        decide_messages=int(msgs),
                        messages_per_batch_step=round(msgs / steps, 3) if steps else 0.0,
                        worker_cpu_ms_per_seq_step=round((w1 - w0) / rows * 1000, 3),
                        predictor_cpu_ms_per_seq_step=round((p1 - p0) / rows * 1000, 3),
                    )
                    out.setdefault(f"batched {pol} (predictor connected)", []).append(lv)
                    print(f"{comp} remote-worker {pol} c={c}: {lv['tokens_per_s']} tok/s, "
                          f"{lv['messages_per_batch_step']} msg/step, worker CPU "
                          f"{lv['worker_cpu_ms_per_seq_step']} ms/seq-step, load {lv['load']}",
                          flush=True)  # fmt: skip
        finally:
            worker.stop()
            pred.stop()
    return out


def plot(results: dict[str, Any], path: Path, lengths: str = "uniform") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = list(results)
    fig, axes = plt.subplots(2, len(comps), figsize=(6 * len(comps), 8), squeeze=False)
    for j, comp in enumerate(comps):
        ax = axes[0][j]
        for arm, levels in results[comp].items():
            xs = [lv["clients"] for lv in levels]
            ax.plot(xs, [lv["tokens_per_s"] for lv in levels], marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"demo pair, {comp}, {lengths} lengths")
        ax.legend(fontsize=8)
        ax = axes[1][j]
        for arm in ("batched batch-goodput", "interleaved heuristic"):
            levels = results[comp].get(arm, [])
            xs = [lv["clients"] for lv in levels]
            ax.plot(xs, [lv["mean_gamma"] for lv in levels], marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("mean γ per step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pair", type=Path, default=DEMO_PAIR)
    ap.add_argument("--compression", nargs="+", default=["fp16", "nf4"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--lengths",
        default="uniform",
        choices=("uniform", "mixed"),
        help="uniform: every request asks for --max-new-tokens; mixed: 1/3, 2, 1/2, 4/3 of it "
        "in turn (continuous batching lets short requests leave; generate's static batch "
        "runs to its longest)",
    )
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (worker and generate)")
    ap.add_argument("--policies", nargs="+", default=list(BATCHED_POLICIES))
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="split each level's requests into this many rounds; every arm runs each round "
        "back to back, the order rotated per round (speed drift hits all arms alike)",
    )
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--no-interleaved", action="store_true")
    ap.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/results/batch.json")
    ap.add_argument("--img", type=Path, default=REPO_ROOT / "docs/img/batch_tokens_per_s.png")
    ap.add_argument("--replot", type=Path, help="only redraw the plot from this JSON")
    ap.add_argument(
        "--remote-only",
        action="store_true",
        help="only the remote-policy arms (a predictor process; Decide messages per batch "
        "step and CPU per sequence step)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be ≥ 1")
    if args.replot:
        data = json.loads(args.replot.read_text())
        print(f"wrote {plot(data['results'], args.img, data['meta'].get('lengths', 'uniform'))}")
        return 0
    import torch
    from speckv_eval.services import load_local_pair

    torch.set_num_threads(args.threads)
    prompts = prompt_texts()
    meta: dict[str, Any] = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "pair": str(args.pair),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "lengths": args.lengths,
        "rounds": args.rounds,
        "prompts": len(prompts),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_start": loadavg(),
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    mixed = args.lengths == "mixed"

    def n_requests(c: int) -> int:
        return max(c * args.requests_per_client, args.min_requests)

    for comp in args.compression:
        out: dict[str, list[dict[str, Any]]] = {}
        results[comp] = out
        if args.remote_only:
            out.update(run_remote(args, prompts, comp))
            continue
        workers: list[Any] = []
        arms: list[Arm] = []
        try:
            # One worker per batched policy (batch-goodput learns only from its own steps).
            for pol in args.policies:
                workers.append(start_worker(args.pair, comp, args.threads, batching=True))
                arms.append(ClientArm(f"batched {pol}", workers[-1].address, pol))
            if not args.no_interleaved:
                workers.append(start_worker(args.pair, comp, args.threads, batching=False))
                arms.append(ClientArm("interleaved heuristic", workers[-1].address, "heuristic"))
            if not args.no_generate:
                pair = load_local_pair(args.pair / "draft", args.pair / "target", comp, "cpu")
                arms.append(GenerateArm(GENERATE, pair))  # freed with `arms`
            # One unmeasured request per arm (first-request setup).
            for arm in arms:
                arm.run(prompts, [0], 1, 8, False, "warm-")
            for c in args.clients:
                n = n_requests(c)
                rounds = split_rounds(n, c, args.rounds)
                if len(rounds) < args.rounds:
                    print(f"{comp} c={c}: {n} requests < {args.rounds} rounds × {c} clients: "
                          f"{len(rounds)} round(s)", flush=True)  # fmt: skip
                levels = {
                    name: asdict(lv)
                    for name, lv in run_level(
                        arms, prompts, c, rounds, args.max_new_tokens, mixed
                    ).items()
                }
                ratios(levels)
                for name, lv in levels.items():
                    out.setdefault(name, []).append(lv)
                    rounds_s = " ".join(f"{x:g}" for x in lv["round_tokens_per_s"])
                    print(f"{comp} {name} c={c}: {lv['tokens_per_s']} tok/s (rounds {rounds_s}), "
                          f"γ {lv['mean_gamma']}, p50 {lv['tpot_p50_ms']} ms/token, "
                          f"load {lv['load']}", flush=True)  # fmt: skip
                for fixed, r in levels.get(GOODPUT, {}).get("vs_fixed", {}).items():
                    rr = " ".join(f"{x:.2f}" for x in levels[GOODPUT]["vs_fixed_rounds"][fixed])
                    print(f"{comp} c={c}: batch-goodput/{fixed.removeprefix('batched ')} = "
                          f"{r:.2f} (rounds {rr})", flush=True)  # fmt: skip
                best = levels.get(GENERATE, {}).get("best_batched_vs_generate")
                if best:
                    print(f"{comp} c={c}: {best['arm'].removeprefix('batched ')}/generate = "
                          f"{best['ratio']:.2f}", flush=True)  # fmt: skip
        finally:
            for w in workers:
                w.stop()
            arms.clear()
    meta["load_end"] = loadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.json} and {plot(results, args.img, args.lengths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
