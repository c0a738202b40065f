"""Moving averages of the worker's measured costs, for the goodput objective.

The predictor scores a candidate gamma by (â(γ)·γ + 1) / (γ·t_draft + t_verify(γ)), so the
worker reports its per-token draft time and a linear verify-cost model
t_verify(γ) = base + γ·per_token, fitted by exponentially weighted least squares over the
steps it has run. When the recent steps all used one gamma the slope is not identifiable;
then the last identified slope is kept (from warm-up or earlier steps) and only the
intercept follows the data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

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
            self._verify.add(self._alpha, float(gamma), seconds)

    def snapshot(self) -> StepTiming | None:
        """Current estimate, or None before both a draft and a verify were measured."""
        with self._lock:
            if self._draft_per_token is None or self._verify.w == 0.0:
                return None
            s = self._verify
            mean_g, mean_t = s.g / s.w, s.t / s.w
            var_g = s.gg / s.w - mean_g * mean_g
            if var_g > _MIN_GAMMA_VARIANCE:
                slope = (s.gt / s.w - mean_g * mean_t) / var_g
                self._slope = max(slope, 0.0)
            base = max(mean_t - self._slope * mean_g, 1e-9)
            return StepTiming(
                draft_seconds_per_token=self._draft_per_token,
                verify_base_seconds=base,
                verify_seconds_per_token=self._slope,
            )
