"""The `remote` gamma policy: ask the predictor over the worker's one Decide stream.

Windows (docs/design.md, "Decision windows"):
- `previous_step`: step t's signals are submitted in `drafted` (before the target
  verifies step t); `decide(t+1)` reads the answer, which has usually arrived while the
  target was busy. Step 0 has no signals yet and uses the fallback gamma.
- `prefix`: the engine drafts `prefix_tokens` first; `decide` submits their signals and
  waits (one round trip per step).
- `draft_plan`: the answer is a plan (speckv.draft_plan) the sequence applies token by
  token inside every step from its own token and history features; it is asked for when
  the sequence starts (the answer arrives while the prompt is prefilled) and again every
  `refresh_steps` steps (sent before the target verifies, used when it has arrived), so a
  remote decision costs a fraction of a message per step (docs/design.md, "Draft plans").

An answer that has not arrived `decision_timeout_s` after the loop needs it, a broken
stream (the client library reconnects in the background) or a refused message all give
the fallback gamma; decoding never waits longer and never fails for the predictor.

Every step's outcome (`finished`) is reported on the stream (`DecisionSubmitter.report`):
a remote step with the stream that carried its decision, so only the replica that made
the decision credits its arm; a fallback step as fallback (docs/worker.md, "Outcome
reporting"). `RemotePolicyConfig.report_outcomes=False` turns this off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Protocol

from speckv.draft_plan import PlanRunner
from speckv_client.types import (
    Compression,
    DecideBatch,
    Decision,
    DraftSignals,
    FeatureRow,
    ModelSelector,
    Objective,
    StepOutcome,
    StepTiming,
    Window,
)

from decode_worker.config import RemotePolicyConfig
from decode_worker.policies import (
    DecisionSource,
    GammaDecision,
    GammaPolicy,
    SequenceInfo,
    SequencePolicy,
)
from decode_worker.timing import TimingModel

log = logging.getLogger(__name__)


class DecisionSubmitter(Protocol):
    """What the policy needs of `speckv_client`'s DecisionStream."""

    def submit(self, batch: DecideBatch) -> Future[list[Decision]]: ...

    def report(self, outcome: StepOutcome, stream: int = 0) -> None:
        """Queue a step's outcome for the predictor; `stream` is the `Decision.stream`
        of the decision that decided it (0: a fallback or local step). Never blocks."""
        ...

    @property
    def connected(self) -> bool: ...


class RemotePolicy(GammaPolicy):
    """Shared by all sequences of a worker; each sequence gets its own pending state."""

    def __init__(
        self,
        stream: DecisionSubmitter,
        config: RemotePolicyConfig,
        timing: TimingModel,
    ) -> None:
        self.stream = stream
        self.config = config
        self.timing = timing
        self.spec = "remote"
        self._report_failures_logged = False

    def with_overrides(
        self, *, model: ModelSelector | None = None, objective: Objective | None = None
    ) -> RemotePolicy:
        """The same stream with a per-request model pin or objective."""
        config = self.config
        if model is not None:
            config = replace(config, model=model)
        if objective is not None:
            config = replace(config, objective=objective)
        return RemotePolicy(self.stream, config, self.timing)

    def submit_one(
        self,
        seq: SequenceInfo,
        step: int,
        signals: DraftSignals | None,
        window: Window,
        candidates: tuple[int, ...],
        timing: StepTiming | None,
    ) -> Future[list[Decision]]:
        """Send one sequence's row for `step` on the shared stream."""
        row = FeatureRow(
            routing_key=seq.request_id,
            step=step,
            signals=signals,
            compression=Compression(seq.compression),
        )
        batch = DecideBatch(
            rows=(row,),
            gamma_candidates=candidates,
            window=window,
            objective=self.config.objective,
            timing=timing,
            model=self.config.model,
        )
        return self.stream.submit(batch)

    def report(self, outcome: StepOutcome, stream: int) -> None:
        """Report one step's outcome (a remote one with its decision's stream, anything
        else with 0) unless `report_outcomes` is off; never fails the step."""
        if not self.config.report_outcomes:
            return
        if outcome.source != DecisionSource.REMOTE:
            stream = 0  # never credit an arm with a step it did not decide
        try:
            self.stream.report(outcome, stream)
        except Exception as err:  # decoding never fails for the predictor
            if not self._report_failures_logged:
                self._report_failures_logged = True
                log.warning("cannot report step outcomes to the predictor: %r", err)

    def start(self, seq: SequenceInfo) -> SequencePolicy:
        if self.config.window == Window.DRAFT_PLAN:
            return RemotePlanSequence(self, seq)
        return RemoteSequencePolicy(self, seq)


class RemoteSequencePolicy(SequencePolicy):
    def __init__(self, owner: RemotePolicy, seq: SequenceInfo) -> None:
        self._owner = owner
        self._config = owner.config
        self._seq = seq
        self.prefix_tokens = (
            self._config.prefix_tokens if self._config.window == Window.PREFIX else 0
        )
        # (step it decides, future) submitted by `drafted` in the previous_step window.
        self._pending: tuple[int, Future[list[Decision]]] | None = None
        self._last_signals: DraftSignals | None = None
        self._last_gamma = self._config.fallback_gamma
        self._failures_logged = 0
        self._deferred: int | None = None
        # The stream that carried the decision of the step being decoded (0: none).
        self._decision_stream = 0

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        self._decision_stream = 0
        if self._config.window == Window.PREFIX:
            if prefix_signals is None:
                return self._fallback(0.0, "no prefix drafted")
            if self._needs_timing() and self._owner.timing.snapshot() is None:
                return self._fallback(0.0, "no draft/verify timing measured yet for goodput")
            future = self._submit(step, prefix_signals)
        else:
            pending, self._pending = self._pending, None
            if pending is None or pending[0] != step:
                return self._fallback(0.0, "")  # first step: no signals yet
            future = pending[1]
        return self._await(step, future)

    def drafted(self, step: int, gamma: int, signals: DraftSignals | None) -> None:
        if signals is not None:
            self._last_signals = signals
        if self._config.window != Window.PREVIOUS_STEP:
            return
        # Goodput needs measured costs; before the first verify there are none, so that one
        # request goes out after verification instead (see `verified`).
        if self._needs_timing() and self._owner.timing.snapshot() is None:
            self._deferred = step
            return
        # After a gamma-0 step there is nothing new; the latest drafted step's signals stand.
        if self._last_signals is not None:
            self._pending = (step + 1, self._submit(step + 1, self._last_signals))

    def verified(self, step: int, gamma: int, accepted: int) -> None:
        if self._deferred == step and self._last_signals is not None:
            self._pending = (step + 1, self._submit(step + 1, self._last_signals))
        self._deferred = None

    def finished(self, outcome: StepOutcome) -> None:
        self._owner.report(outcome, self._decision_stream)

    def close(self) -> None:
        self._pending = None

    def _needs_timing(self) -> bool:
        # None: the manifest's default objective, which may be goodput.
        return self._config.objective != Objective.TOKENS_PER_STEP

    def _submit(self, step: int, signals: DraftSignals) -> Future[list[Decision]]:
        return self._owner.submit_one(
            self._seq,
            step,
            signals,
            self._config.window,
            self._config.gamma_candidates,
            self._owner.timing.snapshot(),
        )

    def _await(self, step: int, future: Future[list[Decision]]) -> GammaDecision:
        started = time.perf_counter()
        try:
            decisions = future.result(timeout=self._config.decision_timeout_s)
        except FutureTimeout:
            return self._fallback(time.perf_counter() - started, "predictor answer late")
        except Exception as err:  # any failure means: decode on the fallback
            return self._fallback(time.perf_counter() - started, f"predictor failed: {err}")
        waited = time.perf_counter() - started
        decision = _pick(decisions, self._seq.request_id, step)
        if decision is None:
            return self._fallback(waited, f"no decision for step {step} in the answer")
        self._last_gamma = decision.gamma
        self._decision_stream = decision.stream
        return _remote(decision, decision.gamma, step, waited)

    def _fallback(self, waited: float, why: str) -> GammaDecision:
        if why and self._failures_logged < 3:
            self._failures_logged += 1
            log.info("sequence %s: fallback gamma (%s)", self._seq.request_id, why)
        gamma = self._config.fallback_gamma
        if self._config.fallback_mode == "last":
            gamma = self._last_gamma
        return GammaDecision(gamma=gamma, source=DecisionSource.FALLBACK, wait_seconds=waited)


def _remote(d: Decision, gamma: int, decision_step: int, waited: float = 0.0) -> GammaDecision:
    """A step decided by the predictor: the model, version and arm of the answer `d`."""
    return GammaDecision(
        gamma=gamma,
        source=DecisionSource.REMOTE,
        model_name=d.model_name,
        model_version=d.model_version,
        arm=d.arm,
        wait_seconds=waited,
        decision_step=decision_step,
    )


def _pick(decisions: list[Decision], routing_key: str, step: int) -> Decision | None:
    for d in decisions:
        if d.routing_key == routing_key and d.step == step:
            return d
    return decisions[0] if len(decisions) == 1 else None


class RemotePlanSequence(SequencePolicy):
    """The `draft_plan` window: apply the predictor's plan token by token, refresh it now
    and then, fall back to a fixed γ (drafted in full) while no plan is at hand."""

    in_step = True

    def __init__(self, owner: RemotePolicy, seq: SequenceInfo) -> None:
        self._owner = owner
        self._config = owner.config
        self._seq = seq
        self._runner: PlanRunner | None = None
        self._plan_meta = GammaDecision(0, DecisionSource.REMOTE)
        self._plan_stream = 0  # the stream that carried the current plan
        self._plan_step = 0  # the step the current plan took effect
        self._pending: Future[list[Decision]] | None = None
        self._pending_step = 0  # the step the pending request was sent for
        self._retry_at = 0  # the first step at which a failed request may be sent again
        self._applying = False
        self._failures_logged = 0
        self.plans_received = 0
        self.requests_sent = 0
        # Asked now, answered while the engine prefills the prompt.
        self._request(0)

    # -- hooks

    def decide(self, step: int, prefix_signals: DraftSignals | None) -> GammaDecision:
        waited = 0.0
        pending = self._pending
        if pending is not None:
            if self._runner is None and not pending.done():
                started = time.perf_counter()
                with contextlib.suppress(Exception):  # late or failed: handled below
                    pending.result(timeout=self._config.decision_timeout_s)
                waited = time.perf_counter() - started
            if pending.done():
                self._pending = None
                self._take(step, pending)
        if self._runner is None:
            if self._pending is None and step >= self._retry_at:
                self._request(step)
            self._applying = False
            return self._fallback(waited)
        self._applying = True
        self._runner.start_step()
        meta = self._plan_meta
        return GammaDecision(
            gamma=self._runner.plan.max_gamma,
            source=DecisionSource.REMOTE,
            model_name=meta.model_name,
            model_version=meta.model_version,
            arm=meta.arm,
            wait_seconds=waited,
            decision_step=meta.decision_step,
        )

    def after_token(self, step: int, j: int, features: Mapping[str, float], cap: int) -> int | None:
        runner = self._runner
        if not self._applying or runner is None:
            return None  # the fallback γ is drafted in full
        return runner.after_token(j, runner.estimate(features), cap)

    def drafted(self, step: int, gamma: int, signals: DraftSignals | None) -> None:
        # Refresh before the target verifies, so the answer arrives while it works.
        runner = self._runner
        if (
            runner is not None
            and self._pending is None
            and step + 1 - self._plan_step >= runner.plan.refresh_steps
            and step + 1 >= self._retry_at
        ):
            self._request(step + 1)

    def finished(self, outcome: StepOutcome) -> None:
        self._owner.report(outcome, self._plan_stream)

    def close(self) -> None:
        self._pending = None

    # -- plumbing

    def _request(self, step: int) -> None:
        timing = self._owner.timing.snapshot()
        objective = self._config.objective
        if timing is None and objective != Objective.TOKENS_PER_STEP:
            self._retry_at = step + 1  # goodput needs measured costs; none yet
            return
        try:
            self._pending = self._owner.submit_one(
                self._seq, step, None, Window.DRAFT_PLAN, (self._config.plan_max_gamma,), timing
            )
            self._pending_step = step
        except Exception as err:  # the stream refused to take it: decode on
            self._failed(step, f"predictor refused the request: {err}")
            return
        self.requests_sent += 1

    def _take(self, step: int, future: Future[list[Decision]]) -> None:
        try:
            decisions = future.result(timeout=0)
        except Exception as err:
            self._failed(step, f"predictor failed: {err}")
            return
        decision = _pick(decisions, self._seq.request_id, self._pending_step)
        plan = decision.plan if decision is not None else None
        if plan is None:
            self._failed(step, "the answer carries no draft plan (is the model a draft_plan one?)")
            return
        problem = plan.problem()
        if problem is not None:
            self._failed(step, f"unusable draft plan: {problem}")
            return
        assert decision is not None
        self._runner = PlanRunner(plan)
        # decision_step: the step the plan was asked for.
        self._plan_meta = _remote(decision, plan.max_gamma, self._pending_step)
        self._plan_stream = decision.stream
        self._plan_step = step
        self.plans_received += 1

    def _failed(self, step: int, why: str) -> None:
        # Keep applying the plan in hand, if any; ask again after a pause, not every step.
        self._retry_at = step + max(
            1, min(8, self._runner.plan.refresh_steps if self._runner else 8)
        )
        if self._failures_logged < 3:
            self._failures_logged += 1
            log.info("sequence %s: no new draft plan (%s)", self._seq.request_id, why)

    def _fallback(self, waited: float) -> GammaDecision:
        return GammaDecision(
            gamma=self._config.fallback_gamma, source=DecisionSource.FALLBACK, wait_seconds=waited
        )
