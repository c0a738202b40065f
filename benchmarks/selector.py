"""`make selector`: train the in-step selector on the demo pair and register it.

Steps (each reused when its output exists; `--fresh` redoes all):
1. build or reuse the demo tiny pair (`speckv-tiny-pair --size demo`);
2. log token records on the *training* prompts only (`speckv-eval log-steps --tokens-out`,
   random γ per step so every draft length and history state is seen; evaluation prompts
   are refused by log-steps);
3. train a `draft_plan` model (`speckv-predictor train --model-kind instep`) into a staging
   repository, tune its two stop-threshold scales on the training prompts by exact replay
   (`speckv-eval tune-plan`), and register the tuned model (same data and seed, so the same
   weights) as `speckv-instep` in `.cache/selector/repo`, the repository's only (so
   default) model.

Then, as the README says:

    speckv-predictor serve --repo .cache/selector/repo --port 50061
    speckv-worker serve --draft .cache/tiny-pair/demo-seed0/draft \\
        --target .cache/tiny-pair/demo-seed0/target --compression nf4 \\
        --predictor 127.0.0.1:50061 --policy remote

runs the learned selector (the worker learns the draft_plan window from the model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "speckv-instep"


def log(msg: str) -> None:
    print(f"[selector] {msg}", flush=True)


def run(cmd: list[str | Path]) -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.strip()
    if out:
        print(out, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache")
    p.add_argument("--pair-size", default="demo", choices=("test", "demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--explore-runs", type=int, default=2)
    p.add_argument("--corpus-snippets", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-tune", action="store_true", help="keep the scales at 1.0")
    p.add_argument("--fresh", action="store_true", help="redo the log and the training")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    pair = args.cache / "tiny-pair" / f"{args.pair_size}-seed{args.seed}"
    run(
        [
            BIN / "speckv-tiny-pair",
            "--out",
            pair,
            "--size",
            args.pair_size,
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
        ]
    )
    work = args.cache / "selector"
    tokens = work / "tokens.csv"
    steps = work / "steps.csv"
    repo = work / "repo"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not tokens.exists():
        for f in (tokens, steps):
            f.unlink(missing_ok=True)
        run(
            [
                BIN / "speckv-eval",
                "log-steps",
                "--pair",
                pair,
                "--out",
                steps,
                "--tokens-out",
                tokens,
                "--gammas",
                "--explore-runs",
                str(args.explore_runs),
                "--corpus-snippets",
                str(args.corpus_snippets),
                "--threads",
                str(args.threads),
            ]
        )
    else:
        log(f"reusing {tokens}")
    if not any((repo / MODEL).glob("*/manifest.json")):
        first, cont = 1.0, 1.0
        if not args.no_tune:
            staging = work / "staging"
            shutil.rmtree(staging, ignore_errors=True)
            run(
                [
                    *(BIN / "speckv-predictor", "train", "--model-kind", "instep"),
                    *("--data", tokens, "--repo", staging, "--name", MODEL, "--quiet"),
                ]
            )
            tuned = json.loads(
                run(
                    [
                        *(BIN / "speckv-eval", "tune-plan", "--pair", pair),
                        *("--model", staging / MODEL / "1", "--threads", str(args.threads)),
                        *("--json", work / "tune.json"),
                    ]
                )
            )
            first = tuned["best"]["first_scale"]
            cont = tuned["best"]["continue_scale"]
            log(
                f"tuned on the training prompts: first {first}, continue {cont} "
                f"(speed-up over target {tuned['best']['score']:.3f} vs "
                f"{tuned['default']['score']:.3f} at 1.0, 1.0)"
            )
        out = run(
            [
                BIN / "speckv-predictor",
                "train",
                "--model-kind",
                "instep",
                "--data",
                tokens,
                "--repo",
                repo,
                "--name",
                MODEL,
                "--first-scale",
                str(first),
                "--continue-scale",
                str(cont),
                "--quiet",
            ]
        )
        summary = json.loads(out.splitlines()[-1])
        log(
            f"registered {MODEL} v{summary['version']}: held-out prompts AUC "
            f"{summary['heldout_prompts_auc']:.3f}, MSE {summary['heldout_runs_mse']:.4f}"
        )
    else:
        log(f"reusing {repo / MODEL}")
    log(f"done in {time.perf_counter() - t0:.0f} s; serve it with:")
    print(
        f"  speckv-predictor serve --repo {repo} --port 50061\n"
        f"  speckv-worker serve --draft {pair}/draft --target {pair}/target "
        "--compression nf4 --predictor 127.0.0.1:50061 --policy remote"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
