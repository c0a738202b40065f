"""PNG plots for docs/results.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from speckv_eval.paper import HonestResult, SeedReproduction


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay the figure out, write it to `path` (folders made as needed) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grouped_bars(
    path: Path,
    table: pd.DataFrame,
    group_col: str,
    series: Sequence[str],
    ylabel: str,
    title: str,
) -> Path:
    """One bar per series within each group (e.g. policy within compression)."""
    plt = _plt()
    groups = list(table[group_col])
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(groups) * len(series) / 3), 4.5))
    for i, s in enumerate(series):
        ax.bar(x + i * width, table[s].to_numpy(dtype=float), width, label=s)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=2)
    return _save(plt, fig, path)


def policy_bars(path: Path, wide: pd.DataFrame, xlabel: str, title: str) -> Path:
    """Horizontal bars: one row per policy (`wide["policy"]`), one bar per other column
    (a compression), so long policy names stay readable."""
    plt = _plt()
    policies = list(wide["policy"])
    cols = [c for c in wide.columns if c != "policy"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(policies) + 1.5))
    y = np.arange(len(policies))
    h = 0.8 / max(len(cols), 1)
    for i, c in enumerate(cols):
        ax.barh(y + i * h, wide[c].to_numpy(dtype=float), h, label=c)
    ax.set_yticks(y + h * (len(cols) - 1) / 2)
    ax.set_yticklabels(policies, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def gamma_histograms(
    path: Path, shares: Mapping[str, Mapping[int, float]], title: str, per_row: int = 4
) -> Path:
    """One panel per policy (wrapped in rows of `per_row`): share of steps at each γ."""
    plt = _plt()
    names = list(shares)
    rows = (len(names) + per_row - 1) // per_row
    cols = min(len(names), per_row)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.9 * rows), sharey=True, squeeze=False
    )
    top = max((max(v) for v in shares.values() if v), default=1)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        name = names[k]
        gs = sorted(shares[name])
        ax.bar(gs, [100 * shares[name][g] for g in gs], color="steelblue", width=0.8)
        ax.set_xlim(-0.7, top + 0.7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("chosen γ")
        if k % cols == 0:
            ax.set_ylabel("% of steps")
    fig.suptitle(title, fontsize=11)
    return _save(plt, fig, path)


def predicted_vs_actual(
    path: Path, predicted: np.ndarray, actual: np.ndarray, title: str, bins: int = 10
) -> Path:
    """Calibration: mean actual acceptance per bin of predicted acceptance, plus the scatter."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(predicted, actual, s=4, alpha=0.15, color="grey", label="steps")
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(predicted, edges) - 1, 0, bins - 1)
    centers, means = [], []
    for b in range(bins):
        m = idx == b
        if m.sum() >= 5:
            centers.append(float(predicted[m].mean()))
            means.append(float(actual[m].mean()))
    ax.plot(centers, means, "o-", color="C1", label="mean actual per bin")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    corr = float(np.corrcoef(predicted, actual)[0, 1]) if len(actual) > 2 else float("nan")
    ax.set_xlabel("predicted acceptance rate")
    ax.set_ylabel("actual acceptance rate")
    ax.set_title(f"{title}\n(n={len(actual)}, corr={corr:.3f})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, path)


def _shares_from_table(df: pd.DataFrame) -> dict[int, float]:
    row = df[df["compression"] == "Overall"].iloc[0]
    return {int(c.split("=")[1]): float(row[c]) for c in df.columns if c.startswith("γ=")}


def plot_paper(out: Path, rep: SeedReproduction, honest: HonestResult | None) -> list[Path]:
    """Seed-data plots: tokens/s by policy × compression, γ histograms, calibration."""
    from speckv_eval.paper import gamma_counts

    paths = []
    shares = {
        "SpecKV-fast (seed protocol)": _shares_from_table(gamma_counts(rep.steps)),
        "SpecKV-accurate (seed protocol)": _shares_from_table(
            gamma_counts(rep.steps, "SpecKV-accurate")
        ),
    }
    if honest is not None:
        for label, df in honest.gamma_shares.items():
            if label.startswith("held-out + previous_step, judged"):
                shares["SpecKV-fast (honest)"] = _shares_from_table(df)
            if label.startswith("goodput"):
                shares["Goodput-fast (honest)"] = _shares_from_table(df)
        wall = honest.wallclock_policies
        series = [c for c in wall.columns if c != "compression"]
        paths.append(
            grouped_bars(
                out / "paper_tokens_per_s.png",
                wall,
                "compression",
                series,
                "modelled tokens/s",
                "Seed data: tokens/s by policy (honest protocol, seed's ms/step by γ)",
            )
        )
        paths.append(
            grouped_bars(
                out / "paper_tokens_per_step.png",
                pd.concat(
                    [
                        rep.table1.assign(compression=rep.table1["compression"] + " seed"),
                        honest.final_table1.assign(
                            compression=honest.final_table1["compression"] + " honest"
                        ),
                    ]
                ),
                "compression",
                ["Fixed-4", "Fixed-best", "Task-oracle", "SpecKV-fast", "SpecKV-accurate"],
                "tokens per step",
                "Seed data: tokens per step, seed protocol vs honest protocol",
            )
        )
        pa = honest.calibration
        paths.append(
            predicted_vs_actual(
                out / "paper_predicted_vs_actual.png",
                pa[0],
                pa[1],
                "Seed data: held-out previous_step MLP-16",
            )
        )
    paths.append(gamma_histograms(out / "paper_gamma_hist.png", shares, "Seed data: chosen γ"))
    return paths


def plot_replay(out: Path, results: Sequence[Any]) -> list[Path]:
    """Replay plots: modelled tokens/s by policy × compression, γ histograms, calibration."""
    from speckv_eval.replay_run import gamma_shares

    paths = []
    policies = list(results[0].table["policy"])
    wide = pd.DataFrame({"policy": policies})
    for r in results:
        wide[r.compression] = r.table.set_index("policy").loc[policies, "modelled tok/s"].to_numpy()
    path = policy_bars(
        out / "replay_tokens_per_s.png",
        wide,
        "modelled tokens/s (measured draft/verify costs)",
        "Replay on the pair: tokens/s by policy and compression",
    )
    paths.append(path)
    for r in results:
        shares = {
            run.name: gamma_shares(run)
            for run in r.runs
            if not run.name.startswith("fixed:") and run.name != "target only (γ=0)"
        }
        paths.append(
            gamma_histograms(
                out / f"replay_gamma_hist_{r.compression}.png",
                shares,
                f"Replay ({r.compression}): chosen γ",
            )
        )
    # Calibration per predictor policy, pooled over compressions: (γ, predicted, actual)
    # of every step the policy decided.
    pooled: dict[str, list[tuple[int, float, float]]] = {}
    for r in results:
        for run in r.runs:
            if run.calibration:
                pooled.setdefault(run.name, []).extend(run.calibration)
    comps = "+".join(r.compression for r in results)
    for name, rows in pooled.items():
        cal = np.asarray(rows, dtype=float)
        safe = name.replace(":", "_").replace(" ", "_").replace("/", "_")
        paths.append(
            predicted_vs_actual(
                out / f"replay_predicted_vs_actual_{safe}.png",
                cal[:, 1],
                cal[:, 2],
                f"Replay ({comps}): {name}",
            )
        )
    return paths
