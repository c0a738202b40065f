"""Run the replay of every policy on a pair and a prompt set, and summarise it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speckv_eval.replay import (
    Costs,
    CostsTiming,
    InProcessPredictor,
    InStepOracle,
    SequenceOutcome,
    Trace,
    build_trace,
    measure_costs,
    oracle_sequence,
    replay_confidence_stop,
    replay_sequence,
    start_sequence,
)

DEFAULT_FIXED: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
TARGET_ONLY = "target only (γ=0)"
ORACLE = "per-step oracle"


@dataclass(frozen=True)
class ReplayConfig:
    """What `speckv-eval replay` runs."""

    draft: str
    target: str
    prompts: Path
    compressions: tuple[str, ...] = ("fp16",)
    max_new_tokens: int = 64
    limit: int = 0  # first N prompts; 0 = all
    models: tuple[Path, ...] = ()  # model version folders (model repository layout)
    fixed: tuple[int, ...] = DEFAULT_FIXED
    fallback_gamma: int = 4
    max_gamma: int = 16  # the worker's EngineConfig.max_gamma
    device: str = "cpu"
    threads: int = 2
    progress: bool = True


@dataclass
class Prompt:
    id: str
    task: str
    prompt: str


def load_prompts(path: Path, limit: int = 0) -> list[Prompt]:
    """Read a JSONL prompt set (fields id, task, prompt); errors name the line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (see benchmarks/prompts/)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Prompt(str(obj["id"]), str(obj["task"]), str(obj["prompt"])))
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{path}:{n}: each line must be a JSON object with id, task, prompt ({e})"
            ) from e
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out[:limit] if limit else out


@dataclass
class PolicyRun:
    name: str
    outcomes: list[SequenceOutcome]
    decide_seconds: float = 0.0
    decide_calls: int = 0
    calibration: list[tuple[int, float, float]] = field(default_factory=list)


@dataclass
class CompressionResult:
    compression: str
    costs: Costs
    runs: list[PolicyRun]
    traces: list[Trace]
    table: pd.DataFrame
    draft_forwards: int
    seconds: float


def policy_table(runs: Sequence[PolicyRun], costs: Costs, traces: Sequence[Trace]) -> pd.DataFrame:
    """Per policy: tokens/step, target forwards/token, rejected drafts/token, modelled tok/s."""
    rows = []
    for r in runs:
        steps = [s for o in r.outcomes for s in o.steps]
        tokens = sum(s.kept for s in steps)
        drafted = sum(s.gamma for s in steps)
        accepted = sum(s.accepted for s in steps)
        wasted = sum(s.drafted - s.gamma for s in steps)
        per_decide = r.decide_seconds / r.decide_calls if r.decide_calls else 0.0
        seconds = sum(costs.step(s.gamma, s.drafted) for s in steps) + r.decide_calls * per_decide
        rows.append(
            {
                "policy": r.name,
                "tokens/step": tokens / len(steps),
                "target fwd/token": len(steps) / tokens,
                "rejected drafts/token": (drafted - accepted) / tokens,
                "mean γ": drafted / len(steps),
                "wasted drafts/step": wasted / len(steps),
                "messages/step": r.decide_calls / len(steps),
                "modelled tok/s": tokens / seconds,
                "decide µs/step": 1e6 * per_decide,
            }
        )
    df = pd.DataFrame(rows)
    base = float(df.loc[df["policy"] == TARGET_ONLY, "modelled tok/s"].iloc[0])
    df["speedup vs target"] = df["modelled tok/s"] / base
    fixed = df[df["policy"].str.startswith("fixed:")]
    best_fixed = float(fixed["modelled tok/s"].max()) if len(fixed) else base
    df["vs best fixed"] = df["modelled tok/s"] / best_fixed
    oracle = float(df.loc[df["policy"] == ORACLE, "modelled tok/s"].iloc[0])
    gain = oracle - base
    df["share of oracle gain"] = (df["modelled tok/s"] - base) / gain if gain > 0 else np.nan
    return df.round(3)


def _policies(
    cfg: ReplayConfig, compression: str, comp_enc: int, costs: Costs, models: Sequence[Any]
) -> list[tuple[str, Callable[[Trace, PolicyRun], SequenceOutcome]]]:
    from decode_worker.policies import FixedPolicy, HeuristicContextPolicy, HeuristicPolicy
    from predictor_service.decisions import Objective

    out: list[tuple[str, Callable[[Trace, PolicyRun], SequenceOutcome]]] = []

    def local(policy: Any, signals: bool = False) -> Callable[[Trace, PolicyRun], SequenceOutcome]:
        def go(t: Trace, _r: PolicyRun) -> SequenceOutcome:
            seq = start_sequence(policy, compression, t.prompt_id)
            return replay_sequence(t, seq, cfg.max_gamma, needs_signals=signals)

        return go

    out.append((TARGET_ONLY, local(FixedPolicy(0))))
    for g in cfg.fixed:
        out.append((f"fixed:{g}", local(FixedPolicy(g))))
    out.append(("heuristic (HF schedule, start 4)", local(HeuristicPolicy())))
    out.append(("heuristic + context stop", local(HeuristicContextPolicy())))
    out.append(("HF confidence stop (0.4, ROC re-fit)", lambda t, _r: replay_confidence_stop(t)))
    # draft_plan models first (the table's order since they were added)
    for version in sorted(models, key=lambda m: m.window != "draft_plan"):
        label = f"{version.name}:v{version.version}"
        if version.window == "draft_plan":
            objectives: tuple[Objective, ...] = (Objective.GOODPUT,)
        else:
            objectives = (Objective.TOKENS_PER_STEP, Objective.GOODPUT)
        for objective in objectives:

            def go(
                t: Trace, r: PolicyRun, version: Any = version, objective: Objective = objective
            ) -> SequenceOutcome:
                submitter = InProcessPredictor(version, comp_enc, calibration=r.calibration)
                o = replay_remote(cfg, t, compression, submitter, costs, version, objective)
                r.decide_seconds += submitter.seconds
                r.decide_calls += submitter.messages
                return o

            window = " draft_plan" if version.window == "draft_plan" else ""
            out.append((f"{label}{window} {objective.value}", go))
    out.append(
        (
            "in-step oracle (knows agreement, pays the probe)",
            lambda t, _r: replay_sequence(t, InStepOracle(t, cfg.max_gamma), cfg.max_gamma),
        )
    )
    out.append((ORACLE, lambda t, _r: oracle_sequence(t, costs, cfg.max_gamma)))
    return out


def replay_remote(
    cfg: ReplayConfig,
    trace: Trace,
    compression: str,
    submitter: InProcessPredictor,
    costs: Costs,
    version: Any,
    objective: Any = None,
) -> SequenceOutcome:
    """Replay the worker's own `remote` policy for one model version, in the window a
    worker asks it in, over an in-process submitter; its timing is the replay's cost
    model (what the worker's TimingModel would report)."""
    from speckv.vocabulary import WORKER_REQUEST_WINDOW
    from speckv_client.types import Objective, Window

    from decode_worker.config import RemotePolicyConfig
    from decode_worker.remote_policy import RemotePolicy

    policy = RemotePolicy(
        submitter,
        RemotePolicyConfig(
            window=Window(WORKER_REQUEST_WINDOW[version.window]),
            objective=Objective(objective.value) if objective is not None else Objective.GOODPUT,
            gamma_candidates=tuple(version.manifest.gamma_candidates),
            plan_max_gamma=cfg.max_gamma,
            fallback_gamma=cfg.fallback_gamma,
        ),
        CostsTiming(costs),  # type: ignore[arg-type]
    )
    seq = start_sequence(policy, compression, trace.prompt_id)
    return replay_sequence(trace, seq, cfg.max_gamma)


def traces_and_costs(
    cfg: ReplayConfig, comp: str, prompts: Sequence[Prompt]
) -> tuple[Any, list[Trace], Costs]:
    """Load the pair at one compression, run every prompt target-only (one trace each) and
    measure the pair's draft/verify costs: what every replay of that compression starts from."""
    from tqdm import tqdm

    from decode_worker.config import EngineConfig
    from decode_worker.engine import SpeculativeEngine
    from speckv_eval.services import load_local_pair

    pair = load_local_pair(cfg.draft, cfg.target, comp, cfg.device)
    engine = SpeculativeEngine(
        pair,
        EngineConfig(
            default_max_new_tokens=cfg.max_new_tokens,
            max_new_tokens_limit=max(1024, cfg.max_new_tokens),
            max_gamma=cfg.max_gamma,
        ),
    )
    traces = [
        build_trace(engine, p.id, p.task, engine.encode(p.prompt), cfg.max_new_tokens)
        for p in tqdm(prompts, desc=f"{comp}: target runs", disable=not cfg.progress)
    ]
    probe_ids = engine.encode(prompts[0].prompt) + traces[0].output
    costs = measure_costs(engine, probe_ids, max(cfg.max_gamma, 20))
    return pair, traces, costs


def run_replay(cfg: ReplayConfig) -> list[CompressionResult]:
    """Traces per compression (one target run + one teacher-forced draft pass per prompt),
    then every policy replayed on them."""
    import torch
    from speckv.vocabulary import WORKER_REQUEST_WINDOW
    from tqdm import tqdm

    from predictor_service.repository import load_version

    torch.set_num_threads(cfg.threads)
    prompts = load_prompts(cfg.prompts, cfg.limit)
    models = [load_version(p) for p in cfg.models]
    for m in models:
        if m.window not in WORKER_REQUEST_WINDOW:
            raise ValueError(
                f"model {m.name} v{m.version} has window {m.window!r}, which no worker asks in"
            )
    results = []
    for comp in cfg.compressions:
        t_start = time.perf_counter()
        pair, traces, costs = traces_and_costs(cfg, comp, prompts)
        runs = []
        policies = _policies(cfg, comp, pair.comp_enc, costs, models)
        for name, fn in tqdm(policies, desc=f"{comp}: replay", disable=not cfg.progress):
            r = PolicyRun(name, [])
            for t in traces:
                r.outcomes.append(fn(t, r))
            runs.append(r)
        table = policy_table(runs, costs, traces)
        results.append(
            CompressionResult(
                comp,
                costs,
                runs,
                traces,
                table,
                sum(t.probe.forwards for t in traces),
                time.perf_counter() - t_start,
            )
        )
    return results


def gamma_shares(run: PolicyRun) -> dict[int, float]:
    gs = [s.gamma for o in run.outcomes for s in o.steps]
    vals, counts = np.unique(gs, return_counts=True)
    return {int(v): float(c) / len(gs) for v, c in zip(vals, counts, strict=True)}


# ------------------------------------------------------------------ plan tuning

FIRST_SCALES = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
CONTINUE_SCALES = (0.7, 1.0, 1.4, 2.0, 2.8)


def tune_plan(
    cfg: ReplayConfig,
    version_dir: Path,
    first_scales: Sequence[float] = FIRST_SCALES,
    continue_scales: Sequence[float] = CONTINUE_SCALES,
) -> dict[str, Any]:
    """Replay a draft_plan model's policy on `cfg.prompts` (the *training* prompts) for
    every (first, continue) scale pair; the best pair maximises the geometric mean over
    compressions of modelled tok/s ÷ target only. Returns the grid and the choice."""
    import torch
    from tqdm import tqdm

    from decode_worker.policies import FixedPolicy
    from predictor_service.repository import load_version

    torch.set_num_threads(cfg.threads)
    version = load_version(version_dir)
    if version.window != "draft_plan" or version.manifest.plan is None:
        raise ValueError(f"{version_dir} is not a draft_plan model")
    prompts = load_prompts(cfg.prompts, cfg.limit)
    grid = [(f, c) for f in first_scales for c in continue_scales]
    speed: dict[tuple[float, float], list[float]] = {g: [] for g in grid}
    for comp in cfg.compressions:
        pair, traces, costs = traces_and_costs(cfg, comp, prompts)

        def seconds(outcomes: list[SequenceOutcome], costs: Costs = costs) -> tuple[int, float]:
            steps = [s for o in outcomes for s in o.steps]
            return sum(s.kept for s in steps), sum(costs.step(s.gamma, s.drafted) for s in steps)

        tok0, sec0 = seconds(
            [
                replay_sequence(t, start_sequence(FixedPolicy(0), comp, t.prompt_id), 16)
                for t in traces
            ]
        )
        base = tok0 / sec0
        for f, c in tqdm(grid, desc=f"{comp}: scales", disable=not cfg.progress):
            outcomes = [
                replay_remote(
                    cfg, t, comp, InProcessPredictor(version, pair.comp_enc, (f, c)), costs, version
                )
                for t in traces
            ]
            tok, sec = seconds(outcomes)
            speed[(f, c)].append(tok / sec / base)
    score = {g: float(np.exp(np.mean(np.log(v)))) for g, v in speed.items()}
    best = max(grid, key=lambda g: score[g])
    return {
        "model": f"{version.name}:v{version.version}",
        "prompts": str(cfg.prompts),
        "compressions": list(cfg.compressions),
        "best": {"first_scale": best[0], "continue_scale": best[1], "score": score[best]},
        "default": {"first_scale": 1.0, "continue_scale": 1.0, "score": score.get((1.0, 1.0))},
        "grid": [
            {
                "first_scale": f,
                "continue_scale": c,
                "speedup_vs_target_geomean": round(score[(f, c)], 4),
                "speedup_vs_target": [round(x, 4) for x in speed[(f, c)]],
            }
            for f, c in grid
        ],
    }
