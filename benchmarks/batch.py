"""Aggregate tokens/s with N concurrent clients: the batching worker (`--batching on`)
against today's interleaved worker (`--batching off`) and transformers' own batched
`generate` without speculation, on the same prompts, the same pair, greedy.

    flock /tmp/bench.lock .venv/bin/python benchmarks/batch.py \
        --pair .cache/tiny-pair/demo-seed0 [--compression fp16 nf4] [--clients 1 2 4 8 16] \
        [--max-new-tokens 48] [--requests-per-client 2] [--min-requests 12] [--threads 2] \
        [--json benchmarks/results/batch.json] [--img docs/img/batch_tokens_per_s.png]

Arms (per compression):
- `batched <policy>`: one `speckv-worker serve --batching on --max-batch-size 16` process;
  the policy is chosen per request (`batch-goodput`, `fixed:0`, `fixed:2`, `fixed:4`);
- `interleaved heuristic`: `speckv-worker serve --batching off --max-concurrent-requests 16`
  (the worker before batching; heuristic is its default policy without a predictor);
- `generate`: `target.generate` on batches of N prompts (left padding, greedy, no draft)
  in this process with the same torch threads.

Each concurrency level runs max(N × requests-per-client, min-requests) requests from the
prompt mix (benchmarks/prompts/prompts.jsonl, cycled) through N client threads that each
send one streaming Generate at a time; tokens/s = all new tokens / wall from the first
request to the last answer. Time per output token per request = its wall / its tokens;
p50 and p99 over requests. The γ each row ran (the chunks' StepStats.gamma) is averaged per
level. The load average is recorded before and after every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = REPO_ROOT / "benchmarks" / "prompts" / "prompts.jsonl"
BATCHED_POLICIES = ("batch-goodput", "fixed:0", "fixed:2", "fixed:4")


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
    load: list[float]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _summary(clients: int, samples: list[tuple[int, float, list[int]]], wall: float) -> Level:
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
        load=loadavg(),
    )


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
    """`clients` threads, each sending one streaming Generate at a time."""
    import grpc
    from speckv.v1 import decoder_pb2, decoder_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = decoder_pb2_grpc.DecoderServiceStub(channel)
    lock = threading.Lock()
    todo = list(range(n_requests))
    samples: list[tuple[int, float, list[int]]] = []
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            req = decoder_pb2.GenerateRequest(
                prompt=prompts[i % len(prompts)],
                max_new_tokens=request_tokens(i, new, mixed),
                policy=policy,
                request_id=f"c{clients}-{policy}-{i}",
            )
            t0 = time.perf_counter()
            tokens, gammas = 0, []
            try:
                for msg in stub.Generate(req, timeout=600):
                    if msg.HasField("chunk"):
                        tokens += len(msg.chunk.token_ids)
                        gammas.append(msg.chunk.step.gamma)
            except BaseException as err:  # recorded, the run fails below
                errors.append(err)
                return
            with lock:
                samples.append((tokens, time.perf_counter() - t0, gammas))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    channel.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]!r}")
    return _summary(clients, samples, wall)


def run_generate(
    pair: Any, prompts: list[str], clients: int, n_requests: int, new: int, mixed: bool = False
) -> Level:
    """transformers' batched generate: batches of `clients` prompts, left padded, greedy; a
    batch runs to its longest request, and a row's tokens beyond its own request (or after
    its EOS) are not counted."""
    import torch

    tok = pair.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = pair.target.generation_config.eos_token_id
    samples: list[tuple[int, float, list[int]]] = []
    t0 = time.perf_counter()
    for start in range(0, n_requests, clients):
        idx = list(range(start, min(start + clients, n_requests)))
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
    return _summary(clients, samples, time.perf_counter() - t0)


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
    ap.add_argument("--pair", type=Path, default=REPO_ROOT / ".cache/tiny-pair/demo-seed0")
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
    if args.replot:
        data = json.loads(args.replot.read_text())
        print(f"wrote {plot(data['results'], args.img, data['meta'].get('lengths', 'uniform'))}")
        return 0
    import torch

    from decode_worker.pair import PairConfig, load_pair

    torch.set_num_threads(args.threads)
    records = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    prompts = [r["prompt"] for r in records]
    meta: dict[str, Any] = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "pair": str(args.pair),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "lengths": args.lengths,
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
        worker = start_worker(args.pair, comp, args.threads, batching=True)
        try:
            # One unmeasured request per policy (first-request setup).
            for pol in args.policies:
                run_clients(worker.address, prompts, 1, 1, pol, 8)
            for pol in args.policies:
                arm = f"batched {pol}"
                for c in args.clients:
                    lv = run_clients(
                        worker.address, prompts, c, n_requests(c), pol, args.max_new_tokens, mixed
                    )
                    out.setdefault(arm, []).append(asdict(lv))
                    print(f"{comp} {arm} c={c}: {lv.tokens_per_s} tok/s, γ {lv.mean_gamma}, "
                          f"p50 {lv.tpot_p50_ms} ms/token, load {lv.load}", flush=True)  # fmt: skip
        finally:
            worker.stop()
        if not args.no_interleaved:
            worker = start_worker(args.pair, comp, args.threads, batching=False)
            try:
                run_clients(worker.address, prompts, 1, 1, "heuristic", 8)
                arm = "interleaved heuristic"
                for c in args.clients:
                    lv = run_clients(
                        worker.address,
                        prompts,
                        c,
                        n_requests(c),
                        "heuristic",
                        args.max_new_tokens,
                        mixed,
                    )
                    out.setdefault(arm, []).append(asdict(lv))
                    print(f"{comp} {arm} c={c}: {lv.tokens_per_s} tok/s, "
                          f"p50 {lv.tpot_p50_ms} ms/token, load {lv.load}", flush=True)  # fmt: skip
            finally:
                worker.stop()
        if not args.no_generate:
            pair = load_pair(
                PairConfig(
                    draft=str(args.pair / "draft"),
                    target=str(args.pair / "target"),
                    compression=comp,
                    device="cpu",
                )
            )
            run_generate(pair, prompts, 1, 1, 8)
            for c in args.clients:
                lv = run_generate(pair, prompts, c, n_requests(c), args.max_new_tokens, mixed)
                out.setdefault("generate (batched, no speculation)", []).append(asdict(lv))
                print(f"{comp} generate c={c}: {lv.tokens_per_s} tok/s, "
                      f"p50 {lv.tpot_p50_ms} ms/token, load {lv.load}", flush=True)  # fmt: skip
            del pair
    meta["load_end"] = loadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.json} and {plot(results, args.img, args.lengths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
