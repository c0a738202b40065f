"""Reproduce the seed's policy tables, then re-measure them under honest protocols.

The seed's replay (its Phase 4 notebook) fits MLP-16 and RF-100 on *all* 5,112 step records,
then scores every policy on the 1,023 test steps of the stratified 80/20 split by the
*predictor's own estimate* `clip(â)·γ + 1`, with features taken from tokens drafted at the
very step being decided. Each of those three choices flatters the policy; the honest ladder
removes them one at a time:

1. held-out runs: the models never saw the prompt whose steps they decide (5 folds by prompt,
   the training protocol's `heldout_folds`, predictor_service/dataset.py);
2. `previous_step`: step *t* is decided from step *t-1*'s drafted-token features;
3. independent judge: a step's outcome is what the run actually observed (greedy acceptance
   is a run of agreeing tokens: `k < γ_used` accepted means exactly `min(k, γ)` for every γ);
   only where every drafted token was accepted and the policy asks for more is the tail
   filled in, by a per-token acceptance rate fitted on the other prompts' runs;
4. wall clock: tokens per second from the seed's own timed runs (seconds per step by γ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from speckv.costs import CostModel, expected_tokens

from predictor_service.dataset import (
    PREV_COLUMNS,
    fit_quiet,
    heldout_folds,
    make_mlp16,
    score,
    seed_split,
    strata_of,
)
from speckv_eval.paper_data import (
    COMPRESSIONS,
    DRAFT_FEATURES,
    SEED_FEATURES,
    SEED_GAMMAS,
    TASKS,
    load_paper_tables,
    load_runs,
    load_steps,
    load_task_oracle,
)

POLICIES: tuple[str, ...] = (
    "Fixed-4",
    "Fixed-best",
    "Task-oracle",
    "SpecKV-fast",
    "SpecKV-accurate",
)
CONTEXT_FEATURES: tuple[str, ...] = (*DRAFT_FEATURES, "comp_enc")


class Regressor(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> object: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PaperConfig:
    """What `speckv-eval paper` runs; the defaults are the seed's."""

    data_dir: Path
    n_boot_ci: int = 5000
    n_boot_paired: int = 10000
    seed: int = 42
    honest: bool = True
    fallback_gamma: int = 4
    n_folds: int = 5
    n_jobs: int = 1


def make_rf100(n_jobs: int = 1) -> Regressor:
    """The seed's RF-100 ("accurate") reference predictor; n_jobs does not change its trees."""
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=100, random_state=42, n_jobs=n_jobs)


def predicted_acceptance(
    model: Regressor, context: np.ndarray, gammas: Sequence[int]
) -> np.ndarray:
    """clip(â) for every row of `context` (n, 5) and every candidate γ: shape (n, len(gammas))."""
    n = context.shape[0]
    blocks = [np.column_stack([context, np.full(n, g, dtype=float)]) for g in gammas]
    pred = model.predict(np.vstack(blocks)).reshape(len(gammas), n).T
    return np.clip(pred, 0.0, 1.0)


def seed_choice(acc: np.ndarray, gammas: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The seed's objective: argmax clip(â)·γ+1, first maximum wins. Returns (γ, score)."""
    g = np.asarray(gammas, dtype=float)
    score = acc * g + 1.0
    idx = np.argmax(score, axis=1)
    return g[idx].astype(int), score[np.arange(len(idx)), idx]


def bootstrap_ci(
    values: np.ndarray, rng: np.random.RandomState, n_boot: int, ci: float = 0.95
) -> tuple[float, float, float]:
    """The seed's percentile bootstrap (same index arithmetic, same random stream)."""
    means = np.sort(_boot_means(values, rng, n_boot))
    lower = means[int((1 - ci) / 2 * n_boot)]
    upper = means[int((1 + ci) / 2 * n_boot)]
    return float(np.mean(values)), float(lower), float(upper)


def _boot_means(values: np.ndarray, rng: np.random.RandomState, n_boot: int) -> np.ndarray:
    n = len(values)
    out = np.empty(n_boot)
    chunk = 500
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        out[start : start + m] = values[rng.randint(0, n, size=(m, n))].mean(axis=1)
    return out


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, rng: np.random.RandomState, n_boot: int
) -> tuple[float, float, float, float]:
    """One-sided p-value that mean(a-b) <= 0, as the seed computes it; with the 95% CI."""
    diffs = a - b
    boots = _boot_means(diffs, rng, n_boot)
    return (
        float(np.mean(diffs)),
        float(np.mean(boots <= 0)),
        float(np.percentile(boots, 2.5)),
        float(np.percentile(boots, 97.5)),
    )


@dataclass
class StepPolicies:
    """Per-step value and chosen γ of every policy under one protocol."""

    protocol: str
    frame: pd.DataFrame  # one row per evaluated step: compression, task, <policy>, <policy>_gamma
    policies: tuple[str, ...] = POLICIES


@dataclass
class SeedReproduction:
    table1: pd.DataFrame
    table2: pd.DataFrame
    ci: pd.DataFrame
    mean_diff: float
    p_value: float
    diff_ci: tuple[float, float]
    mlp_test_mse: float
    mlp_test_corr: float
    steps: StepPolicies


def table1(sp: StepPolicies, decimals: int = 2) -> pd.DataFrame:
    """Mean per-step value by compression and overall (the seed's Table 1 layout)."""
    f = sp.frame
    rows = []
    for comp in COMPRESSIONS:
        sub = f[f["compression"] == comp]
        rows.append({"compression": comp, **{p: sub[p].mean() for p in sp.policies}})
    rows.append({"compression": "Overall", **{p: f[p].mean() for p in sp.policies}})
    return pd.DataFrame(rows).round(decimals)


def table2(sp: StepPolicies, policy: str = "SpecKV-fast") -> pd.DataFrame:
    """Fixed-4 vs `policy` by compression × task (the seed's Table 2 layout)."""
    f = sp.frame
    rows = []
    for comp in COMPRESSIONS:
        for task in TASKS:
            sub = f[(f["compression"] == comp) & (f["task"] == task)]
            f4, sk = sub["Fixed-4"].mean(), sub[policy].mean()
            rows.append(
                {
                    "compression": comp,
                    "task": task,
                    "Fixed-4": round(f4, 2),
                    "SpecKV": round(sk, 2),
                    "improvement_pct": round((sk - f4) / f4 * 100, 1),
                }
            )
    return pd.DataFrame(rows)


def gamma_counts(sp: StepPolicies, policy: str = "SpecKV-fast") -> pd.DataFrame:
    """Share of steps on which `policy` chose each γ, by compression and overall."""
    f = sp.frame
    col = f"{policy}_gamma"
    gammas = sorted(set(f[col].dropna().astype(int)))
    rows = []
    for comp in (*COMPRESSIONS, "Overall"):
        sub = f if comp == "Overall" else f[f["compression"] == comp]
        counts = sub[col].astype(int).value_counts()
        rows.append(
            {"compression": comp, **{f"γ={g}": counts.get(g, 0) / len(sub) for g in gammas}}
        )
    return pd.DataFrame(rows).round(3)


def _best_fixed_gamma(steps: pd.DataFrame) -> dict[str, int]:
    """Per compression, the γ whose runs produced the most tokens per step (seed's rule)."""
    out = {}
    for comp in COMPRESSIONS:
        perf = steps[steps["compression"] == comp].groupby("gamma")["tokens_produced"].mean()
        out[comp] = int(perf.idxmax())
    return out


def reproduce_seed(cfg: PaperConfig, steps: pd.DataFrame | None = None) -> SeedReproduction:
    """The seed's Phase 4 replay, step for step (split, MLP-16 and scoring from the training
    protocol, predictor_service.dataset: the same as `speckv-predictor train`'s `split`)."""
    steps = load_steps(cfg.data_dir) if steps is None else steps
    task_oracle = load_task_oracle(cfg.data_dir)
    x = steps[list(SEED_FEATURES)].to_numpy(dtype=float)
    y = steps["acceptance_rate"].to_numpy(dtype=float)
    train_idx, test_idx = seed_split(strata_of(steps["compression"], steps["task"]))
    mlp = fit_quiet(make_mlp16(), x[train_idx], y[train_idx])
    split = score(mlp, x[test_idx], y[test_idx], n_train=int(train_idx.size))
    # The seed then refits both models on every record, test steps included.
    fast = fit_quiet(make_mlp16(), x, y)
    slow = fit_quiet(make_rf100(cfg.n_jobs), x, y)

    test = steps.iloc[test_idx].reset_index(drop=True)
    ctx = test[list(CONTEXT_FEATURES)].to_numpy(dtype=float)
    acc_fast = predicted_acceptance(fast, ctx, SEED_GAMMAS)
    acc_slow = predicted_acceptance(slow, ctx, SEED_GAMMAS)
    best_fixed = _best_fixed_gamma(steps)
    frame = self_judged_frame(test, acc_fast, acc_slow, best_fixed, task_oracle)
    sp = StepPolicies("seed", frame)

    rng = np.random.RandomState(cfg.seed)
    ci_rows = []
    for p in POLICIES:
        mean, lo, hi = bootstrap_ci(frame[p].to_numpy(), rng, cfg.n_boot_ci)
        ci_rows.append({"policy": p, "mean": mean, "ci_lower": lo, "ci_upper": hi})
    mean_diff, p_value, d_lo, d_hi = paired_bootstrap(
        frame["SpecKV-fast"].to_numpy(), frame["Fixed-4"].to_numpy(), rng, cfg.n_boot_paired
    )
    return SeedReproduction(
        table1=table1(sp),
        table2=table2(sp),
        ci=pd.DataFrame(ci_rows).round(3),
        mean_diff=mean_diff,
        p_value=p_value,
        diff_ci=(d_lo, d_hi),
        mlp_test_mse=split.mse,
        mlp_test_corr=split.corr,
        steps=sp,
    )


def self_judged_frame(
    steps: pd.DataFrame,
    acc_fast: np.ndarray,
    acc_slow: np.ndarray,
    best_fixed: dict[str, int],
    task_oracle: dict[tuple[str, str], int],
) -> pd.DataFrame:
    """Every policy scored by a predictor's own estimate, as the seed does.

    Fixed policies are scored by the fast model; SpecKV-accurate by its own RF-100.
    """
    gi = {g: i for i, g in enumerate(SEED_GAMMAS)}
    n = len(steps)
    rows = np.arange(n)
    g4 = np.full(n, 4)
    gbest = steps["compression"].map(best_fixed).to_numpy(dtype=int)
    gtask = np.array(
        [
            task_oracle.get((c, t), 4)
            for c, t in zip(steps["compression"], steps["task"], strict=True)
        ]
    )
    gfast, vfast = seed_choice(acc_fast, SEED_GAMMAS)
    gslow, vslow = seed_choice(acc_slow, SEED_GAMMAS)

    def fixed(gs: np.ndarray) -> np.ndarray:
        idx = np.array([gi[int(g)] for g in gs])
        return acc_fast[rows, idx] * gs + 1.0

    return pd.DataFrame(
        {
            "compression": steps["compression"].to_numpy(),
            "task": steps["task"].to_numpy(),
            "Fixed-4": fixed(g4),
            "Fixed-4_gamma": g4,
            "Fixed-best": fixed(gbest),
            "Fixed-best_gamma": gbest,
            "Task-oracle": fixed(gtask),
            "Task-oracle_gamma": gtask,
            "SpecKV-fast": vfast,
            "SpecKV-fast_gamma": gfast,
            "SpecKV-accurate": vslow,
            "SpecKV-accurate_gamma": gslow,
        }
    )


# ---------------------------------------------------------------- honest protocols


def previous_step_context(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Context (previous step's draft features, comp_enc) per step, and which steps have one;
    the previous step is the training protocol's join (load_steps' `prev_*` columns)."""
    prev = steps[list(PREV_COLUMNS)].to_numpy(dtype=float)
    has_prev = ~np.isnan(prev).any(axis=1)
    ctx = np.column_stack([prev, steps["comp_enc"].to_numpy(dtype=float)])
    return ctx, has_prev


def per_token_acceptance(steps: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (compression, task) greedy per-token acceptance, MLE with censoring.

    A step that accepted k of γ saw k acceptances and, when k < γ, one rejection.
    """
    out = {}
    for (comp, task), sub in steps.groupby(["compression", "task"]):
        acc = sub["accepted"].sum()
        rej = (sub["accepted"] < sub["gamma"]).sum()
        out[(str(comp), str(task))] = float(acc / max(acc + rej, 1))
    return out


def judged_tokens(
    gamma: np.ndarray, used: np.ndarray, accepted: np.ndarray, alpha: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens a step would have produced at draft length `gamma`, from what it observed.

    Exact unless every drafted token was accepted and `gamma` asks for more; then the tail
    is the expected run of an independent per-token acceptance `alpha`. Returns
    (tokens, censored mask).
    """
    gamma = gamma.astype(float)
    rejected = accepted < used
    exact = rejected | (gamma <= used)
    base = np.minimum(accepted, gamma) + 1.0
    extra_len = np.clip(gamma - used, 0, None)
    a = np.clip(alpha, 0.0, 0.999999)
    # sum_{j=1..m} a^j = a(1-a^m)/(1-a)
    tail = a * (1 - a**extra_len) / (1 - a)
    tokens = np.where(exact, base, used + 1.0 + tail)
    return tokens, ~exact


@dataclass
class HonestResult:
    ladder: pd.DataFrame  # protocol × policy, overall mean tokens per step
    final: StepPolicies  # held-out + previous_step + judged
    final_table1: pd.DataFrame
    final_table2: pd.DataFrame
    censored_share: pd.DataFrame  # per policy share of judged steps that needed the tail model
    gamma_shares: dict[str, pd.DataFrame]  # protocol -> SpecKV-fast γ shares
    wallclock_by_gamma: pd.DataFrame  # seed's measured tokens/s by compression × γ
    step_seconds: pd.DataFrame  # modelled seconds per step by compression × γ
    wallclock_policies: pd.DataFrame  # modelled tokens/s per policy by compression (final)
    calibration: tuple[np.ndarray, np.ndarray]  # held-out previous_step â at γ used, actual
    paired: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


def _fold_of(steps: pd.DataFrame, n_folds: int) -> np.ndarray:
    """The training protocol's held-out folds, grouped by prompt: fold k holds out the k-th
    prompt of every task (assignment "index_mod", the folds of docs/results.md's ladder)."""
    return heldout_folds(steps["prompt_idx"].to_numpy(), n_folds=n_folds, assignment="index_mod")


def honest_protocols(
    cfg: PaperConfig,
    steps: pd.DataFrame | None = None,
    progress: Callable[[str], None] | None = None,
) -> HonestResult:
    """The honest ladder and the wall-clock view (see the module docstring)."""
    steps = load_steps(cfg.data_dir) if steps is None else steps
    steps = steps.reset_index(drop=True)
    task_oracle = load_task_oracle(cfg.data_dir)
    runs = load_runs(cfg.data_dir)
    say = progress or (lambda _msg: None)
    fold = _fold_of(steps, cfg.n_folds)
    n = len(steps)
    k = len(SEED_GAMMAS)
    y = steps["acceptance_rate"].to_numpy(dtype=float)
    same_ctx = steps[list(CONTEXT_FEATURES)].to_numpy(dtype=float)
    prev_ctx, has_prev = previous_step_context(steps)
    gammas_used = steps["gamma"].to_numpy(dtype=float)

    acc = {name: np.zeros((n, k)) for name in ("same_fast", "same_slow", "prev_fast", "prev_slow")}
    best_fixed_fold: dict[int, dict[str, int]] = {}
    alpha = np.zeros(n)
    for f in range(cfg.n_folds):
        say(f"fold {f + 1}/{cfg.n_folds}: fitting MLP-16 and RF-100 on the other prompts")
        tr, te = fold != f, fold == f
        x_same = np.column_stack([same_ctx[tr], gammas_used[tr]])
        m = fit_quiet(make_mlp16(), x_same, y[tr])
        r = fit_quiet(make_rf100(cfg.n_jobs), x_same, y[tr])
        acc["same_fast"][te] = predicted_acceptance(m, same_ctx[te], SEED_GAMMAS)
        acc["same_slow"][te] = predicted_acceptance(r, same_ctx[te], SEED_GAMMAS)
        trp = tr & has_prev
        x_prev = np.column_stack([prev_ctx[trp], gammas_used[trp]])
        mp = fit_quiet(make_mlp16(), x_prev, y[trp])
        rp = fit_quiet(make_rf100(cfg.n_jobs), x_prev, y[trp])
        tep = te & has_prev
        acc["prev_fast"][tep] = predicted_acceptance(mp, prev_ctx[tep], SEED_GAMMAS)
        acc["prev_slow"][tep] = predicted_acceptance(rp, prev_ctx[tep], SEED_GAMMAS)
        best_fixed_fold[f] = _best_fixed_gamma(steps[tr])
        a_tab = per_token_acceptance(steps[tr])
        alpha[te] = [
            a_tab[(c, t)]
            for c, t in zip(steps.loc[te, "compression"], steps.loc[te, "task"], strict=True)
        ]

    best_fixed = {c: best_fixed_fold[0][c] for c in COMPRESSIONS}
    # Per-step best-fixed uses its own fold's choice.
    gbest = np.array(
        [best_fixed_fold[int(fo)][c] for fo, c in zip(fold, steps["compression"], strict=True)]
    )
    # Every honest row is evaluated on the same steps: those with a previous step in their
    # run (the first step of each run would use the worker's fallback γ under any policy).
    keep = has_prev
    steps = steps[keep].reset_index(drop=True)
    acc = {name: a[keep] for name, a in acc.items()}
    gbest, alpha = gbest[keep], alpha[keep]

    ladder_rows = []
    gamma_shares: dict[str, pd.DataFrame] = {}

    def record(label: str, frame: pd.DataFrame) -> StepPolicies:
        sp = StepPolicies(label, frame)
        ladder_rows.append({"protocol": label, **{p: frame[p].mean() for p in POLICIES}})
        gamma_shares[label] = gamma_counts(sp)
        return sp

    f1 = self_judged_frame(steps, acc["same_fast"], acc["same_slow"], best_fixed, task_oracle)
    _apply_fold_best(f1, gbest, acc["same_fast"])
    record("held-out runs (same-step features, self-judged)", f1)

    f2 = self_judged_frame(steps, acc["prev_fast"], acc["prev_slow"], best_fixed, task_oracle)
    _apply_fold_best(f2, gbest, acc["prev_fast"])
    record("held-out + previous_step (self-judged)", f2)

    used = steps["gamma"].to_numpy(dtype=float)
    accepted = steps["accepted"].to_numpy(dtype=float)
    f1j = _judge(f1, used, accepted, alpha)
    record("held-out, same-step features, judged by observed outcome", f1j)
    f3 = _judge(f2, used, accepted, alpha)
    final = record("held-out + previous_step, judged by observed outcome", f3)

    censored = []
    for p in POLICIES:
        _, cens = judged_tokens(f3[f"{p}_gamma"].to_numpy(), used, accepted, alpha)
        censored.append({"policy": p, "censored_share": float(cens.mean())})

    # Wall clock: the seed's measured tokens/s and seconds per step by γ.
    wc = runs.groupby(["compression", "gamma"])["tokens_per_sec"].mean().unstack("gamma")
    wc.loc["Overall"] = runs.groupby("gamma")["tokens_per_sec"].mean()
    sec = runs.groupby(["compression", "gamma"])[["elapsed_sec", "num_steps"]].sum()
    step_s = (sec["elapsed_sec"] / sec["num_steps"]).unstack("gamma")
    wall = _wallclock_policies(f3, step_s)
    # Goodput: argmax (â·γ+1) / seconds-per-step(γ), same held-out previous_step MLP.
    gp_gamma = _goodput_choice(steps, acc["prev_fast"], step_s)
    gp_tokens, _ = judged_tokens(gp_gamma, used, accepted, alpha)
    gp_frame = f3[["compression", "task"]].copy()
    gp_frame["Goodput-fast"] = gp_tokens
    gp_frame["Goodput-fast_gamma"] = gp_gamma
    wall_gp = _wallclock_policies(gp_frame, step_s, ("Goodput-fast",))
    wall = wall.merge(wall_gp, on="compression")
    gamma_shares["goodput (held-out + previous_step)"] = gamma_counts(
        StepPolicies("goodput", gp_frame, ("Goodput-fast",)), "Goodput-fast"
    )

    gi = {g: i for i, g in enumerate(SEED_GAMMAS)}
    used_idx = np.array([gi[int(g)] for g in used])
    calib_pred = acc["prev_fast"][np.arange(len(used)), used_idx]

    rng = np.random.RandomState(cfg.seed)
    paired = {
        "SpecKV-fast - Fixed-4": paired_bootstrap(
            f3["SpecKV-fast"].to_numpy(), f3["Fixed-4"].to_numpy(), rng, cfg.n_boot_paired
        ),
        "SpecKV-fast - Fixed-best": paired_bootstrap(
            f3["SpecKV-fast"].to_numpy(), f3["Fixed-best"].to_numpy(), rng, cfg.n_boot_paired
        ),
    }
    return HonestResult(
        ladder=pd.DataFrame(ladder_rows).round(2),
        final=final,
        final_table1=table1(final),
        final_table2=table2(final),
        censored_share=pd.DataFrame(censored).round(3),
        gamma_shares=gamma_shares,
        wallclock_by_gamma=_gamma_columns(wc.round(1)),
        step_seconds=_gamma_columns((step_s * 1000).round(1)),
        wallclock_policies=wall,
        calibration=(calib_pred, steps["acceptance_rate"].to_numpy(dtype=float)),
        paired=paired,
    )


def _gamma_columns(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.columns = [f"γ={int(g)}" for g in out.columns]
    return out.rename_axis("compression").reset_index()


def _apply_fold_best(frame: pd.DataFrame, gbest: np.ndarray, acc_fast: np.ndarray) -> None:
    gi = {g: i for i, g in enumerate(SEED_GAMMAS)}
    idx = np.array([gi[int(g)] for g in gbest])
    frame["Fixed-best"] = acc_fast[np.arange(len(gbest)), idx] * gbest + 1.0
    frame["Fixed-best_gamma"] = gbest


def _judge(
    frame: pd.DataFrame, used: np.ndarray, accepted: np.ndarray, alpha: np.ndarray
) -> pd.DataFrame:
    out = frame.copy()
    for p in POLICIES:
        tokens, _ = judged_tokens(out[f"{p}_gamma"].to_numpy(), used, accepted, alpha)
        out[p] = tokens
    return out


def _wallclock_policies(
    frame: pd.DataFrame, step_s: pd.DataFrame, policies: Sequence[str] = POLICIES
) -> pd.DataFrame:
    """Modelled tokens/s: judged tokens over the seed's measured seconds per step at each γ."""
    rows = []
    for comp in (*COMPRESSIONS, "Overall"):
        sub = frame if comp == "Overall" else frame[frame["compression"] == comp]
        row: dict[str, object] = {"compression": comp}
        for p in policies:
            secs = _seed_step_seconds(step_s, sub["compression"], sub[f"{p}_gamma"].to_numpy())
            row[p] = round(float(sub[p].sum() / secs.sum()), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _goodput_choice(
    steps: pd.DataFrame,
    acc: np.ndarray,
    step_s: pd.DataFrame,
) -> np.ndarray:
    g = np.asarray(SEED_GAMMAS, dtype=float)
    score = np.empty(acc.shape)
    for rows, costs in _seed_costs(step_s, steps["compression"]):
        score[rows] = costs.goodput(expected_tokens(acc[rows], g), g)
    return g[np.argmax(score, axis=1)].astype(int)


def _seed_costs(step_s: pd.DataFrame, compression: pd.Series) -> list[tuple[np.ndarray, CostModel]]:
    """(rows, cost model) per compression: the one cost model with the seed's measured
    seconds per step by γ as its table (whole steps, drafting included: t_draft = 0)."""
    comps = compression.to_numpy()
    missing = set(comps) - set(step_s.index)
    if missing:
        raise KeyError(f"the seed timed no steps at compression {sorted(missing)}")
    return [
        (comps == c, CostModel.tabulated(step_s.loc[c].dropna().to_dict())) for c in step_s.index
    ]


def _seed_step_seconds(
    step_s: pd.DataFrame, compression: pd.Series, gamma: np.ndarray
) -> np.ndarray:
    """Seconds of each step (compression, γ) under `_seed_costs`."""
    gammas = np.asarray(gamma).astype(int)
    out = np.empty(len(gammas))
    for rows, costs in _seed_costs(step_s, compression):
        out[rows] = costs.step_seconds(gammas[rows])
    return out


def compare_to_paper(rep: SeedReproduction, data_dir: Path) -> pd.DataFrame:
    """Every published number beside ours, with the absolute difference."""
    t1, t2, ci = load_paper_tables(data_dir)
    rows: list[tuple[str, str, float, float]] = []
    ours1 = rep.table1.set_index("compression")
    for r in t1.to_dict("records"):
        for p in POLICIES:
            comp = str(r["compression"])
            rows.append(("table1", f"{comp}/{p}", float(r[p]), float(ours1.loc[comp, p])))
    ours2 = rep.table2.set_index(["compression", "task"])
    for r in t2.to_dict("records"):
        key = (str(r["compression"]), str(r["task"]))
        for col in ("Fixed-4", "SpecKV"):
            rows.append(
                ("table2", "/".join((*key, col)), float(r[col]), float(ours2.loc[key, col]))
            )
    oursci = rep.ci.set_index("policy")
    for r in ci.to_dict("records"):
        pol = str(r["policy"])
        for col in ("mean", "ci_lower", "ci_upper"):
            rows.append(("ci", f"{pol}/{col}", float(r[col]), float(oursci.loc[pol, col])))
    df = pd.DataFrame(rows, columns=["table", "cell", "paper", "ours"])
    df["abs_diff"] = (df["paper"] - df["ours"]).abs().round(3)
    return df
