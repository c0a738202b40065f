"""The one cost model of a speculative step, and the goodput formula (docs/design.md, "Cost model").

A step that verifies γ drafted tokens costs

    t(γ) = γ · t_draft + t_verify(γ)   (+ t_draft for every drafted token a stop rule dropped)

with t_verify(γ ≥ 1) = base + γ · per_token (a line fitted over speculative steps only) and
t_verify(0) = the measured plain target step (`target_only_seconds`; `base` when it was not
measured, as workers before that field reported it). A table of measured t_verify per γ
(the seed's wall clock) may stand in for the line. Goodput is expected tokens per step
over t(γ).

Who feeds it: the worker's `TimingModel` (moving averages, reported as `StepTiming`), the
replay's measured forwards (`CostModel.fit`), the seed's seconds per γ
(`CostModel.tabulated`); who reads it: the predictor's goodput objective, the draft-plan
stop thresholds, the replay and the paper reproduction. Stdlib and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, overload

import numpy as np

# The shortest verify cost a fit may report (a plain target step always takes time).
MIN_SECONDS = 1e-9

_Num = TypeVar("_Num", float, np.ndarray)


class Timing(Protocol):
    """The measured numbers of a `StepTiming` (client or predictor side)."""

    @property
    def draft_seconds_per_token(self) -> float: ...

    @property
    def verify_base_seconds(self) -> float: ...

    @property
    def verify_seconds_per_token(self) -> float: ...

    @property
    def target_only_seconds(self) -> float: ...


@dataclass(frozen=True)
class StepTiming:
    """A worker's measured costs, as it reports them with every goodput request (the wire's
    `StepTiming`): t_verify(γ ≥ 1) = verify_base + γ · verify_per_token, and a plain γ = 0
    step costs `target_only_seconds` when the worker measured it (0 = unknown: γ = 0 then
    costs verify_base, as workers before that field reported it). `CostModel.of` reads it."""

    draft_seconds_per_token: float
    verify_base_seconds: float
    verify_seconds_per_token: float
    target_only_seconds: float = 0.0

    def problem(self) -> tuple[str, str] | None:
        """(field, why) for the first value the goodput formula cannot use, else None."""
        for name, value, must_be_positive in (
            ("draft_seconds_per_token", self.draft_seconds_per_token, False),
            ("verify_base_seconds", self.verify_base_seconds, True),
            ("verify_seconds_per_token", self.verify_seconds_per_token, False),
            ("target_only_seconds", self.target_only_seconds, False),
        ):
            if not math.isfinite(value):
                return name, f"must be a finite number of seconds, got {value}"
            if must_be_positive and value <= 0:
                return name, f"must be > 0 (a plain target step takes time), got {value}"
            if value < 0:
                return name, f"must be >= 0, got {value}"
        return None


def _clip_line(base: float, per_token: float) -> tuple[float, float]:
    """A fitted verify line made usable: a positive intercept, a slope ≥ 0 (noise on a
    shared machine can tilt a fit either way)."""
    return max(float(base), MIN_SECONDS), max(float(per_token), 0.0)


def fit_verify_line(verify_by_gamma: Sequence[float]) -> tuple[float, float]:
    """(base, per_token): least squares through measured verify seconds at γ ≥ 1 (index γ;
    index 0, the plain step, is left out: one position costs less than the line's
    intercept, docs/design.md "Cost model")."""
    g = np.arange(1, len(verify_by_gamma), dtype=float)
    if g.size < 2:
        return _clip_line(verify_by_gamma[-1], 0.0)
    slope, base = np.polyfit(g, np.asarray(verify_by_gamma[1:], dtype=float), 1)
    return _clip_line(base, slope)


def expected_tokens(acceptance: _Num, gamma: _Num) -> _Num:
    """Tokens a step yields on average: the accepted drafts plus the target's own token."""
    return acceptance * gamma + 1.0


@dataclass(frozen=True)
class CostModel:
    """Seconds of one decode step as a function of γ (field names as in `StepTiming`)."""

    draft_seconds_per_token: float
    verify_base_seconds: float
    verify_seconds_per_token: float
    target_only_seconds: float = 0.0  # 0 = not measured: a γ = 0 step costs the base
    # Measured t_verify by γ used instead of the line at those γ (empty: the line).
    verify_table: tuple[tuple[int, float], ...] = ()

    @classmethod
    def of(cls, timing: Timing) -> CostModel:
        """The model a worker's reported `StepTiming` describes."""
        return cls(
            timing.draft_seconds_per_token,
            timing.verify_base_seconds,
            timing.verify_seconds_per_token,
            timing.target_only_seconds,
        )

    @classmethod
    def fit(cls, draft_seconds_per_token: float, verify_by_gamma: Sequence[float]) -> CostModel:
        """From measured forwards: verify seconds at every γ from 0 (index γ)."""
        base, per_token = fit_verify_line(verify_by_gamma)
        return cls(draft_seconds_per_token, base, per_token, float(verify_by_gamma[0]))

    @classmethod
    def tabulated(
        cls, verify_seconds: Mapping[int, float], draft_seconds_per_token: float = 0.0
    ) -> CostModel:
        """From measured seconds per γ. A table of whole steps (the seed's wall clock
        includes drafting) is given with `draft_seconds_per_token` = 0."""
        table = tuple(sorted((int(g), float(s)) for g, s in verify_seconds.items()))
        plain = dict(table).get(0, 0.0)
        return cls(draft_seconds_per_token, MIN_SECONDS, 0.0, plain, table)

    def timing_fields(self) -> tuple[float, float, float, float]:
        """(draft per token, verify base, verify per token, target only): a `StepTiming`'s
        arguments in order."""
        return (
            self.draft_seconds_per_token,
            self.verify_base_seconds,
            self.verify_seconds_per_token,
            self.target_only_seconds,
        )

    @property
    def plain_step_seconds(self) -> float:
        """What a γ = 0 step costs."""
        return (
            self.target_only_seconds if self.target_only_seconds > 0 else self.verify_base_seconds
        )

    @property
    def token_seconds(self) -> float:
        """What one more drafted-and-verified token adds to a speculative step (the line's
        slope plus a draft forward)."""
        return self.draft_seconds_per_token + self.verify_seconds_per_token

    @overload
    def verify_seconds(self, gamma: int) -> float: ...
    @overload
    def verify_seconds(self, gamma: np.ndarray) -> np.ndarray: ...
    def verify_seconds(self, gamma: int | np.ndarray) -> float | np.ndarray:
        """t_verify(γ): the target forward over γ + 1 positions."""
        g = np.asarray(gamma)
        if self.verify_table:
            out = self._tabulated(g)
        else:
            out = np.where(
                g == 0,
                self.plain_step_seconds,
                g * self.verify_seconds_per_token + self.verify_base_seconds,
            )
        return float(out) if out.ndim == 0 else out

    @overload
    def step_seconds(self, gamma: int, drafted: int | None = None) -> float: ...
    @overload
    def step_seconds(self, gamma: np.ndarray, drafted: np.ndarray | None = None) -> np.ndarray: ...
    def step_seconds(
        self, gamma: int | np.ndarray, drafted: int | np.ndarray | None = None
    ) -> float | np.ndarray:
        """t(γ) = γ·t_draft + t_verify(γ), plus a draft forward for each token drafted
        beyond γ (`drafted` ≥ γ: a stop rule drafts the token it then drops)."""
        # On the predictor's hot path (every goodput decision): no copies, no branch work
        # that cannot change the result.
        g = gamma if isinstance(gamma, np.ndarray) else np.asarray(gamma)
        if self.verify_table:
            out = g * self.draft_seconds_per_token + self._tabulated(g)
        else:
            out = g * self.token_seconds + self.verify_base_seconds
            if self.target_only_seconds > 0:  # else a plain step costs the base: out already
                out = np.where(g == 0, self.target_only_seconds, out)
        if drafted is not None:
            out = out + np.maximum(np.asarray(drafted) - g, 0) * self.draft_seconds_per_token
        return float(out) if out.ndim == 0 else out

    def goodput(self, tokens: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        """Expected tokens per second of steps at γ that yield `tokens` on average (see
        `expected_tokens`)."""
        return tokens / self.step_seconds(gamma)

    def _tabulated(self, g: np.ndarray) -> np.ndarray:
        table = dict(self.verify_table)
        missing = set(np.unique(g).tolist()) - set(table)
        if missing:
            raise KeyError(f"no measured seconds for γ {sorted(missing)}")
        return np.vectorize(table.__getitem__, otypes=[float])(g)
