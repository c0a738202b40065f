"""Moving averages of the worker's measured costs: the parameters of the one cost model
(`speckv.costs.CostModel`, docs/design.md "Cost model") that the predictor's goodput
objective reads from the reported `StepTiming`.

The worker reports its per-token draft time and a linear verify-cost model for speculative
steps, t_verify(γ ≥ 1) = base + γ·per_token, fitted by exponentially weighted least squares
over the γ ≥ 1 steps it has run, plus the measured cost of a plain γ = 0 step
(`target_only_seconds`) as its own moving average. γ = 0 is costed apart because one
position costs less than the line's intercept; charging it the intercept would make
speculation look cheaper than it is. When the recent steps all used one gamma the slope is not
identifiable; then the last identified slope is kept (from warm-up or earlier steps) and
only the intercept follows the data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from speckv.costs import MIN_SECONDS, CostModel
from speckv_client.types import StepTiming

# Relative variance of gamma below which the slope is treated as unidentifiable.
_MIN_GAMMA_VARIANCE = 0.05


@dataclass
class _Ewm:
    """Exponentially weighted sums for one least-squares fit."""

    w: float = 0.0
    g: float = 0.0
    gg: float = 0.0
    t: float = 0.0
    gt: float = 0.0

    def add(self, alpha: float, gamma: float, seconds: float) -> None:
        keep = 1.0 - alpha
        self.w = keep * self.w + alpha
        self.g = keep * self.g + alpha * gamma
        self.gg = keep * self.gg + alpha * gamma * gamma
        self.t = keep * self.t + alpha * seconds
        self.gt = keep * self.gt + alpha * gamma * seconds


class TimingModel:
    """Thread-safe running estimate of draft and verify costs on this worker's device."""

    def __init__(self, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self._draft_per_token: float | None = None
        self._verify = _Ewm()
        self._slope = 0.0
        self._target_only: float | None = None

    def add_draft(self, tokens: int, seconds: float) -> None:
        """One drafting phase: `tokens` draft forwards took `seconds` in all."""
        if tokens <= 0:
            return
        per_token = seconds / tokens
        with self._lock:
            prev = self._draft_per_token
            self._draft_per_token = (
                per_token if prev is None else (1 - self._alpha) * prev + self._alpha * per_token
            )

    def add_verify(self, gamma: int, seconds: float) -> None:
        """One target forward over gamma + 1 positions took `seconds`."""
        with self._lock:
            if gamma <= 0:
                prev = self._target_only
                self._target_only = (
                    seconds if prev is None else (1 - self._alpha) * prev + self._alpha * seconds
                )
            else:
                self._verify.add(self._alpha, float(gamma), seconds)

    def costs(self) -> CostModel | None:
        """The fitted cost model (speckv.costs), or None before both a draft and a verify
        were measured."""
        with self._lock:
            if self._draft_per_token is None:
                return None
            target_only = self._target_only or 0.0
            if self._verify.w == 0.0:
                if self._target_only is None:
                    return None
                # Only plain steps so far: the line starts at the plain step.
                return CostModel(self._draft_per_token, self._target_only, self._slope, target_only)
            s = self._verify
            mean_g, mean_t = s.g / s.w, s.t / s.w
            var_g = s.gg / s.w - mean_g * mean_g
            if var_g > _MIN_GAMMA_VARIANCE:
                slope = (s.gt / s.w - mean_g * mean_t) / var_g
                self._slope = max(slope, 0.0)
            base = max(mean_t - self._slope * mean_g, MIN_SECONDS)
            return CostModel(self._draft_per_token, base, self._slope, target_only)

    def snapshot(self) -> StepTiming | None:
        """The current estimate as the worker reports it, or None (see `costs`)."""
        model = self.costs()
        return None if model is None else StepTiming(*model.timing_fields())
