"""`speckv-eval replay`: exact counterfactual replay of every γ policy on a real pair."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from speckv_client.flags import default_of

from speckv_eval.replay_run import ReplayConfig, gamma_shares, run_replay
from speckv_eval.services import pair_fingerprint

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "prompts.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pair",
        type=Path,
        default=None,
        help="pair folder holding draft/ and target/ (e.g. .cache/tiny-pair/demo)",
    )
    parser.add_argument("--draft", default=None, help="draft model dir or hub name (not --pair)")
    parser.add_argument("--target", default=None, help="target model dir or hub name")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL prompt set")
    parser.add_argument(
        "--compression",
        nargs="+",
        default=list(default_of(ReplayConfig, "compressions")),
        choices=["fp16", "int8", "nf4"],
        help="target compressions to replay (one target run per prompt each)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=default_of(ReplayConfig, "max_new_tokens")
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=default_of(ReplayConfig, "limit"),
        help="use the first N prompts (0: all)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="a model version folder (<repo>/<name>/<version>) to replay as a predictor "
        "policy with both objectives; repeat for several",
    )
    parser.add_argument("--max-gamma", type=int, default=default_of(ReplayConfig, "max_gamma"))
    parser.add_argument(
        "--threads", type=int, default=default_of(ReplayConfig, "threads"), help="torch CPU threads"
    )
    parser.add_argument(
        "--device", default=default_of(ReplayConfig, "device"), choices=["cpu", "cuda", "auto"]
    )
    parser.add_argument("--csv-dir", type=Path, default=None, help="write tables as CSV here")
    parser.add_argument("--img-dir", type=Path, default=None, help="write PNG plots here")


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    if args.pair is not None:
        draft, target = str(args.pair / "draft"), str(args.pair / "target")
        if not (args.pair / "draft").is_dir() or not (args.pair / "target").is_dir():
            raise SystemExit(
                f"--pair {args.pair}: expected draft/ and target/ inside; build the tiny pair "
                "with `speckv-tiny-pair --out DIR --size demo`"
            )
    elif args.draft and args.target:
        draft, target = args.draft, args.target
    else:
        raise SystemExit("give --pair DIR, or both --draft and --target")
    if args.max_new_tokens < 2:
        raise SystemExit(f"--max-new-tokens must be ≥ 2, got {args.max_new_tokens}")
    for m in args.model:
        if not (m / "manifest.json").is_file():
            raise SystemExit(f"--model {m}: no manifest.json; pass <repo>/<name>/<version>")
    return ReplayConfig(
        draft=draft,
        target=target,
        prompts=args.prompts,
        compressions=tuple(args.compression),
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        models=tuple(args.model),
        max_gamma=args.max_gamma,
        device=args.device,
        threads=args.threads,
    )


def calibration_summary(results: list[Any]) -> list[dict[str, Any]]:
    """Per predictor policy and compression: predicted vs actual acceptance of the steps
    it decided (n, means, correlation, mean absolute error)."""
    out = []
    for r in results:
        for run_ in r.runs:
            if not run_.calibration:
                continue
            cal = np.asarray(run_.calibration, dtype=float)
            pred, act = cal[:, 1], cal[:, 2]
            corr = float(np.corrcoef(pred, act)[0, 1]) if len(act) > 2 else float("nan")
            out.append(
                {
                    "policy": run_.name,
                    "compression": r.compression,
                    "steps": len(act),
                    "mean_predicted": round(float(pred.mean()), 3),
                    "mean_actual": round(float(act.mean()), 3),
                    "corr": round(corr, 3),
                    "mae": round(float(np.abs(pred - act).mean()), 3),
                }
            )
    return out


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    results = run_replay(cfg)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for r in results:
            c = r.costs
            n_tok = sum(len(t.output) for t in r.traces)
            print(
                f"\n## {r.compression}: {len(r.traces)} prompts, {n_tok} greedy tokens, "
                f"replayed in {r.seconds:.0f} s ({r.draft_forwards} off-path draft forwards)"
            )
            print(
                f"measured: draft {1e3 * c.draft_per_token:.2f} ms/token; target forward "
                + ", ".join(f"γ={g}: {1e3 * c.verify[g]:.2f}" for g in (0, 1, 2, 4, 8, 16))
                + " ms (min over interleaved rounds); linear fit base "
                f"{1e3 * c.model.verify_base_seconds:.2f} ms + "
                f"{1e3 * c.model.verify_seconds_per_token:.2f} ms/γ over γ ≥ 1 "
                "(γ = 0 steps: measured); "
                "cost ratio draft/target(γ=0) "
                f"{c.draft_per_token / c.verify[0]:.2f}"
            )
            target_wall = sum(t.target_seconds for t in r.traces)
            print(f"target-only engine runs (wall, incl. prefill): {n_tok / target_wall:.1f} tok/s")
            print(r.table.to_string(index=False))
            print("\nchosen γ (share of steps):")
            for run_ in r.runs:
                shares = gamma_shares(run_)
                print(
                    f"  {run_.name}: "
                    + ", ".join(f"{g}: {100 * s:.0f}%" for g, s in sorted(shares.items()))
                )
    if args.csv_dir is not None:
        args.csv_dir.mkdir(parents=True, exist_ok=True)
        for r in results:
            path = args.csv_dir / f"replay_{r.compression}.csv"
            r.table.to_csv(path, index=False)
            print(f"wrote {path}")
            gpath = args.csv_dir / f"replay_gamma_{r.compression}.csv"
            pd.DataFrame(
                [
                    {"policy": run_.name, "gamma": g, "share of steps": round(s, 4)}
                    for run_ in r.runs
                    for g, s in sorted(gamma_shares(run_).items())
                ]
            ).to_csv(gpath, index=False)
            print(f"wrote {gpath}")
        meta = {
            "command": "speckv-eval " + " ".join(sys.argv[1:]),
            "pair_fingerprint": pair_fingerprint(cfg.draft, cfg.target),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "compressions": [
                {
                    "compression": r.compression,
                    "prompts": len(r.traces),
                    "greedy_tokens": sum(len(t.output) for t in r.traces),
                    "seconds": round(r.seconds, 1),
                    "draft_ms_per_token": round(1e3 * r.costs.draft_per_token, 3),
                    "verify_ms_by_gamma": [round(1e3 * v, 3) for v in r.costs.verify],
                    "verify_fit_ms_gamma_ge_1": [
                        round(1e3 * x, 3)
                        for x in (
                            r.costs.model.verify_base_seconds,
                            r.costs.model.verify_seconds_per_token,
                        )
                    ],
                }
                for r in results
            ],
        }
        meta["calibration"] = calibration_summary(results)
        mpath = args.csv_dir / "replay_meta.json"
        mpath.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {mpath}")
    if args.img_dir is not None:
        from speckv_eval.plots import plot_replay

        for path in plot_replay(args.img_dir, results):
            print(f"wrote {path}")
    return 0
