"""Does a drafted position's acceptance depend on how the previous step ended? For each fixed
γ, decode the evaluation prompts alone (no batch) and count the first drafted position's
acceptance after a step that accepted every draft ("full"), after one that rejected one
("rej"), and at a sequence's first step ("start"); plus the second position given the first
was accepted. A model of per-position rates that ignores the previous step (batch-goodput's,
docs/worker.md "Batching") prices every γ from the same rates; where these differ by γ, it
misjudges one γ against another.

    .venv/bin/python benchmarks/acceptance_alignment.py --pair .cache/tiny-pair/demo-seed0 \
        --compression fp16 --gammas 1 2 3 --prompts 24
"""

from __future__ import annotations

import argparse
import collections

import batch as B  # benchmarks/batch.py, beside this script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.local_engine_args(ap)
    ap.add_argument("--gammas", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--prompts", type=int, default=24)
    args = ap.parse_args(argv)

    from decode_worker.policies import FixedPolicy

    _, eng, _, ids = B.local_engine(
        args.pair, args.compression, args.threads, max_gamma=max(args.gammas)
    )
    for gamma in args.gammas:
        c: collections.Counter[tuple[str, str]] = collections.Counter()
        tokens = steps = 0
        for i in range(args.prompts):
            run = eng.start(ids[i % len(ids)], FixedPolicy(gamma),
                            max_new_tokens=args.max_new_tokens, record=False)  # fmt: skip
            prev: bool | None = None
            for st in run:
                if st.gamma != gamma:  # the last steps, capped by the tokens left
                    continue
                state = "start" if prev is None else ("full" if prev else "rej")
                c[(state, "try")] += 1
                c[(state, "ok")] += st.accepted >= 1
                if gamma >= 2 and st.accepted >= 1:
                    c[("p2", "try")] += 1
                    c[("p2", "ok")] += st.accepted >= 2
                prev = st.accepted == st.gamma
                tokens += st.accepted + 1
                steps += 1
        rates = {
            s: f"p1 {c[(s, 'ok')] / max(c[(s, 'try')], 1):.2f} (n {c[(s, 'try')]})"
            for s in ("start", "full", "rej")
        }
        p2 = c[("p2", "ok")] / max(c[("p2", "try")], 1) if gamma >= 2 else float("nan")
        print(f"γ={gamma}: tokens/step {tokens / max(steps, 1):.2f}; after " +
              "; ".join(f"{k}: {v}" for k, v in rates.items()) + f"; p2 given p1 {p2:.2f}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
