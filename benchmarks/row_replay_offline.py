"""Offline: how much can pricing each row by its own text gain over the best fixed draft
length? (docs/design.md, "The batch's draft length".)

With greedy decoding a row's steps at any draft length are a function of its agreement
sequence m (match_replay.py), so once m is known for every prompt, any γ policy can be run
on paper. This script decodes the prompt mix once with the target alone (greedy), reads m
from one teacher-forced draft forward per prompt, and then runs on each split of the
prompts (half to pool, half to evaluate):

- every fixed γ;
- `pooled`: the γ the pooled replay of the pooling half prices best (one γ for all);
- `per-row`: before each step, every row's own replay over the m it has revealed so far
  (positions before the last one it generated), shrunk towards the pooled value by
  `--prior-steps` pseudo-steps (`ReplayYield.row_expected`, as `batch-goodput` does),
  and the batch's G maximising Σ_i E_i(G) / T(b, G).

Step seconds T(b, G) come from `--costs-ms` (defaults: the fixed arms' median step
milliseconds in `benchmarks/results/batch_runs/policy_ab_fp16_replay_decay999.txt`); a batch
of b rows is refilled from the evaluation half as rows finish, as a serving batch is (its
last steps, with fewer rows, are priced at T(b, G) too). A
request's last steps (where its remaining tokens would cap γ) are left out for every arm.

    .venv/bin/python benchmarks/row_replay_offline.py --pair .cache/tiny-pair/demo-seed0 \
        --compression fp16 --max-new-tokens 64 --splits 20
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import batch as B  # benchmarks/batch.py, beside this script

from decode_worker.batching import ROW_PRIOR_STEPS, choose_in_table
from decode_worker.match_replay import ReplayYield, replay_steps

# Median ms of a batch step per (batch size, G), fixed arms, policy_ab_fp16_replay_decay999.txt.
DEFAULT_COSTS = {
    1: {0: 10.5, 1: 16.9, 2: 21.8, 3: 22.6},
    8: {0: 24.3, 1: 28.2, 2: 35.2, 3: 43.7},
}

Chooser = Callable[[list[list[bool]]], int]


def agreement(pair: Any, eng: Any, ids: Sequence[Sequence[int]], new: int) -> list[list[bool]]:
    """m for every prompt: the target's greedy continuation (fixed:0, the engine's own
    plain decoding) and the draft's argmax after each true prefix, from one forward."""
    import torch

    from decode_worker.policies import FixedPolicy

    out = []
    for i, p in enumerate(ids):
        run = eng.start(p, FixedPolicy(0), max_new_tokens=new, record=False)
        for _ in run:
            pass
        seq = [*p, *run.result.token_ids]
        with torch.inference_mode():
            logits = pair.draft(torch.tensor([seq])).logits[0]
        arg = logits[:, : pair.vocab_size].argmax(-1).tolist()
        out.append([arg[t - 1] == seq[t] for t in range(len(p), len(seq))])
        print(f"\ragreement {i + 1}/{len(ids)}", end="", flush=True)
    print()
    return out


def step_tokens(m: Sequence[bool], s: int, g: int) -> int | None:
    """Tokens a step of draft length g from position s makes; None when m ends first."""
    if s >= len(m):
        return None
    if g == 0:
        return 1
    done, _ = replay_steps(m[: s + g], g, s)  # at most the first step can complete there
    return done[0] if done else None


def run_batch(seqs: list[list[bool]], b: int, costs: dict[int, float], choose: Chooser) -> float:
    """Tokens per second of a batch of b rows refilled from `seqs`, G chosen per step."""
    todo = list(seqs)
    rows: list[tuple[list[bool], int]] = []  # (m, next position)
    tokens = ms = 0.0
    while todo or rows:
        while todo and len(rows) < b:
            rows.append((todo.pop(0), 0))
        g = choose([m[: max(s - 1, 0)] for m, s in rows])
        kept = []
        for m, s in rows:
            n = step_tokens(m, s, g)
            if n is not None:
                tokens += n
                kept.append((m, s + n))
        ms += costs[g]
        rows = kept
    return tokens / ms * 1000


def fixed(g: int) -> Chooser:
    return lambda _hists: g


def pooled_expected(seqs: list[list[bool]], gammas: Sequence[int]) -> list[float]:
    """E(γ) for γ = 0 … max(gammas) from every γ's replay over `seqs`: the scheduler's
    pooled replay (`ReplayYield`) with no forgetting and no prior."""
    top = max(gammas)
    replay = ReplayYield(range(1, top + 1), decay=1.0, prior_steps=0.0)
    for m in seqs:
        track = replay.track(0)
        track.matches = list(m)
        replay.advance(track)
    return replay.expected([1.0] * (top + 1))


def per_row(pooled: list[float], costs: dict[int, float], prior_steps: float) -> Chooser:
    gammas = [g for g in sorted(costs) if g > 0]

    def choose(hists: list[list[bool]]) -> int:
        tables = []
        for h in hists:
            # Each row's own replay, through the scheduler's code (the pooled sums this
            # throwaway ReplayYield keeps are not used).
            replay = ReplayYield(gammas, decay=1.0)
            track = replay.track(0)
            track.matches = list(h)
            replay.advance(track)
            tables.append(ReplayYield.row_expected(track, pooled, prior_steps))
        # The scheduler's choice over these step costs, every width open to the rows' own
        # prices (`reach` None: the rule this script's documented run measured).
        widths = sorted(costs)
        g = choose_in_table(tables, pooled, [widths[-1]] * len(tables), costs, widths, None)
        assert g is not None  # every width has a cost
        return g

    return choose


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.local_engine_args(ap, max_new_tokens=64)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--prior-steps", type=float, default=ROW_PRIOR_STEPS)
    ap.add_argument("--sizes", nargs="+", type=int, default=sorted(DEFAULT_COSTS))
    ap.add_argument(
        "--costs-ms",
        nargs="*",
        default=[],
        help="b:g=ms,g=ms,… per batch size (e.g. 1:0=10.5,1=16.9,2=21.8,3=22.6)",
    )
    args = ap.parse_args(argv)
    costs = {b: dict(c) for b, c in DEFAULT_COSTS.items()}
    for spec in args.costs_ms:
        size, _, cells = spec.partition(":")
        costs[int(size)] = {int(g): float(v) for g, v in (c.split("=") for c in cells.split(","))}
    missing = [b for b in args.sizes if b not in costs]
    if missing:
        ap.error(f"no step costs for batch sizes {missing}: give them with --costs-ms")

    pair, eng, _, ids = B.local_engine(args.pair, args.compression, args.threads)
    seqs = agreement(pair, eng, ids, args.max_new_tokens)
    print(f"{len(seqs)} prompts × {args.max_new_tokens} tokens, agreement "
          f"{sum(map(sum, seqs)) / sum(map(len, seqs)):.3f}")  # fmt: skip
    rng = random.Random(0)
    for b in args.sizes:
        cost = costs[b]
        ratios: dict[str, list[float]] = {"per-row": [], "pooled": []}
        for _ in range(args.splits):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            half = len(order) // 2
            pool, test = [seqs[i] for i in order[:half]], [seqs[i] for i in order[half:]]
            pooled = pooled_expected(pool, [g for g in cost if g > 0])
            by_gamma = {g: run_batch(test, b, cost, fixed(g)) for g in cost}
            best = max(by_gamma.values())
            g_pool = max(cost, key=lambda g: pooled[g] / cost[g])
            ratios["pooled"].append(by_gamma[g_pool] / best)
            rate = run_batch(test, b, cost, per_row(pooled, cost, args.prior_steps))
            ratios["per-row"].append(rate / best)
        print(f"b={b} costs ms {cost}; ÷ the best fixed γ on the evaluation half, "
              f"{args.splits} splits: " + "; ".join(
                  f"{k} mean {statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]"
                  for k, v in ratios.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
