"""The draft plan: how a `draft_plan` model decides γ inside the step (docs/design.md).

One home for the plan's vocabulary, imported by the predictor (which builds plans), the
worker (which applies them token by token) and the replay (which measures them). Stdlib
and numpy only, so a predictor-only install can use it.

A plan is a table of per-token acceptance estimates over a small grid of features the
worker computes itself, plus the stop thresholds chosen by the goodput objective:

- **token features**, known as soon as a token is drafted: `match_length` (the longest
  n ≤ 4 such that the drafted token ends an n-gram already present in the prompt or
  output — prompt lookup's signal), `draft_confidence` and `draft_entropy` (the draft's
  own distribution at that token);
- **history features**, the sequence's recent outcomes: `prev_full` (1 when the last
  step's drafted tokens all agreed with the target, the heuristic's only input) and
  `accept_ema` (a moving average of per-token agreement), kept by the worker per sequence.

Each axis bins its feature by `edges` (bin = number of edges ≤ value); the model's inputs
are the bin indices in axis order plus `comp_enc`, so the table the predictor sends is
exactly the model evaluated on every cell. The worker drafts token j, looks up its
estimate p_j and keeps a running survival S_j = p_1·…·p_j:

- the first token is dropped (γ = 0, a plain target step) when p_1 < `first_threshold`;
- drafting continues while S_j · p_j ≥ `continue_threshold` and j < `max_gamma`.

The table covers every history state, so one plan serves many steps; the worker asks for
a fresh one every `refresh_steps` steps (and at the start of a sequence), which is what
makes a remote decision cost a fraction of a message per step.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# The plan's feature names and window live in the shared vocabulary; re-exported here.
from speckv.costs import MIN_SECONDS, CostModel
from speckv.vocabulary import COMP_ENC_FEATURE as COMP_ENC_FEATURE
from speckv.vocabulary import HISTORY_FEATURES as HISTORY_FEATURES
from speckv.vocabulary import PLAN_FEATURES as PLAN_FEATURES
from speckv.vocabulary import TOKEN_FEATURES as TOKEN_FEATURES
from speckv.vocabulary import WINDOW_DRAFT_PLAN as WINDOW_DRAFT_PLAN

# Longest context n-gram the worker tracks (match_length is capped here).
MAX_MATCH_LENGTH = 4
# Weight of the newest agreement event in `accept_ema`, and its value before any event.
ACCEPT_EMA_ALPHA = 0.3
ACCEPT_EMA_INITIAL = 0.5

# Limits a plan must respect (checked by both ends).
MAX_PLAN_CELLS = 4096
MAX_PLAN_AXES = 8
MAX_PLAN_GAMMA = 64


class PlanError(ValueError):
    """A plan or plan specification that cannot be used; the message names the part."""


@dataclass(frozen=True)
class PlanAxis:
    feature: str
    edges: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.edges) + 1

    def bin(self, value: float) -> int:
        return bisect_right(self.edges, value)


def check_axes(axes: Sequence[PlanAxis]) -> str | None:
    """Why these axes cannot form a plan, or None."""
    if not axes:
        return "a plan needs at least one axis"
    if len(axes) > MAX_PLAN_AXES:
        return f"has {len(axes)} axes; at most {MAX_PLAN_AXES}"
    seen: set[str] = set()
    cells = 1
    for i, a in enumerate(axes):
        if a.feature not in PLAN_FEATURES:
            return f"axes[{i}].feature {a.feature!r} is unknown; known: {', '.join(PLAN_FEATURES)}"
        if a.feature in seen:
            return f"axes[{i}].feature {a.feature!r} appears twice"
        seen.add(a.feature)
        if any(not math.isfinite(e) for e in a.edges):
            return f"axes[{i}].edges must be finite numbers"
        if any(b <= e for e, b in itertools.pairwise(a.edges)):
            return f"axes[{i}].edges must be strictly increasing"
        cells *= a.size
    if cells > MAX_PLAN_CELLS:
        return f"the grid has {cells} cells; at most {MAX_PLAN_CELLS}"
    return None


def grid_inputs(axes: Sequence[PlanAxis], comp_enc: float) -> np.ndarray:
    """Every cell of the grid as a model input row: bin indices in axis order, then
    comp_enc; C order (the last axis varies fastest). `[cells, len(axes) + 1]` float32."""
    idx = np.indices([a.size for a in axes]).reshape(len(axes), -1).T
    out = np.empty((idx.shape[0], len(axes) + 1), dtype=np.float32)
    out[:, : len(axes)] = idx
    out[:, len(axes)] = comp_enc
    return out


@dataclass(frozen=True)
class StopThresholds:
    first: float
    keep_going: float


def goodput_thresholds(
    draft_seconds_per_token: float,
    verify_base_seconds: float,
    verify_seconds_per_token: float,
    target_only_seconds: float,
    first_scale: float = 1.0,
    continue_scale: float = 1.0,
) -> StopThresholds:
    """The goodput objective's stop rule, from the worker's measured costs.

    A token is worth what it saves: one plain target step (`target_only_seconds`, the
    cost of producing a token without speculation). Keeping the first drafted token turns
    a plain step into a speculative one, which costs t_verify(1) − t_target_only more, so
    it pays when p_1 · t0 ≥ that difference. Drafting one more token costs a draft forward
    plus one verified position, and pays when the chance it is reached and accepted
    (estimated by S_j · p_j) times t0 exceeds that. The two scales (the manifest's, tuned
    on the training prompts) correct what this one-token look-ahead leaves out: a kept
    first token also opens the rest of the draft (so `first_scale` < 1 pays), and a token
    saves less than t0 once speculation runs (so `continue_scale` > 1 pays).
    """
    costs = CostModel(
        draft_seconds_per_token, verify_base_seconds, verify_seconds_per_token, target_only_seconds
    )
    t0 = max(costs.plain_step_seconds, MIN_SECONDS)
    first = max(0.0, costs.verify_seconds(1) - t0) / t0 * first_scale
    keep = costs.token_seconds / t0 * continue_scale
    return StopThresholds(min(first, 1.0), min(keep, 1.0))


@dataclass(frozen=True)
class DraftPlan:
    """What a `draft_plan` decision carries (predictor.proto, DraftPlan)."""

    axes: tuple[PlanAxis, ...]
    acceptance: tuple[float, ...]  # per cell, C order over `axes`
    max_gamma: int
    first_threshold: float
    continue_threshold: float
    refresh_steps: int

    def problem(self) -> str | None:
        """Why the worker cannot apply this plan, or None."""
        why = check_axes(self.axes)
        if why:
            return why
        cells = math.prod(a.size for a in self.axes)
        if len(self.acceptance) != cells:
            return f"has {len(self.acceptance)} acceptance values for a {cells}-cell grid"
        if any(not (0.0 <= p <= 1.0) for p in self.acceptance):
            return "acceptance values must lie in [0, 1]"
        if not 1 <= self.max_gamma <= MAX_PLAN_GAMMA:
            return f"max_gamma {self.max_gamma} is outside [1, {MAX_PLAN_GAMMA}]"
        for name, t in (("first", self.first_threshold), ("continue", self.continue_threshold)):
            if not (0.0 <= t <= 1.0):
                return f"{name} threshold {t} is outside [0, 1]"
        if self.refresh_steps < 1:
            return f"refresh_steps {self.refresh_steps} must be ≥ 1"
        return None


class PlanRunner:
    """Applies one plan to one sequence's drafted tokens (the worker's per-token rule).

    Precomputes strides so a lookup is a few bisects and one index; pure Python on
    purpose (a numpy call per drafted token would cost more than the arithmetic).
    """

    def __init__(self, plan: DraftPlan) -> None:
        self.plan = plan
        strides: list[int] = []
        s = 1
        for a in reversed(plan.axes):
            strides.append(s)
            s *= a.size
        self._axes = [
            (a.feature, a.edges, st) for a, st in zip(plan.axes, reversed(strides), strict=True)
        ]
        self._table = plan.acceptance
        self.survival = 1.0

    def estimate(self, values: Mapping[str, float]) -> float:
        i = 0
        for feature, edges, stride in self._axes:
            i += bisect_right(edges, values[feature]) * stride
        return self._table[i]

    def start_step(self) -> None:
        self.survival = 1.0

    def after_token(self, j: int, p: float, cap: int) -> int | None:
        """Token j (1-based) was drafted with estimate p: None to draft another, else how
        many drafted tokens to verify (0 = a plain target step)."""
        plan = self.plan
        if j == 1 and p < plan.first_threshold:
            return 0
        self.survival *= p
        if j >= min(plan.max_gamma, cap):
            return j
        if self.survival * p < plan.continue_threshold:
            return j
        return None
