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
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from speckv.costs import CostModel
from speckv.vocabulary import DRAFT_SIGNALS
from speckv_client.types import DraftSignals
from speckv_client.types import StepOutcome as ReportedOutcome
from transformers import DynamicCache

from decode_worker.engine import cap_gamma
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
    """Measured seconds on the pair: one draft forward of one token, one target forward of
    γ+1 tokens at every γ from 0. They are an input to the one cost model
    (`speckv.costs.CostModel.fit`: γ = 0 is the measured one-position forward, speculative
    steps follow the line fitted over γ ≥ 1; docs/design.md "Cost model")."""

    draft_per_token: float
    verify: tuple[float, ...]  # index γ: measured target forward over γ+1 positions

    @cached_property
    def model(self) -> CostModel:
        return CostModel.fit(self.draft_per_token, self.verify)

    def step(self, gamma: int, drafted: int | None = None) -> float:
        """Seconds of a step that verified γ tokens and drafted `drafted` (≥ γ)."""
        return self.model.step_seconds(gamma, drafted)


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
    """Replay one policy on one trace in `GenerationRun._run`'s hook order (decide — after
    a drafted prefix in the prefix window —, after_token per drafted token for an in-step
    policy, drafted, verified, finished with the step's outcome, close), with the engine's
    own `cap_gamma` and the same history and context features."""
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
        prefix = 0
        if policy.prefix_tokens == 0:
            decision = policy.decide(step, None)
        else:
            assert not policy.in_step, "the engine drafts a prefix only for step-level policies"
            prefix = cap_gamma(policy.prefix_tokens, max_gamma, remaining)
            got = [s for _, s in trace.probe.proposals(p, prefix)]
            decision = policy.decide(step, aggregate(got) if got else None)
        gamma = cap_gamma(decision.gamma, max_gamma, remaining)
        drafted = max(gamma, prefix)
        if policy.in_step and gamma > 0:
            assert context is not None
            gamma, drafted = _in_step(trace, policy, step, p, gamma, context, history)
        signals: DraftSignals | None = None
        if gamma and (needs_signals or policy.in_step or prefix):
            signals = aggregate([s for _, s in trace.probe.proposals(p, gamma)])
        policy.drafted(step, gamma, signals)
        accepted = int(min(trace.run[p], gamma))
        if p + accepted < length:
            drafts = [t for t, _ in trace.probe.proposals(p, drafted)] if drafted else []
            history.observe(drafts, gamma, accepted, trace.output[p + accepted])
        policy.verified(step, gamma, accepted)
        kept = min(accepted + 1, length - p)
        out.steps.append(StepOutcome(gamma, accepted, kept, drafted))
        policy.finished(
            _reported(trace.prompt_id, step, decision, gamma, accepted, kept, p + kept >= length)
        )
        if context is not None:
            context.add(trace.output[p : p + kept])
        p += kept
        step += 1
    policy.close()
    return out


def _reported(
    key: str, step: int, d: Any, gamma: int, accepted: int, kept: int, end: bool
) -> ReportedOutcome:
    """The outcome the engine's `step_outcome` gives the policy (no wall clock in a replay)."""
    from decode_worker.policies import DecisionSource

    remote = d.source == DecisionSource.REMOTE
    return ReportedOutcome(
        routing_key=key,
        step=step,
        source=d.source,
        drafted=gamma,
        accepted=accepted,
        tokens=kept,
        draft_seconds=0.0,
        verify_seconds=0.0,
        model_name=d.model_name if remote else "",
        model_version=d.model_version if remote else 0,
        arm=d.arm if remote else "",
        decision_step=d.decision_step if remote else 0,
        sequence_end=end,
    )


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
        cap = cap_gamma(int(trace.run[p]), max_gamma, trace.max_new_tokens - p)
        vals = []
        for g in range(cap + 1):
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


# ------------------------------------------------------------ remote policy


class InProcessPredictor:
    """A `DecisionSubmitter` that answers in this process with the predictor's own
    decision code (`predictor_service.decisions` for γ, `predictor_service.plan` for draft
    plans) and completed futures, so the replay drives the worker's own `RemotePolicy` —
    the objects `--policy remote` runs, in every window — with no clone of their windows,
    refresh or fallback. Step outcomes come back through `report`, as on the stream; a
    remote step's (γ verified, predicted acceptance, actual acceptance) is appended to
    `calibration` when given."""

    connected = True

    def __init__(
        self,
        version: Any,
        comp_enc: int,
        scales: tuple[float, float] | None = None,
        calibration: list[tuple[int, float, float]] | None = None,
    ) -> None:
        from predictor_service.plan import PlanTables

        self.version = version
        self.scales = scales
        self.comp_enc = float(comp_enc)
        self.tables = PlanTables()
        self.calibration = calibration
        self._predicted: dict[tuple[str, int], float] = {}
        self.messages = 0
        self.outcomes = 0
        self.seconds = 0.0  # in the predictor's decision code

    def submit(self, batch: Any) -> Any:
        from concurrent.futures import Future

        from predictor_service.decisions import Objective, StepTiming

        timing = (
            None
            if batch.timing is None
            else StepTiming(*CostModel.of(batch.timing).timing_fields())
        )
        objective = Objective(
            batch.objective.value
            if batch.objective is not None
            else self.version.manifest.default_objective
        )
        if self.version.window == "draft_plan":
            out = self._plans(batch, objective, timing)
        else:
            out = self._gammas(batch, objective, timing)
        self.messages += 1
        f: Future[list[Any]] = Future()
        f.set_result(out)
        return f

    def _gammas(self, batch: Any, objective: Any, timing: Any) -> list[Any]:
        from speckv_client.types import CandidateScore, Decision

        from predictor_service.decisions import CandidateSet, choose_gamma

        cands = CandidateSet.of(batch.gamma_candidates)
        signals = np.asarray(
            [[getattr(r.signals, name) for name in DRAFT_SIGNALS] for r in batch.rows],
            dtype=np.float32,
        )
        comp = np.full(len(batch.rows), self.comp_enc, dtype=np.float32)
        t0 = time.perf_counter()
        choice = choose_gamma(self.version.predict, signals, comp, cands, objective, timing)
        self.seconds += time.perf_counter() - t0
        out = []
        for i, row in enumerate(batch.rows):
            g = int(choice.gamma[i])
            acceptance = [float(a) for a in choice.acceptance[i]]
            self._predicted[(row.routing_key, row.step)] = acceptance[cands.gammas.index(g)]
            out.append(
                Decision(
                    routing_key=row.routing_key,
                    step=row.step,
                    gamma=g,
                    candidates=tuple(
                        CandidateScore(c, a, float(sc))
                        for c, a, sc in zip(cands.gammas, acceptance, choice.score[i], strict=True)
                    ),
                    model_name=self.version.name,
                    model_version=self.version.version,
                    arm="pinned",
                )
            )
        return out

    def _plans(self, batch: Any, objective: Any, timing: Any) -> list[Any]:
        from speckv_client.types import Decision

        from predictor_service.plan import build_plan

        t0 = time.perf_counter()
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
        self.seconds += time.perf_counter() - t0
        return out

    def report(self, outcome: Any, stream: int = 0) -> None:
        """A step's outcome: no predictor to go to in a replay; counted, and matched with
        the acceptance predicted for it."""
        from decode_worker.policies import DecisionSource

        self.outcomes += 1
        predicted = self._predicted.pop((outcome.routing_key, outcome.decision_step), None)
        if (
            self.calibration is not None
            and predicted is not None
            and outcome.source == DecisionSource.REMOTE
            and outcome.drafted > 0
        ):
            self.calibration.append(
                (outcome.drafted, predicted, outcome.accepted / outcome.drafted)
            )


class CostsTiming:
    """The replay's cost model in the shape the worker's TimingModel reports it."""

    def __init__(self, costs: Costs) -> None:
        from speckv_client.types import StepTiming

        self._timing = StepTiming(*costs.model.timing_fields())

    def snapshot(self) -> Any:
        return self._timing
