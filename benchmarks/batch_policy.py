"""In-process A/B of batch policies: one `BatchScheduler` per arm over one loaded pair (no
gRPC, no client process), N client threads per arm, the arms interleaved in rounds on the
same requests. It isolates what a policy chooses from the serving path's overhead and the
machine's drift, and prints per arm the measured (batch size, width) → step milliseconds,
and for `batch-goodput` its acceptance model and cost table at the end of each level.

    flock /tmp/bench.lock .venv/bin/python benchmarks/batch_policy.py \
        --pair .cache/tiny-pair/demo-seed0 --compression fp16 --sizes 1 4 8 16 \
        --rounds 4 --per-client 3 --arms batch-goodput fixed:1 fixed:2 fixed:3

Tokens/s of an arm at a size = its tokens over its summed round walls. `batch-goodput`'s
scheduler runs the warm-up a serving worker runs; the fixed arms' do not need it.

"modeled" tokens/s takes the machine's noise out of the comparison of what the arms chose:
every step an arm ran is priced at the median milliseconds of its (batch size, verify
width) over all arms' steps at that level, and an arm's tokens are divided by the sum
(steps only: joins are left out, they are the same requests for every arm). With greedy
decoding an arm's tokens per step do not depend on the machine, so for the fixed arms this
number moves only with the pooled medians; a step after G = 0 steps (its draft catches up)
is priced as a plain step of its shape, which flatters an arm that runs G = 0 a little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import batch as B  # benchmarks/batch.py, beside this script

# batch-goodput arms: the policy as a serving worker runs it, and variants of its scheduler
# options to compare with it (each an arm name → BatchScheduler keyword arguments).
GOODPUT_VARIANTS: dict[str, dict[str, Any]] = {
    "batch-goodput": {},
    # every row priced with the pooled replay, to compare with the per-row pricing
    "batch-goodput-pooled": {"row_prior_steps": None},
    # the rows' own prices may choose any width, not only G = 0 and the pooled choice ± 1
    "batch-goodput-anywhere": {"row_reach": None},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.local_engine_args(ap)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=3, help="requests per client per round")
    ap.add_argument("--arms", nargs="+", default=["batch-goodput", "fixed:1", "fixed:2", "fixed:3"])
    args = ap.parse_args(argv)
    from decode_worker.batching import BATCH_GAMMAS, BatchScheduler
    from decode_worker.policies import PolicyError, parse_local_policy

    for arm in args.arms:
        if arm in GOODPUT_VARIANTS:
            continue
        try:
            if parse_local_policy(arm) is None:
                raise PolicyError(f"{arm!r} is not a local policy")
        except PolicyError as err:
            ap.error(f"--arms: {err} (batch-goodput variants: {', '.join(GOODPUT_VARIANTS)})")

    _, eng, _, ids = B.local_engine(args.pair, args.compression, args.threads)
    scheds: dict[str, Any] = {}
    logs: dict[str, list[tuple[int, int, float]]] = {}
    for arm in args.arms:
        s = BatchScheduler(eng, max_batch_size=16, max_queue=64, **GOODPUT_VARIANTS.get(arm, {}))
        logs[arm] = B.step_cost_log(s)
        if arm in GOODPUT_VARIANTS:
            s.warmup()
        scheds[arm] = s

    def run(arm: str, clients: int, idx: list[int]) -> tuple[int, float]:
        s, lock, toks = scheds[arm], threading.Lock(), [0]

        def request(i: int) -> None:
            h = s.submit(
                ids[i % len(ids)],
                parse_local_policy("batch-goodput" if arm in GOODPUT_VARIANTS else arm),
                max_new_tokens=args.max_new_tokens,
                request_id=f"{arm}-{i}-{time.monotonic_ns()}",
                record=False,
            )
            for _ in h:
                pass
            with lock:
                toks[0] += len(h.result.token_ids)

        wall = B.closed_loop(idx, clients, request)  # before reading toks: it fills them
        return toks[0], wall

    for arm in args.arms:
        run(arm, 1, [0])  # first-request setup
    for b in args.sizes:
        for log in logs.values():
            log.clear()
        shapes0 = {a: dict(scheds[a].stats.shapes) for a in args.arms}
        total = {a: [0, 0.0] for a in args.arms}
        rounds: dict[str, list[float]] = {a: [] for a in args.arms}
        for r in range(args.rounds):
            idx = list(range(r * b * args.per_client, (r + 1) * b * args.per_client))
            k = r % len(args.arms)
            for arm in args.arms[k:] + args.arms[:k]:
                n, wall = run(arm, b, idx)
                total[arm][0] += n
                total[arm][1] += wall
                rounds[arm].append(round(n / wall))
        rate = {a: total[a][0] / total[a][1] for a in args.arms}
        print(f"b={b} tokens/s " + " ".join(f"{a} {rate[a]:.0f} {rounds[a]}" for a in args.arms)
              + f" | load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        for arm in args.arms:
            cells: dict[tuple[int, int], list[float]] = {}
            for bb, w, sec in logs[arm]:
                cells.setdefault((bb, w), []).append(sec * 1e3)
            shown = [
                f"{k}:{statistics.median(v):.1f}×{len(v)}"
                for k, v in sorted(cells.items())
                if len(v) > 2
            ]
            print(f"   {arm} steps (b, G): median ms × count " + " ".join(shown))
        modeled = _modeled(args.arms, logs, shapes0, scheds, total)
        print("   modeled tokens/s " + " ".join(f"{a} {v:.0f}" for a, v in modeled.items()))
        goodput = [a for a in args.arms if a in GOODPUT_VARIANTS]
        fixed = [a for a in args.arms if a not in goodput]
        for g_arm in goodput:
            s = scheds[g_arm]
            if fixed:
                best = max(fixed, key=lambda a: rate[a])
                print(f"   {g_arm} / best fixed ({best}) = {rate[g_arm] / rate[best]:.3f}")
                best_m = max(fixed, key=lambda a: modeled[a])
                print(
                    f"   modeled: {g_arm} / best fixed ({best_m}) = "
                    f"{modeled[g_arm] / modeled[best_m]:.3f}"
                )
            table = s.costs.step_table(b, BATCH_GAMMAS)
            print(
                f"   {g_arm} chose",
                dict(sorted(s.stats.chosen.get(b, {}).items())),
                "| E(γ) replayed",
                [round(x, 2) for x in s.replay.expected(s.yields.expected(6))],
                "position model",
                [round(x, 2) for x in s.yields.expected(6)],
                "| T(b, G) ms",
                {g: round(v * 1e3, 1) for g, v in table.items()},
            )
    for s in scheds.values():
        s.close(timeout=10)
    return 0


def _modeled(
    arms: list[str],
    logs: dict[str, list[tuple[int, int, float]]],
    shapes0: dict[str, dict[tuple[int, int], int]],
    scheds: dict[str, Any],
    total: dict[str, list[Any]],
) -> dict[str, float]:
    """Per arm: its tokens over its steps priced at the pooled median ms of their shapes."""
    cells: dict[tuple[int, int], list[float]] = {}
    for log in logs.values():
        for bb, w, sec in log:
            cells.setdefault((bb, w), []).append(sec)
    med = {k: statistics.median(v) for k, v in cells.items()}
    out = {}
    for arm in arms:
        seconds = 0.0
        for shape, n in scheds[arm].stats.shapes.items():
            n -= shapes0[arm].get(shape, 0)
            if n <= 0:
                continue
            if shape not in med:  # only catch-up steps ran at this shape: nearest width
                near = [k for k in med if k[0] == shape[0]]
                if not near:
                    continue
                shape = min(near, key=lambda k: abs(k[1] - shape[1]))
            seconds += n * med[shape]
        out[arm] = total[arm][0] / seconds if seconds else float("nan")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
