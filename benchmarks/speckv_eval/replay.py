"""Exact counterfactual replay of γ policies on a real draft/target pair.

The method is docs/design.md, "Measuring a policy honestly".

With greedy decoding the output does not depend on γ. Per prompt we run the target alone
once (through the worker's own engine, `fixed:0`), then one teacher-forced forward of the
draft over prompt + output. At position p the draft's greedy token agrees with the target's
or not; a step that starts at p with draft length γ accepts `min(run(p), γ)` tokens, where
`run(p)` is the length of the agreeing run from p. Every policy then replays on the same
text without running the target again.

A policy also sees the draft's signals of the tokens it drafted. Until the first
disagreement those come from the teacher-forced pass; the tokens the draft proposes *after*
a disagreement are conditioned on its own wrong token, so `DraftProbe` computes them with
real draft forwards on demand (and memoises them), giving exactly what the worker would see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from speckv_client.types import DraftSignals
from transformers import DynamicCache

from decode_worker.features import (
    ContextIndex,
    SequenceHistory,
    TokenSignals,
    aggregate,
    token_features,
    token_signals,
)
from decode_worker.policies import SequenceInfo, SequencePolicy


@dataclass
class DraftProbe:
    """The draft's own greedy proposals from any position of one output, computed lazily."""

    model: Any
    context: list[int]  # prompt + output
    prompt_len: int
    tf_tokens: np.ndarray  # [L+1] draft argmax given context[: prompt_len + i]
    tf_signals: list[TokenSignals]  # [L+1]
    memo: dict[int, list[tuple[int, TokenSignals]]] = field(default_factory=dict)
    forwards: int = 0
    _cache: DynamicCache | None = None
    _cached: list[int] = field(default_factory=list)

    @property
    def output(self) -> list[int]:
        return self.context[self.prompt_len :]

    def proposals(self, p: int, n: int) -> list[tuple[int, TokenSignals]]:
        """The first n tokens (with signals) the draft proposes for a step starting at p."""
        got = self.memo.setdefault(p, [])
        out = self.output
        while len(got) < n:
            j = len(got)
            on_path = p + j < len(self.tf_tokens) and all(got[i][0] == out[p + i] for i in range(j))
            if on_path:
                got.append((int(self.tf_tokens[p + j]), self.tf_signals[p + j]))
                continue
            ctx = self.context[: self.prompt_len + p] + [t for t, _ in got]
            logits = self._next_logits(ctx)
            sig = token_signals(logits.unsqueeze(0))[0]
            got.append((int(logits.argmax().item()), sig))
        return got[:n]

    def _next_logits(self, ctx: list[int]) -> torch.Tensor:
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        common = 0
        limit = min(len(self._cached), len(ctx) - 1)
        while common < limit and self._cached[common] == ctx[common]:
            common += 1
        if len(self._cached) > common:
            self._cache.crop(-(len(self._cached) - common))
        feed = ctx[common:]
        device = next(self.model.parameters()).device
        ids = torch.tensor([feed], dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1
            ).logits[0, -1]
        self.forwards += 1
        self._cached = list(ctx)
        return logits.float()


@dataclass
class Trace:
    """One prompt's greedy output and everything a replay needs of it."""

    prompt_id: str
    task: str
    max_new_tokens: int
    output: list[int]  # target greedy tokens (ends at EOS or max_new_tokens)
    run: np.ndarray  # [L] agreeing-run length from each position, capped at the output's end
    probe: DraftProbe
    target_seconds: float  # wall time of the target-only greedy run (the worker's fixed:0)


def agreeing_runs(agree: np.ndarray) -> np.ndarray:
    """run[p] = number of consecutive True from p."""
    run = np.zeros(len(agree), dtype=np.int64)
    acc = 0
    for i in range(len(agree) - 1, -1, -1):
        acc = acc + 1 if agree[i] else 0
        run[i] = acc
    return run


def build_trace(
    engine: Any, prompt_id: str, task: str, prompt_ids: Sequence[int], max_new_tokens: int
) -> Trace:
    """Greedy target run through the worker's engine, then the teacher-forced draft pass."""
    from decode_worker.policies import FixedPolicy

    ids = list(prompt_ids)
    t0 = time.perf_counter()
    res = engine.generate(ids, FixedPolicy(0), max_new_tokens=max_new_tokens)
    target_seconds = time.perf_counter() - t0
    output = list(res.token_ids)
    context = ids + output
    draft = engine.pair.draft
    device = next(draft.parameters()).device
    with torch.inference_mode():
        logits = draft(input_ids=torch.tensor([context], dtype=torch.long, device=device)).logits[
            0, len(ids) - 1 :
        ]  # [L+1, vocab]
    tf_tokens = logits.float().argmax(dim=-1).cpu().numpy()
    tf_signals = token_signals(logits)
    agree = tf_tokens[: len(output)] == np.asarray(output)
    probe = DraftProbe(draft, context, len(ids), tf_tokens, tf_signals)
    return Trace(
        prompt_id, task, max_new_tokens, output, agreeing_runs(agree), probe, target_seconds
    )


# ----------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Costs:
    """Measured seconds: one draft forward of one token, one target forward of γ+1 tokens.

    Modelled step time: a γ = 0 step is the measured one-position target forward; a
    speculative step is γ draft forwards plus the least-squares line through the measured
    verify times at γ ≥ 1 (smoothing the noise of a shared CPU). The line is fitted without
    γ = 0 because the step from 1 to 2 positions costs more than each further position, and
    charging target-only decoding the line's intercept would inflate every speed-up.
    """

    draft_per_token: float
    verify: tuple[float, ...]  # index γ: measured target forward over γ+1 positions
    decide: float = 0.0  # in-process predictor decision (onnxruntime + objective)

    def step(self, gamma: int, drafted: int | None = None) -> float:
        """Seconds of a step that verified γ tokens and drafted `drafted` (≥ γ; a stop
        rule may draft tokens it then drops, each still costs a draft forward)."""
        extra = max((drafted or 0) - gamma, 0) * self.draft_per_token
        if gamma == 0:
            return self.verify[0] + extra
        base, per_token = self.speculative_verify()
        return gamma * (self.draft_per_token + per_token) + base + extra

    def speculative_verify(self) -> tuple[float, float]:
        """(base, per_token) least-squares fit of verify(γ) over γ ≥ 1."""
        g = np.arange(1, len(self.verify), dtype=float)
        if g.size < 2:
            return float(self.verify[-1]), 0.0
        slope, base = np.polyfit(g, np.asarray(self.verify[1:]), 1)
        return float(max(base, 1e-9)), float(max(slope, 0.0))

    def linear_verify(self) -> tuple[float, float]:
        """(base, per_token) least-squares fit of verify(γ), what the worker reports."""
        g = np.arange(len(self.verify), dtype=float)
        slope, base = np.polyfit(g, np.asarray(self.verify), 1)
        return float(max(base, 1e-9)), float(max(slope, 0.0))


def measure_costs(engine: Any, prompt_ids: Sequence[int], max_gamma: int, rounds: int = 7) -> Costs:
    """Forward times on this pair at a realistic context length: all γ interleaved in each
    round (so load on a shared machine hits every γ alike), the minimum over rounds kept."""
    pair = engine.pair
    ctx = list(prompt_ids)
    draft = np.full(rounds, np.inf)
    verify = np.full((rounds, max_gamma + 1), np.inf)
    with torch.inference_mode():
        d_cache = DynamicCache(config=pair.draft.config)
        engine.forward(pair.draft, d_cache, ctx[:-1], 1)
        t_cache = DynamicCache(config=pair.target.config)
        engine.forward(pair.target, t_cache, ctx[:-1], 1)
        for r in range(rounds):
            for _ in range(3):
                t0 = time.perf_counter()
                engine.forward(pair.draft, d_cache, [ctx[-1]], 1)
                draft[r] = min(draft[r], time.perf_counter() - t0)
                d_cache.crop(-1)
            for g in range(max_gamma + 1):
                feed = [ctx[-1]] + [ctx[i % len(ctx)] for i in range(g)]
                t0 = time.perf_counter()
                engine.forward(pair.target, t_cache, feed, g + 1)
                verify[r, g] = time.perf_counter() - t0
                t_cache.crop(-(g + 1))
    return Costs(float(draft.min()), tuple(float(v) for v in verify.min(axis=0)))


# --------------------------------------------------------------------- replay


@dataclass
class StepOutcome:
    gamma: int
    accepted: int
    kept: int
    drafted: int = -1  # draft forwards; -1 = gamma (no stop rule)

    def __post_init__(self) -> None:
        if self.drafted < 0:
            self.drafted = self.gamma


@dataclass
class SequenceOutcome:
    prompt_id: str
    task: str
    steps: list[StepOutcome]
    decide_calls: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.kept for s in self.steps)


def replay_sequence(
    trace: Trace,
    policy: SequencePolicy,
    max_gamma: int,
    needs_signals: bool = True,
) -> SequenceOutcome:
    """Replay one policy on one trace with the engine's own capping, hook order, history
    and context features (an in-step policy is asked after every drafted token, exactly as
    `GenerationRun._draft_in_step` asks it)."""
    out = SequenceOutcome(trace.prompt_id, trace.task, [])
    length = len(trace.output)
    history = SequenceHistory()
    context: ContextIndex | None = None
    if policy.in_step:
        context = ContextIndex()
        context.add(trace.probe.context[: trace.probe.prompt_len])
    p = 0
    step = 0
    while p < length:
        remaining = trace.max_new_tokens - p
        cap = min(max_gamma, remaining - 1)
        decision = policy.decide(step, None)
        gamma = max(0, min(decision.gamma, cap))
        drafted = gamma
        if policy.in_step and gamma > 0:
            assert context is not None
            gamma, drafted = _in_step(trace, policy, step, p, gamma, context, history)
        signals: DraftSignals | None = None
        if gamma and (needs_signals or policy.in_step):
            signals = aggregate([s for _, s in trace.probe.proposals(p, gamma)])
        policy.drafted(step, gamma, signals)
        accepted = int(min(trace.run[p], gamma))
        if p + accepted < length:
            drafts = [t for t, _ in trace.probe.proposals(p, drafted)] if drafted else []
            history.observe(drafts, gamma, accepted, trace.output[p + accepted])
        policy.verified(step, gamma, accepted)
        kept = min(accepted + 1, length - p)
        out.steps.append(StepOutcome(gamma, accepted, kept, drafted))
        if context is not None:
            context.add(trace.output[p : p + kept])
        p += kept
        step += 1
    policy.close()
    return out


def _in_step(
    trace: Trace,
    policy: SequencePolicy,
    step: int,
    p: int,
    limit: int,
    context: ContextIndex,
    history: SequenceHistory,
) -> tuple[int, int]:
    """(γ verified, tokens drafted) for an in-step policy at position p."""
    hist = history.values()
    drafts: list[int] = []
    j = 0
    while True:
        tok, sig = trace.probe.proposals(p, j + 1)[j]
        j += 1
        features = token_features(context, drafts, tok, sig, hist)
        drafts.append(tok)
        keep = policy.after_token(step, j, features, limit)
        if keep is not None:
            return max(0, min(keep, j)), j
        if j >= limit:
            return j, j


def replay_confidence_stop(
    trace: Trace, threshold: float = 0.4, num_assistant_tokens: int = 20, refit: bool = True
) -> SequenceOutcome:
    """Hugging Face's default assisted generation: draft up to 20 tokens, stop after the
    first one whose probability is below the threshold, and re-fit the threshold from
    (probability, matched) pairs by minimising fpr + 3·fnr on the ROC curve
    (transformers/generation/candidate_generator.py). State is per sequence."""
    from sklearn.metrics import roc_curve

    out = SequenceOutcome(trace.prompt_id, trace.task, [])
    probs: list[float] = []
    matches: list[int] = []
    length = len(trace.output)
    p = 0
    while p < length:
        cap = min(num_assistant_tokens, trace.max_new_tokens - p - 1)
        gamma = 0
        step_probs: list[float] = []
        while gamma < cap:
            _, sig = trace.probe.proposals(p, gamma + 1)[gamma]
            gamma += 1
            step_probs.append(sig.confidence)
            if sig.confidence < threshold:
                break
        accepted = int(min(trace.run[p], gamma))
        kept = min(accepted + 1, length - p)
        out.steps.append(StepOutcome(gamma, accepted, kept))
        if refit:
            probs.extend(step_probs)
            matches.extend([1] * accepted)
            if len(probs) > len(matches):
                matches.append(0)
            excess = len(probs) - len(matches)
            if excess > 0:
                del probs[-excess:]
            if len(probs) > 5 and {0, 1}.issubset(matches):
                fpr, tpr, thresholds = roc_curve(matches, probs)
                threshold = float(thresholds[int(np.argmin(fpr + 3 * (1 - tpr)))])
        p += kept
    return out


def oracle_sequence(trace: Trace, costs: Costs, max_gamma: int) -> SequenceOutcome:
    """The fastest possible γ schedule for this text under the measured costs (DP over
    positions; drafting past the agreeing run never helps, so γ ≤ run(p))."""
    length = len(trace.output)
    best = np.zeros(length + 1)
    choice = np.zeros(length, dtype=np.int64)
    for p in range(length - 1, -1, -1):
        cap = min(max_gamma, trace.max_new_tokens - p - 1, int(trace.run[p]))
        vals = []
        for g in range(0, max(cap, 0) + 1):
            nxt = min(p + g + 1, length)
            vals.append(costs.step(g) + best[nxt])
        g_best = int(np.argmin(vals))
        choice[p] = g_best
        best[p] = vals[g_best]
    out = SequenceOutcome(trace.prompt_id, trace.task, [])
    p = 0
    while p < length:
        g = int(choice[p])
        kept = min(g + 1, length - p)
        out.steps.append(StepOutcome(g, g, kept))
        p += kept
    return out


# ------------------------------------------------------------ predictor policy


class PredictorSequence(SequencePolicy):
    """The worker's `remote` policy with the predictor in-process: previous_step window,
    fallback γ on the first step, the predictor's decision code and an ONNX model."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        comp_enc: int,
        gammas: Sequence[int],
        objective: Any,
        timing: Any,
        fallback: int,
        chosen_log: list[tuple[int, float, float]] | None = None,
    ) -> None:
        from predictor_service.decisions import CandidateSet

        self._predict = predict
        self._comp = np.asarray([comp_enc], dtype=np.float32)
        self._cands = CandidateSet.of(gammas)
        self._objective = objective
        self._timing = timing
        self._fallback = fallback
        self._prev: DraftSignals | None = None
        self._pending: tuple[int, float] | None = None
        self._log = chosen_log
        self.decide_seconds = 0.0
        self.decide_calls = 0

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> Any:
        from decode_worker.policies import DecisionSource, GammaDecision
        from predictor_service.decisions import choose_gamma

        if self._prev is None:
            self._pending = None
            return GammaDecision(self._fallback, DecisionSource.FALLBACK)
        s = self._prev
        sig = np.asarray(
            [
                [
                    s.mean_draft_entropy,
                    s.mean_draft_confidence,
                    s.max_draft_entropy,
                    s.min_draft_confidence,
                ]
            ],
            dtype=np.float32,
        )
        t0 = time.perf_counter()
        choice = choose_gamma(
            self._predict, sig, self._comp, self._cands, self._objective, self._timing
        )
        self.decide_seconds += time.perf_counter() - t0
        self.decide_calls += 1
        g = int(choice.gamma[0])
        col = self._cands.gammas.index(g)
        self._pending = (g, float(choice.acceptance[0, col]))
        return GammaDecision(g, DecisionSource.REMOTE)

    def drafted(self, step: int, gamma: int, signals: DraftSignals | None) -> None:
        if signals is not None:
            self._prev = signals

    def verified(self, step: int, gamma: int, accepted: int) -> None:
        if self._log is not None and self._pending is not None and gamma > 0:
            _, pred = self._pending
            self._log.append((gamma, pred, accepted / gamma))


def start_sequence(policy: Any, compression: str, prompt_id: str) -> SequencePolicy:
    seq: SequencePolicy = policy.start(SequenceInfo(prompt_id, compression))
    return seq


class InStepOracle(SequencePolicy):
    """An upper bound for any in-step stop rule: knows whether each drafted token agrees,
    drafts while they do and drops the first that does not (paying its draft forward, as
    a real stop rule must). Not causal; a reference row like the per-step oracle."""

    in_step = True

    def __init__(self, trace: Trace, max_gamma: int) -> None:
        self._run = trace.run
        self._max = max_gamma
        self._p = 0

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> Any:
        from decode_worker.policies import DecisionSource, GammaDecision

        return GammaDecision(self._max, DecisionSource.LOCAL)

    def after_token(self, step: int, j: int, features: Any, cap: int) -> int | None:
        if self._p >= len(self._run) or self._run[self._p] < j:
            return j - 1
        return None

    def verified(self, step: int, gamma: int, accepted: int) -> None:
        self._p += accepted + 1


# ------------------------------------------------------------- draft plan policy


class InProcessPlans:
    """A `DecisionSubmitter` that answers draft_plan requests in this process with the
    predictor's own plan code (`predictor_service.plan`), so the replay drives the worker's
    own `RemotePlanSequence` — the same object `--policy remote` runs — with no clone of
    its window, refresh or fallback logic."""

    connected = True

    def __init__(
        self, version: Any, comp_enc: int, scales: tuple[float, float] | None = None
    ) -> None:
        from predictor_service.plan import PlanTables

        self.version = version
        self.scales = scales
        self.comp_enc = float(comp_enc)
        self.tables = PlanTables()
        self.messages = 0
        self.outcomes = 0
        self.seconds = 0.0

    def submit(self, batch: Any) -> Any:
        from concurrent.futures import Future

        from speckv_client.types import Decision

        from predictor_service.decisions import Objective, StepTiming
        from predictor_service.plan import build_plan

        t0 = time.perf_counter()
        t = batch.timing
        timing = (
            None
            if t is None
            else StepTiming(
                t.draft_seconds_per_token,
                t.verify_base_seconds,
                t.verify_seconds_per_token,
                t.target_only_seconds,
            )
        )
        objective = Objective(
            batch.objective.value
            if batch.objective is not None
            else self.version.manifest.default_objective
        )
        out = []
        for row in batch.rows:
            plan = build_plan(
                self.tables,
                self.version,
                self.comp_enc,
                max(batch.gamma_candidates),
                objective,
                timing,
                self.scales,
            )
            out.append(
                Decision(
                    routing_key=row.routing_key,
                    step=row.step,
                    gamma=plan.max_gamma,
                    model_name=self.version.name,
                    model_version=self.version.version,
                    arm="pinned",
                    plan=plan,
                )
            )
        self.messages += 1
        self.seconds += time.perf_counter() - t0
        f: Future[list[Any]] = Future()
        f.set_result(out)
        return f

    def report(self, outcome: Any, stream: int = 0) -> None:
        """Step outcomes have no predictor to go to in a replay; counted only."""
        self.outcomes += 1


class CostsTiming:
    """The replay's measured costs in the shape the worker's TimingModel reports them."""

    def __init__(self, costs: Costs) -> None:
        from speckv_client.types import StepTiming

        base, per_token = costs.speculative_verify()
        self._timing = StepTiming(costs.draft_per_token, base, per_token, costs.verify[0])

    def snapshot(self) -> Any:
        return self._timing
