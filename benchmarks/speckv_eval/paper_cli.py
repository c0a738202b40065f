"""`speckv-eval paper`: the seed's tables reproduced, then the honest variants beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from speckv_client.flags import default_of

from speckv_eval.paper import (
    HonestResult,
    PaperConfig,
    SeedReproduction,
    compare_to_paper,
    gamma_counts,
    honest_protocols,
    reproduce_seed,
)
from speckv_eval.paper_data import default_data_dir, load_steps

TOLERANCE = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="seed data folder (default: the project copy predictor_service/data/speckv-paper)",
    )
    parser.add_argument(
        "--n-boot-ci",
        type=int,
        default=default_of(PaperConfig, "n_boot_ci"),
        help="bootstrap resamples per CI",
    )
    parser.add_argument(
        "--n-boot-paired",
        type=int,
        default=default_of(PaperConfig, "n_boot_paired"),
        help="paired bootstrap resamples",
    )
    parser.add_argument("--no-honest", action="store_true", help="only reproduce the seed")
    parser.add_argument("--csv-dir", type=Path, default=None, help="also write every table as CSV")
    parser.add_argument("--img-dir", type=Path, default=None, help="write PNG plots here")


def config_from_args(args: argparse.Namespace) -> PaperConfig:
    data = args.data if args.data is not None else default_data_dir()
    if args.n_boot_ci < 10 or args.n_boot_paired < 10:
        raise SystemExit("--n-boot-ci and --n-boot-paired must be at least 10")
    return PaperConfig(
        data_dir=data,
        n_boot_ci=args.n_boot_ci,
        n_boot_paired=args.n_boot_paired,
        honest=not args.no_honest,
    )


def _show(title: str, df: pd.DataFrame) -> None:
    print(f"\n## {title}\n")
    print(df.to_string(index=False))


def print_seed(rep: SeedReproduction, diff: pd.DataFrame) -> None:
    _show("Seed Table 1 (reproduced): mean expected tokens per step, seed protocol", rep.table1)
    _show("Seed Table 2 (reproduced): Fixed-4 vs SpecKV-fast by compression × task", rep.table2)
    _show("Seed bootstrap 95% CIs (reproduced)", rep.ci)
    lo, hi = rep.diff_ci
    print(
        f"\nPaired bootstrap SpecKV-fast − Fixed-4: mean diff {rep.mean_diff:.3f} "
        f"tokens/step, 95% CI [{lo:.3f}, {hi:.3f}], one-sided p = {rep.p_value:.4f} "
        "(paper: 2.091, p = 0.0)"
    )
    print(
        f"MLP-16 on the stratified 80/20 split: test MSE {rep.mlp_test_mse:.4f}, "
        f"corr {rep.mlp_test_corr:.4f} (paper: 0.0896, 0.6853)"
    )
    _show("How often SpecKV-fast chooses each γ (seed protocol)", gamma_counts(rep.steps))
    _show(
        "How often SpecKV-accurate (RF-100) chooses each γ (seed protocol)",
        gamma_counts(rep.steps, "SpecKV-accurate"),
    )
    worst = diff.loc[diff["abs_diff"].idxmax()]
    verdict = "within" if worst["abs_diff"] <= TOLERANCE else "OUTSIDE"
    print(
        f"\nAgainst the published tables: {len(diff)} numbers, largest difference "
        f"{worst['abs_diff']:.3f} ({worst['table']} {worst['cell']}): {verdict} ±{TOLERANCE}"
    )


def print_honest(h: HonestResult) -> None:
    _show(
        "Honest ladder: overall mean tokens per step (steps that have a previous step)",
        h.ladder,
    )
    _show(
        "Table 1, honest (held-out runs, previous_step features, judged by observed outcome)",
        h.final_table1,
    )
    _show("Table 2, honest", h.final_table2)
    _show(
        "Share of judged steps where the policy asked for more tokens than the run drafted "
        "and all were accepted (tail from a per-token rate fitted on other prompts)",
        h.censored_share,
    )
    for label, shares in h.gamma_shares.items():
        _show(f"γ chosen — {label}", shares)
    for name, (mean, p, lo, hi) in h.paired.items():
        print(
            f"\nPaired bootstrap (honest) {name}: {mean:+.3f} tokens/step, "
            f"95% CI [{lo:.3f}, {hi:.3f}], one-sided p(≤0) = {p:.4f}"
        )
    _show("Seed's own wall clock: mean tokens/s by compression × γ", h.wallclock_by_gamma)
    _show("Seed's own wall clock: ms per speculation step by compression × γ", h.step_seconds)
    _show(
        "Modelled tokens/s per policy (judged tokens / the seed's ms per step at the chosen γ)",
        h.wallclock_policies,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    steps = load_steps(cfg.data_dir)
    print(f"Loaded {len(steps)} step records from {cfg.data_dir}")
    rep = reproduce_seed(cfg, steps)
    diff = compare_to_paper(rep, cfg.data_dir)
    print_seed(rep, diff)
    honest = None
    if cfg.honest:
        from tqdm import tqdm

        bar = tqdm(total=5, desc="honest protocols (5 folds)", unit="fold")
        honest = honest_protocols(cfg, steps, progress=lambda _m: bar.update(1))
        bar.close()
        print_honest(honest)
    if args.csv_dir is not None:
        write_csvs(args.csv_dir, rep, diff, honest)
    if args.img_dir is not None:
        from speckv_eval.plots import plot_paper

        for path in plot_paper(args.img_dir, rep, honest):
            print(f"wrote {path}")
    return 0 if diff["abs_diff"].max() <= TOLERANCE else 1


def write_csvs(
    out: Path, rep: SeedReproduction, diff: pd.DataFrame, honest: HonestResult | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rep.table1.to_csv(out / "seed_table1.csv", index=False)
    rep.table2.to_csv(out / "seed_table2.csv", index=False)
    rep.ci.to_csv(out / "seed_ci.csv", index=False)
    diff.to_csv(out / "seed_vs_paper.csv", index=False)
    if honest is not None:
        honest.ladder.to_csv(out / "honest_ladder.csv", index=False)
        honest.final_table1.to_csv(out / "honest_table1.csv", index=False)
        honest.final_table2.to_csv(out / "honest_table2.csv", index=False)
        honest.wallclock_policies.to_csv(out / "honest_wallclock.csv", index=False)
    print(f"wrote CSV tables to {out}")
