"""What each arm's decisions produced: per-arm outcome statistics of one predictor process.

Workers report every decided step's outcome (`StepOutcome`, piggybacked on the Decide
stream). `ArmStatsTracker` credits REMOTE outcomes to the (model, version, arm) that decided
them, counts FALLBACK and LOCAL outcomes apart (never credited to an arm), refuses
malformed ones (counted, logged at most once per `log_interval_s`, never an error for the
message that carried them), and compares a shadow version's predicted acceptance with the
realised one on the steps it shadowed. docs/predictor.md, "Outcomes and arm statistics".

Plain Python and thread-safe (one lock, held for additions only): the servicer converts
protobuf at the edge, and outcomes arrive on the event loop and the big-message lane.
Memory is bounded: at most `max_sequences` per-sequence records per arm and
`shadow_memory` shadow predictions awaiting their outcome.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from speckv_client.types import (
    ArmStats,
    ArmStatsReport,
    DecisionSource,
    SequenceOutcome,
    ShadowCalibration,
)
from speckv_client.types import OutcomeValues as OutcomeValues

log = logging.getLogger(__name__)

ArmKey = tuple[str, int, str]  # (model, version, arm)
ShadowKey = tuple[str, int]  # (model, shadow version)

# Why an outcome was refused (the `reason` label of speckv_predictor_outcomes_rejected_total).
INVALID = "invalid"  # malformed: counts that cannot be, non-finite seconds, missing names
UNKNOWN_ARM = "unknown_arm"  # names a (model, version, arm) this server never served
REJECT_REASONS = (INVALID, UNKNOWN_ARM)


class Outcome(Protocol):
    """What the tracker reads of an outcome: a `StepOutcome` or an `OutcomeValues`."""

    @property
    def routing_key(self) -> str: ...
    @property
    def step(self) -> int: ...
    @property
    def source(self) -> DecisionSource: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> int: ...
    @property
    def arm(self) -> str: ...
    @property
    def decision_step(self) -> int: ...
    @property
    def drafted(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def draft_seconds(self) -> float: ...
    @property
    def verify_seconds(self) -> float: ...
    @property
    def sequence_end(self) -> bool: ...


@dataclass(frozen=True)
class OutcomeConfig:
    """Bounds of the tracker (flags of `speckv-predictor serve`)."""

    # Per-sequence records kept per arm (--arm-stats-max-sequences); the oldest (by last
    # outcome) are dropped from the list, the since-reset totals keep counting them.
    max_sequences: int = 20_000
    # Outcomes one Decide message may carry (--max-outcomes-per-message); more: the
    # message is refused with RESOURCE_EXHAUSTED naming `outcomes`, none of them counted.
    max_outcomes_per_message: int = 4096
    # Shadow predictions waiting for their step's outcome (least recently stored dropped).
    shadow_memory: int = 65_536
    max_routing_key_bytes: int = 256
    max_name_bytes: int = 256
    # Largest gamma a remote decision can ask for (DeciderConfig.max_gamma).
    max_gamma: int = 64
    # A step's draft or verify seconds above this is refused as malformed.
    max_step_seconds: float = 3600.0
    # Malformed outcomes are logged at most once per this many seconds.
    log_interval_s: float = 10.0

    def check(self) -> None:
        if self.max_sequences < 0:
            raise ValueError(f"--arm-stats-max-sequences must be >= 0, got {self.max_sequences}")
        if self.max_outcomes_per_message < 1:
            raise ValueError(
                f"--max-outcomes-per-message must be >= 1, got {self.max_outcomes_per_message}"
            )
        if self.shadow_memory < 0:
            raise ValueError(f"shadow_memory must be >= 0, got {self.shadow_memory}")


# A sequence's totals over the steps one arm decided, replaced (never mutated) on each
# outcome so a reader can copy references under the lock and build answers outside it:
# (steps, drafted, accepted, tokens, draft_seconds, verify_seconds, last_outcome_time, ended).
_Record = tuple[int, int, int, int, float, float, float, bool]


class _Arm:
    """Since-reset totals of one arm and its most recent per-sequence records."""

    __slots__ = (
        "accepted",
        "draft_seconds",
        "drafted",
        "records",
        "sequences",
        "steps",
        "tokens",
        "verify_seconds",
    )

    def __init__(self) -> None:
        self.steps = self.drafted = self.accepted = self.tokens = self.sequences = 0
        self.draft_seconds = self.verify_seconds = 0.0
        self.records: OrderedDict[str, _Record] = OrderedDict()


class _Calibration:
    __slots__ = ("abs_error", "predicted", "realised", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.predicted = self.realised = self.abs_error = 0.0


@dataclass(slots=True)
class ArmDelta:
    """What one `record()` call added to one arm (for the Prometheus counters)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0
    sequences: int = 0  # sequences this arm saw for the first time (since its record)


@dataclass(slots=True)
class RecordSummary:
    """What one batch of outcomes changed; the servicer feeds it to the metrics."""

    arms: dict[ArmKey, ArmDelta] = field(default_factory=dict)
    fallback: int = 0
    local: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    # (model, shadow version, predicted acceptance, realised acceptance) per calibrated step.
    shadow: list[tuple[str, int, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ShadowScores:
    """The handoff from the decide path to the shadow calibration: a shadow version's
    predicted acceptance for rows just decided, remembered by (model, routing key, step)
    until each step's outcome arrives (`Decider.score_shadow` -> `remember_shadow`)."""

    model: str
    version: int  # the shadow version
    keys: Sequence[str]  # [R] routing keys
    steps: Sequence[int]  # [R] decode steps
    candidates: tuple[int, ...]  # [G] the γ values scored
    acceptance: np.ndarray  # [R, G] predicted acceptance


_FLOAT32 = struct.Struct("<f")


def _too_long(value: str, limit: int) -> bool:
    return len(value) > limit // 4 and len(value.encode()) > limit


class ArmStatsTracker:
    """Per-arm outcome totals since reset and over a sliding window; one per server."""

    def __init__(
        self,
        config: OutcomeConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        arm_known: Callable[[ArmKey], bool] | None = None,
    ) -> None:
        """`arm_known(key)` says whether an outcome may name that (model, version, arm);
        asked once per arm (per reset). None accepts every arm (tests)."""
        self.config = config or OutcomeConfig()
        self.config.check()
        self._clock = clock
        self._arm_known = arm_known
        self._lock = threading.Lock()
        self._arms: dict[ArmKey, _Arm] = {}
        self._fallback = 0
        self._local = 0
        self._rejected = 0
        self._reset_at = clock()
        self._model_reset_at: dict[str, float] = {}
        # (model, routing_key, step) -> (shadow version, candidates, float32 acceptance per
        # candidate as bytes: about 300 bytes an entry instead of 450 with a list of floats).
        self._shadow_pending: OrderedDict[
            tuple[str, str, int], tuple[int, tuple[int, ...], bytes]
        ] = OrderedDict()
        self._shadows: dict[ShadowKey, _Calibration] = {}
        self._log_lock = threading.Lock()
        self._log_next = 0.0
        self._log_suppressed = 0

    # ----- writes ------------------------------------------------------------------------

    def record(self, outcomes: Sequence[Outcome]) -> RecordSummary:
        """Count a batch of outcomes (one Decide message's); never raises on bad input."""
        summary = RecordSummary()
        first_problem: str | None = None
        rejected = 0
        cfg = self.config
        now = self._clock()
        remote, fallback = DecisionSource.REMOTE, DecisionSource.FALLBACK
        with self._lock:
            arms = self._arms
            pending = self._shadow_pending
            for i, o in enumerate(outcomes):
                problem = self._problem(o)
                if problem is not None:
                    rejected += 1
                    summary.rejected[INVALID] = summary.rejected.get(INVALID, 0) + 1
                    if first_problem is None:
                        first_problem = f"outcomes[{i}].{problem}"
                    continue
                source = o.source
                if source != remote:
                    if source == fallback:
                        summary.fallback += 1
                        self._fallback += 1
                    else:  # LOCAL (anything else was refused by _problem)
                        summary.local += 1
                        self._local += 1
                    continue
                key = (o.model_name, o.model_version, o.arm)
                arm = arms.get(key)
                if arm is None:
                    if self._arm_known is not None and not self._arm_known(key):
                        rejected += 1
                        n = summary.rejected.get(UNKNOWN_ARM, 0)
                        summary.rejected[UNKNOWN_ARM] = n + 1
                        if first_problem is None:
                            first_problem = (
                                f"outcomes[{i}]: {o.model_name} v{o.model_version} arm "
                                f"{o.arm!r} never decided anything on this server"
                            )
                        continue
                    arm = arms[key] = _Arm()
                delta = summary.arms.get(key)
                if delta is None:
                    delta = summary.arms[key] = ArmDelta()
                ds, vs = o.draft_seconds, o.verify_seconds
                arm.steps += 1
                arm.drafted += o.drafted
                arm.accepted += o.accepted
                arm.tokens += o.tokens
                arm.draft_seconds += ds
                arm.verify_seconds += vs
                delta.steps += 1
                delta.drafted += o.drafted
                delta.accepted += o.accepted
                delta.tokens += o.tokens
                delta.seconds += ds + vs
                records = arm.records
                rk = o.routing_key
                rec = records.get(rk)
                if rec is None:
                    arm.sequences += 1
                    delta.sequences += 1
                    records[rk] = (
                        1,
                        o.drafted,
                        o.accepted,
                        o.tokens,
                        ds,
                        vs,
                        now,
                        o.sequence_end,
                    )
                    if len(records) > cfg.max_sequences:
                        records.popitem(last=False)
                else:
                    records[rk] = (
                        rec[0] + 1,
                        rec[1] + o.drafted,
                        rec[2] + o.accepted,
                        rec[3] + o.tokens,
                        rec[4] + ds,
                        rec[5] + vs,
                        now,
                        o.sequence_end,
                    )
                    records.move_to_end(rk)
                if pending:
                    self._calibrate(o, summary)
            self._rejected += rejected
        if first_problem is not None:
            self._log_rejected(rejected, first_problem, now)
        return summary

    def _problem(self, o: Outcome) -> str | None:
        """`field: why` for an outcome that cannot be counted, else None."""
        cfg = self.config
        source = o.source
        if source not in (DecisionSource.REMOTE, DecisionSource.FALLBACK, DecisionSource.LOCAL):
            return "source: must be DECISION_SOURCE_REMOTE, _FALLBACK or _LOCAL"
        if not o.routing_key:
            return "routing_key: is empty; send the row's routing_key"
        if _too_long(o.routing_key, cfg.max_routing_key_bytes):
            return f"routing_key: longer than {cfg.max_routing_key_bytes} bytes"
        if min(o.step, o.drafted, o.accepted, o.tokens) < 0:
            return "step, drafted, accepted and tokens must be >= 0"
        if o.accepted > o.drafted:
            return f"accepted: {o.accepted} > drafted {o.drafted}"
        if o.tokens > o.drafted + 1:
            return f"tokens: {o.tokens} > drafted + 1 = {o.drafted + 1}"
        for name, value in (
            ("draft_seconds", o.draft_seconds),
            ("verify_seconds", o.verify_seconds),
        ):
            if not (0.0 <= value <= cfg.max_step_seconds):  # NaN compares False
                return f"{name}: {value} is not in [0, {cfg.max_step_seconds:g}] seconds"
        if source == DecisionSource.REMOTE:
            if not o.model_name:
                return "model_name: is empty; a REMOTE outcome names the decision's model"
            if _too_long(o.model_name, cfg.max_name_bytes):
                return f"model_name: longer than {cfg.max_name_bytes} bytes"
            if not o.arm:
                return "arm: is empty; a REMOTE outcome names the decision's arm"
            if _too_long(o.arm, cfg.max_name_bytes):
                return f"arm: longer than {cfg.max_name_bytes} bytes"
            if o.model_version < 1:
                return f"model_version: is {o.model_version}; a decision's version is >= 1"
            if o.drafted > cfg.max_gamma:
                return f"drafted: {o.drafted} > the largest gamma a decision asks ({cfg.max_gamma})"
        return None

    def _log_rejected(self, n: int, example: str, now: float) -> None:
        with self._log_lock:
            if now < self._log_next:
                self._log_suppressed += n
                return
            earlier, self._log_suppressed = self._log_suppressed, 0
            self._log_next = now + self.config.log_interval_s
        more = f" (+{earlier} refused since the last report)" if earlier else ""
        log.warning(
            "refused %d step outcome(s) of a Decide message%s, e.g. %s; they are counted in "
            "GetArmStats.rejected_outcomes and never credited to an arm",
            n,
            more,
            example,
        )

    def _calibrate(self, o: Outcome, summary: RecordSummary) -> None:
        """Compare the shadow's prediction for this step with what it realised (lock held)."""
        if o.decision_step not in (0, o.step):
            return  # a draft-plan step: plans make no per-step predictions
        entry = self._shadow_pending.pop((o.model_name, o.routing_key, o.step), None)
        if entry is None or o.drafted == 0:
            return
        version, candidates, predicted = entry
        try:
            j = candidates.index(o.drafted)
        except ValueError:
            return  # the worker drafted a length the shadow did not score
        (p,) = _FLOAT32.unpack_from(predicted, 4 * j)
        r = o.accepted / o.drafted
        skey = (o.model_name, version)
        c = self._shadows.get(skey)
        if c is None:
            c = self._shadows[skey] = _Calibration()
        c.steps += 1
        c.predicted += p
        c.realised += r
        c.abs_error += abs(p - r)
        summary.shadow.append((o.model_name, version, p, r))

    def remember_shadow(self, scores: ShadowScores) -> None:
        """A shadow version's predicted acceptance `[rows, candidates]` for rows just
        decided; compared with the realised acceptance when each step's outcome arrives."""
        cap = self.config.shadow_memory
        if cap == 0:
            return
        model, version, keys, steps = scores.model, scores.version, scores.keys, scores.steps
        candidates, acceptance = scores.candidates, scores.acceptance
        acc = np.ascontiguousarray(acceptance, dtype="<f4")
        if acc.shape != (len(keys), len(candidates)):
            raise ValueError(
                f"acceptance has shape {acc.shape}; expected ({len(keys)}, {len(candidates)})"
            )
        rows = [acc[i].tobytes() for i in range(acc.shape[0])]
        with self._lock:
            pending = self._shadow_pending
            for key, step, row in zip(keys, steps, rows, strict=True):
                k = (model, key, step)
                if k in pending:
                    pending.move_to_end(k)
                pending[k] = (version, candidates, row)
            while len(pending) > cap:
                pending.popitem(last=False)

    def reset(self, model_name: str = "") -> None:
        """Start the since-reset counts afresh for one model ('' = everything)."""
        now = self._clock()
        with self._lock:
            if not model_name:
                self._arms.clear()
                self._shadows.clear()
                self._fallback = self._local = self._rejected = 0
                self._reset_at = now
                self._model_reset_at.clear()
                return
            for key in [k for k in self._arms if k[0] == model_name]:
                del self._arms[key]
            for skey in [k for k in self._shadows if k[0] == model_name]:
                del self._shadows[skey]
            self._model_reset_at[model_name] = now

    # ----- reads -------------------------------------------------------------------------

    def report(
        self,
        model_name: str = "",
        window_seconds: float = 0.0,
        include_sequences: bool = True,
        replica: str = "",
    ) -> ArmStatsReport:
        """Arms sorted by (model, version, arm). `window_seconds` > 0: only sequences whose
        last outcome is that recent, totals summed from their records; 0: since reset."""
        if not (math.isfinite(window_seconds) and window_seconds >= 0):
            raise ValueError(f"window_seconds must be a finite number >= 0, got {window_seconds}")
        now = self._clock()
        cutoff = now - window_seconds
        copied: list[tuple[ArmKey, tuple[float, ...], list[tuple[str, _Record]]]] = []
        with self._lock:
            for key in sorted(self._arms):
                if model_name and key[0] != model_name:
                    continue
                a = self._arms[key]
                totals: tuple[float, ...] = (
                    a.sequences,
                    a.steps,
                    a.drafted,
                    a.accepted,
                    a.tokens,
                    a.draft_seconds,
                    a.verify_seconds,
                )
                if window_seconds > 0:
                    recent: list[tuple[str, _Record]] = []
                    for item in reversed(a.records.items()):
                        if item[1][6] < cutoff:
                            break
                        recent.append(item)
                    recent.reverse()
                    copied.append((key, totals, recent))
                else:
                    copied.append(
                        (key, totals, list(a.records.items()) if include_sequences else [])
                    )
            shadows = [
                (k, c.steps, c.predicted, c.realised, c.abs_error)
                for k, c in sorted(self._shadows.items())
                if not model_name or k[0] == model_name
            ]
            fallback, local, rejected = self._fallback, self._local, self._rejected
            since = self._reset_at
            if model_name:
                since = max(since, self._model_reset_at.get(model_name, since))
        arms = []
        for (model, version, arm), totals, records in copied:
            if window_seconds > 0:
                if not records:
                    continue  # no sequence of this arm reported within the window
                sums = [0, 0, 0, 0]
                for _, r in records:
                    sums[0] += r[0]
                    sums[1] += r[1]
                    sums[2] += r[2]
                    sums[3] += r[3]
                totals = (
                    len(records),
                    *sums,
                    math.fsum(r[4] for _, r in records),
                    math.fsum(r[5] for _, r in records),
                )
            seqs = (
                tuple(
                    SequenceOutcome(
                        routing_key=rk,
                        steps=r[0],
                        drafted=r[1],
                        accepted=r[2],
                        tokens=r[3],
                        seconds=r[4] + r[5],
                        ended=r[7],
                    )
                    for rk, r in records
                )
                if include_sequences
                else ()
            )
            arms.append(
                ArmStats(
                    model_name=model,
                    model_version=version,
                    arm=arm,
                    sequences=int(totals[0]),
                    steps=int(totals[1]),
                    drafted=int(totals[2]),
                    accepted=int(totals[3]),
                    tokens=int(totals[4]),
                    draft_seconds=float(totals[5]),
                    verify_seconds=float(totals[6]),
                    sequence_outcomes=seqs,
                )
            )
        return ArmStatsReport(
            arms=tuple(arms),
            shadows=tuple(
                ShadowCalibration(
                    model_name=m,
                    model_version=v,
                    steps=n,
                    mean_predicted_acceptance=p / n if n else 0.0,
                    mean_realised_acceptance=r / n if n else 0.0,
                    mean_absolute_error=e / n if n else 0.0,
                )
                for (m, v), n, p, r, e in shadows
            ),
            fallback_steps=fallback,
            local_steps=local,
            rejected_outcomes=rejected,
            seconds_since_reset=max(0.0, now - since),
            replica=replica,
        )
