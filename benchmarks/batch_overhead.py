"""Where a batching worker's time goes (the measurements behind docs/results.md §7 on the
serving path and docs/notes.md "Batching"). Subcommands, demo pair by default:

    # in one process: the batch scheduler at fixed γ vs transformers' batched generate
    .venv/bin/python benchmarks/batch_overhead.py inproc --rows 8 --gamma 2
    # step milliseconds by width: alternating widths vs one fixed width (a width-change cost?)
    .venv/bin/python benchmarks/batch_overhead.py widths --rows 8 --alternate 1 2
    # served fixed:2 at 8 clients: worker variants interleaved in rounds, client CPU, and
    # (with py-spy installed) the scheduler thread's time by part
    .venv/bin/python benchmarks/batch_overhead.py served --clients 8 [--py-spy PATH]
    # what one leaving row costs in the KV buffers (BatchedKV.keep_rows)
    .venv/bin/python benchmarks/batch_overhead.py leave --rows 8 --width 80
    # served vs in-process on the same requests, interleaved: per arm tokens/s and where the
    # scheduler's time went (ms per step, forwards, mean batch, joins; from /metrics)
    .venv/bin/python benchmarks/batch_overhead.py split --clients 8 --repeats 4
    # in-process steps with a small CPU competitor (another process busy a share of a core)
    .venv/bin/python benchmarks/batch_overhead.py contention --rows 8 --duty 0.15
    # what batch-goodput itself costs per step: its planning, and the match replay every
    # greedy row keeps (docs/design.md, "The batch's draft length")
    .venv/bin/python benchmarks/batch_overhead.py policy-cost --rows 8
    # policies through two serving workers, each worker serving all of them (per-request
    # policy): each policy against the first inside one process, and the processes against
    # each other
    .venv/bin/python benchmarks/batch_overhead.py served-ab --clients 8 \
        --policies fixed:2 batch-goodput [fixed:1 fixed:3 ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import batch as B  # benchmarks/batch.py, beside this script


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list[str], list[list[int]]]:
    """(pair, engine, prompt texts, their token ids) for --pair/--compression/--threads."""
    return B.local_engine(args.pair, args.compression, args.threads)


def _run_batch(sched: Any, ids: list[list[int]], policy: Any, rows: int, new: int) -> float:
    """`rows` requests submitted together; tokens/s until the last finishes."""
    hs = [
        sched.submit(
            ids[i % len(ids)],
            policy,
            max_new_tokens=new,
            request_id=f"r{time.monotonic_ns()}-{i}",
            record=False,
        )
        for i in range(rows)
    ]
    t0 = time.perf_counter()
    tokens = 0
    for h in hs:
        for _ in h:
            pass
        tokens += len(h.result.token_ids)
    return tokens / (time.perf_counter() - t0)


def inproc(args: argparse.Namespace) -> None:
    import torch

    from decode_worker.batching import BatchScheduler
    from decode_worker.policies import FixedPolicy

    pair, eng, texts, ids = _setup(args)
    sched = BatchScheduler(eng, max_batch_size=max(16, args.rows), max_queue=16)
    _run_batch(sched, ids, FixedPolicy(args.gamma), args.rows, args.max_new_tokens)
    sched_rates = [
        _run_batch(sched, ids, FixedPolicy(args.gamma), args.rows, args.max_new_tokens)
        for _ in range(args.repeats)
    ]
    sched.close(timeout=10)
    tok = pair.tokenizer
    tok.padding_side = "left"
    enc = tok(texts[: args.rows], return_tensors="pt", padding=True)

    def generate() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pair.target.generate(
                enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return args.rows * args.max_new_tokens / (time.perf_counter() - t0)

    generate()
    gen_rates = [generate() for _ in range(args.repeats)]
    print(
        f"{args.rows} rows, fixed:{args.gamma}: scheduler {[round(r) for r in sched_rates]} "
        f"tokens/s, generate {[round(r) for r in gen_rates]} tokens/s, "
        f"load {os.getloadavg()[0]:.2f}"
    )


def widths(args: argparse.Namespace) -> None:
    from decode_worker.batching import BatchScheduler
    from decode_worker.policies import FixedPolicy, GammaDecision, GammaPolicy, SequencePolicy

    class _Cycle(SequencePolicy):  # every row of a batch started together cycles alike
        def __init__(self, ws: list[int]) -> None:
            self.ws = ws

        def decide(self, step: int, prefix_signals: Any) -> GammaDecision:
            from decode_worker.policies import DecisionSource

            return GammaDecision(self.ws[step % len(self.ws)], DecisionSource.LOCAL)

    class Cycle(GammaPolicy):
        def __init__(self, ws: list[int]) -> None:
            self.ws, self.spec = ws, f"cycle{ws}"

        def start(self, seq: Any) -> SequencePolicy:
            return _Cycle(self.ws)

    _, eng, _, ids = _setup(args)
    sched = BatchScheduler(eng, max_batch_size=max(16, args.rows), max_queue=16)
    log = B.step_cost_log(sched)
    arms: list[tuple[str, GammaPolicy]] = [(f"fixed:{w}", FixedPolicy(w)) for w in args.alternate]
    arms.append((f"alternating {args.alternate}", Cycle(list(args.alternate))))
    for name, pol in arms * 2:
        log.clear()
        for _ in range(args.repeats):
            _run_batch(sched, ids, pol, args.rows, args.max_new_tokens)
        by: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
        prev = None
        for b, w, sec in log:
            if b == args.rows:
                by[(w, "same" if prev == w else "changed")].append(sec * 1e3)
            prev = w
        print(
            name,
            {
                f"G={w} {k}": f"{statistics.median(v):.1f} ms × {len(v)}"
                for (w, k), v in sorted(by.items())
                if len(v) > 2
            },
        )
    sched.close(timeout=10)


def _thread_profile(raw: Path) -> str:
    """Share of the scheduler thread's samples in each part, from py-spy's raw output."""
    parts = (
        "BatchScheduler._step",
        "BatchScheduler._join",
        "BatchedKV.forward",
        "BatchedKV.keep_rows",
        "BatchedKV.extend",
        "BatchScheduler._remove_finished",
    )
    total = 0
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        names = {f.split(" (")[0] for f in stack.split(";")}
        if "BatchScheduler._loop" not in names:
            continue
        total += int(n)
        for p in parts:
            if p in names:
                counts[p] += int(n)
    return f"scheduler thread samples {total}: " + ", ".join(
        f"{p} {100 * counts[p] / max(total, 1):.0f} %" for p in parts
    )


def served(args: argparse.Namespace) -> None:
    prompts = B.prompt_texts()
    variants: dict[str, Any] = {}
    for name, threads, env in (
        ("default, 2 threads", 2, {}),
        ("OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("1 thread", 1, {}),
    ):
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            variants[name] = B.start_worker(args.pair, args.compression, threads, batching=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    total = {n: [0, 0.0] for n in variants}
    c = args.clients
    try:
        for w in variants.values():
            B.run_clients(w.address, prompts, 1, 1, args.policy, 8)
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        t_all = time.perf_counter()
        for r in range(args.repeats):
            names = B.rotated(list(variants), r)
            for n in names:
                idx = list(range(r * 3 * c, (r + 1) * 3 * c))
                samples, wall = B.client_samples(
                    variants[n].address, prompts, c, idx, args.policy, args.max_new_tokens, False
                )
                total[n][0] += sum(s[0] for s in samples)
                total[n][1] += wall
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.perf_counter() - t_all
        cpu = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
        print(
            f"{args.policy}, {c} clients: "
            + ", ".join(f"{n} {t / w:.0f} tokens/s" for n, (t, w) in total.items())
            + f"; the client process used {100 * cpu / elapsed:.0f} % of a core; "
            f"load {os.getloadavg()[0]:.2f}"
        )
        if args.py_spy:
            w = variants["default, 2 threads"]
            load = threading.Thread(
                target=B.client_samples,
                args=(
                    w.address,
                    prompts,
                    c,
                    list(range(8 * c)),
                    args.policy,
                    args.max_new_tokens,
                    False,
                ),
            )
            load.start()
            time.sleep(1.0)
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "spy.txt"
                subprocess.run(
                    [
                        args.py_spy,
                        "record",
                        "-p",
                        str(w.pid),
                        "-d",
                        "8",
                        "-r",
                        "200",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                        "--nonblocking",
                    ],
                    check=True,
                )
                load.join()
                print(_thread_profile(raw))
    finally:
        for w in variants.values():
            w.stop()


_SPLIT_KEYS = ("steps", "row_steps", "step_seconds", "forward_seconds", "joins", "join_seconds")


def _split_line(name: str, tokens: int, wall: float, st: dict[str, float], rounds: int) -> str:
    steps = max(st["steps"], 1)
    return (
        f"{name}: {tokens / wall:.0f} tokens/s | {1e3 * st['step_seconds'] / steps:.1f} ms/step "
        f"({1e3 * st['forward_seconds'] / steps:.1f} in forwards) | mean batch "
        f"{st['row_steps'] / steps:.2f} | {st['steps'] / rounds:.1f} steps and "
        f"{st['joins'] / rounds:.1f} joins per round, "
        f"{1e3 * st['join_seconds'] / max(st['joins'], 1):.1f} ms per join | "
        f"steps + joins {100 * (st['step_seconds'] + st['join_seconds']) / wall:.0f} % of the wall"
    )


def split(args: argparse.Namespace) -> None:
    """The same requests (`clients` per round, one each, all sent at once) through a serving
    worker and through a BatchScheduler in this process, each with 2 and 1 torch threads,
    arms interleaved round by round: what the serving path costs, and where."""
    import dataclasses

    import torch

    from decode_worker.batching import BatchScheduler
    from decode_worker.policies import parse_local_policy

    _, eng, prompts, ids = _setup(args)
    sched = BatchScheduler(eng, max_batch_size=16, max_queue=16)
    policy = parse_local_policy(args.policy)
    assert policy is not None, f"{args.policy}: not a local policy"
    c = args.clients
    served: dict[str, tuple[Any, int]] = {}
    for name, threads in (("served, 2 threads", 2), ("served, 1 thread", 1)):
        port = B.free_port()
        worker = B.start_worker(
            args.pair, args.compression, threads, batching=True, extra=("--metrics-port", str(port))
        )
        served[name] = (worker, port)
    arms = [*served, "in-process, 2 threads", "in-process, 1 thread"]
    total = {a: [0, 0.0] for a in arms}
    stats = {a: dict.fromkeys(_SPLIT_KEYS, 0.0) for a in arms}

    def inproc_round(idx: list[int]) -> tuple[int, float]:
        counts: list[int] = []

        def one(i: int) -> None:
            h = sched.submit(
                ids[i % len(ids)],
                policy,
                max_new_tokens=args.max_new_tokens,
                request_id=f"s{time.monotonic_ns()}-{i}",
                record=False,
            )
            for _ in h:
                pass
            assert h.result is not None
            counts.append(len(h.result.token_ids))

        wall = B.closed_loop(idx, c, one)
        return sum(counts), wall

    try:
        for worker, _ in served.values():
            B.run_clients(worker.address, prompts, 1, 1, args.policy, 8)
        inproc_round([0])
        for r in range(args.repeats):
            idx = list(range(r * c, (r + 1) * c))
            for arm in B.rotated(arms, r):
                if arm in served:
                    worker, port = served[arm]
                    before = B.scrape(port)
                    samples, wall = B.client_samples(
                        worker.address, prompts, c, idx, args.policy, args.max_new_tokens
                    )
                    after = B.scrape(port)
                    for k in _SPLIT_KEYS:
                        stats[arm][k] += after[f"batch_{k}"] - before[f"batch_{k}"]
                    tokens = sum(s[0] for s in samples)
                else:
                    torch.set_num_threads(2 if "2 threads" in arm else 1)
                    s0 = dataclasses.replace(sched.stats)
                    tokens, wall = inproc_round(idx)
                    for k in _SPLIT_KEYS:
                        stats[arm][k] += getattr(sched.stats, k) - getattr(s0, k)
                total[arm][0] += tokens
                total[arm][1] += wall
        print(f"{args.policy}, {c} clients, {args.repeats} rounds; load {os.getloadavg()[0]:.2f}")
        for arm in arms:
            print(_split_line(arm, int(total[arm][0]), total[arm][1], stats[arm], args.repeats))
    finally:
        sched.close(timeout=10)
        for worker, _ in served.values():
            worker.stop()


def contention(args: argparse.Namespace) -> None:
    """In-process scheduler steps at `rows` rows, 1 and 2 torch threads, alone and beside a
    process that keeps a core busy `duty` of the time in 1 ms bursts (about what a serving
    worker's gRPC threads and a co-located client take), arms interleaved."""
    import dataclasses

    import torch

    from decode_worker.batching import BatchScheduler
    from decode_worker.policies import FixedPolicy

    _, eng, _, ids = _setup(args)
    sched = BatchScheduler(eng, max_batch_size=max(16, args.rows), max_queue=16)
    burn = (
        "import time\n"
        f"duty, end = {args.duty}, time.time() + 600\n"
        "while time.time() < end:\n"
        "    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 0.001: pass\n"
        "    time.sleep(0.001 * (1 - duty) / duty)\n"
    )
    arms = [(t, b) for t in (2, 1) for b in (False, True)]
    ms: dict[tuple[int, bool], list[float]] = {a: [] for a in arms}
    _run_batch(sched, ids, FixedPolicy(args.gamma), args.rows, args.max_new_tokens)
    try:
        for r in range(args.repeats):
            for threads, busy in B.rotated(arms, r):
                torch.set_num_threads(threads)
                proc = subprocess.Popen([sys.executable, "-c", burn]) if busy else None
                try:
                    s0 = dataclasses.replace(sched.stats)
                    _run_batch(sched, ids, FixedPolicy(args.gamma), args.rows, args.max_new_tokens)
                    st = sched.stats
                    ms[(threads, busy)].append(
                        1e3 * (st.step_seconds - s0.step_seconds) / max(st.steps - s0.steps, 1)
                    )
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
    finally:
        sched.close(timeout=10)
    print(f"fixed:{args.gamma}, {args.rows} rows, competitor duty {args.duty}; ms per step:")
    for threads, busy in arms:
        v = ms[(threads, busy)]
        print(
            f"  {threads} thread(s), {'with' if busy else 'without'} competitor: median "
            f"{statistics.median(v):.1f} ({', '.join(f'{x:.1f}' for x in v)})"
        )
    print(f"load {os.getloadavg()[0]:.2f}")


def leave(args: argparse.Namespace) -> None:
    import torch

    from decode_worker.batching import BatchedKV, fill_order

    pair, _, _, _ = _setup(args)
    keep = [i for i in range(args.rows) if i != args.rows // 2]  # a row from the middle
    for name, model in (("target", pair.target), ("draft", pair.draft)):
        times = []
        for _ in range(20):
            kv = BatchedKV(model.config)
            kv.lengths = [0] * args.rows
            with torch.inference_mode():
                kv.forward(model, [[5] * args.width] * args.rows, 0, keep_logits=1)
                kv.commit([args.width] * args.rows)
            t0 = time.perf_counter()
            kv.keep_rows(fill_order(keep, args.rows))
            times.append(time.perf_counter() - t0)
        print(
            f"{name}: one row leaving {args.rows} rows of {args.width} positions: "
            f"median {1e3 * statistics.median(times):.3f} ms"
        )


def policy_cost(args: argparse.Namespace) -> None:
    """Per batch step: the seconds in `_plan_batch` (batch-goodput's choice of the width)
    and in the match replay's bookkeeping (`MatchTrack.resolve`, `ReplayYield.advance`;
    the draft's shared argmax and the per-position dict entries are not separated), with
    `fixed:2` rows (which keep the replay too) and `batch-goodput` rows in turn."""
    from decode_worker import match_replay
    from decode_worker.batching import BatchScheduler
    from decode_worker.policies import parse_local_policy

    _, eng, _, ids = _setup(args)
    sched = BatchScheduler(eng, max_batch_size=max(16, args.rows), max_queue=16)
    sched.warmup()
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    sched._plan_batch = timed("plan", sched._plan_batch)  # type: ignore[method-assign]
    sched.replay.advance = timed("replay", sched.replay.advance)  # type: ignore[method-assign]
    resolve = match_replay.MatchTrack.resolve
    match_replay.MatchTrack.resolve = timed("replay", resolve)  # type: ignore[method-assign]
    try:
        for spec in ("fixed:2", "batch-goodput", "fixed:2", "batch-goodput"):
            policy = parse_local_policy(spec)
            _run_batch(sched, ids, policy, args.rows, args.max_new_tokens)  # settle
            spent.clear()
            steps0, seconds0 = sched.stats.steps, sched.stats.step_seconds
            rates = [
                _run_batch(sched, ids, policy, args.rows, args.max_new_tokens)
                for _ in range(args.repeats)
            ]
            time.sleep(0.2)  # the last step adds its seconds after its rows finished
            steps = sched.stats.steps - steps0
            step_ms = 1e3 * (sched.stats.step_seconds - seconds0) / steps
            plan_ms, replay_ms = (1e3 * spent[k] / steps for k in ("plan", "replay"))
            print(
                f"{spec}, {args.rows} rows: {steps} steps, {step_ms:.2f} ms/step; planning "
                f"{plan_ms:.3f} ms/step ({100 * plan_ms / step_ms:.1f} %), replay bookkeeping "
                f"{replay_ms:.3f} ms/step ({100 * replay_ms / step_ms:.1f} %); "
                f"{[round(r) for r in rates]} tokens/s; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    finally:
        match_replay.MatchTrack.resolve = resolve  # type: ignore[method-assign]
        sched.close(timeout=10)


def served_ab(args: argparse.Namespace) -> None:
    """batch.py runs one worker per policy, so a policy's ratio there also carries whatever
    differs between two worker processes. Here two workers each serve every policy (the
    policy is per request): the arms (worker, policy) run the same requests in rotated
    order each round. The first policy ÷ each other within a worker is the policies'
    effect; worker 1 ÷ worker 2 under one policy is the processes' (an A/A test). With
    more fixed policies beside `batch-goodput`, their steps also measure widths it would
    not run itself, which its cost line then fits through (a served worker with one policy
    does not get that)."""
    prompts = B.prompt_texts()
    workers = {
        n: B.start_worker(args.pair, args.compression, args.threads, batching=True)
        for n in ("w1", "w2")
    }
    arms = [(w, p) for w in workers for p in args.policies]
    c = args.clients
    got: dict[tuple[str, str], list[tuple[int, float]]] = {a: [] for a in arms}
    try:
        for w in workers.values():
            B.run_clients(w.address, prompts, 1, 1, args.policies[0], 8)
        for r in range(args.repeats):
            idx = list(range(r * 3 * c, (r + 1) * 3 * c))
            for w, p in B.rotated(arms, r):
                samples, wall = B.client_samples(
                    workers[w].address, prompts, c, idx, p, args.max_new_tokens, False
                )
                got[(w, p)].append((sum(x[0] for x in samples), wall))
    finally:
        for w in workers.values():
            w.stop()

    def rate(a: tuple[str, str]) -> float:
        return sum(n for n, _ in got[a]) / sum(s for _, s in got[a])

    def per_round(a: tuple[str, str], b: tuple[str, str]) -> list[float]:
        return [
            round((n1 / s1) / (n2 / s2), 2)
            for (n1, s1), (n2, s2) in zip(got[a], got[b], strict=True)
        ]

    print(
        f"{c} clients, {3 * c} requests per round, {args.repeats} rounds: "
        + ", ".join(f"{w} {p} {rate((w, p)):.0f}" for w, p in arms)
        + f" tokens/s; load {os.getloadavg()[0]:.2f}"
    )
    a = args.policies[0]
    for w in workers:
        for b in args.policies[1:]:
            print(f"  {w}: {a} ÷ {b} = {rate((w, a)) / rate((w, b)):.3f}, per round "
                  f"{per_round((w, a), (w, b))}")  # fmt: skip
    for p in args.policies:
        print(f"  {p}: w1 ÷ w2 = {rate(('w1', p)) / rate(('w2', p)):.3f}, per round "
              f"{per_round(('w1', p), ('w2', p))}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.local_engine_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("inproc")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--gamma", type=int, default=2)
    p = sub.add_parser("widths")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--alternate", type=int, nargs="+", default=[1, 2])
    p = sub.add_parser("served")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--policy", default="fixed:2")
    p.add_argument("--py-spy", help="path of a py-spy binary: also profile the default worker")
    p = sub.add_parser("split")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--policy", default="fixed:2")
    p = sub.add_parser("contention")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--duty", type=float, default=0.15)
    p = sub.add_parser("leave")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--width", type=int, default=80)
    p = sub.add_parser("policy-cost")
    p.add_argument("--rows", type=int, default=8)
    p = sub.add_parser("served-ab")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--policies", nargs="+", default=["fixed:2", "batch-goodput"])
    args = ap.parse_args(argv)
    if args.what == "served-ab" and len(args.policies) < 2:
        ap.error("served-ab compares policies: give at least two with --policies")
    run = {
        "inproc": inproc,
        "widths": widths,
        "served": served,
        "split": split,
        "contention": contention,
        "leave": leave,
        "policy-cost": policy_cost,
        "served-ab": served_ab,
    }
    run[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
