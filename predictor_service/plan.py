"""Draft plans: a `draft_plan` model compiled into the table a worker applies per token.

The model's inputs are the plan axes' bin indices plus comp_enc, so evaluating it on every
grid cell gives exactly the model (speckv.draft_plan, docs/design.md "Draft plans"). The
table depends only on the version and the compression, so it is computed once per
(version, compression) and cached; a plan request then costs the threshold arithmetic and
the message. The stop thresholds come from the goodput objective and the worker's timing;
with `tokens_per_step` the worker drafts up to max_gamma whatever the estimates say.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

import numpy as np
from speckv.draft_plan import DraftPlan, goodput_thresholds, grid_inputs

from predictor_service.decisions import Objective, StepTiming
from predictor_service.manifest import Manifest


class PlanModel(Protocol):
    """What plan building needs of a loaded version (repository.LoadedVersion fits)."""

    manifest: Manifest

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class PlanTables:
    """Per-(version object, comp_enc) acceptance tables, computed on first use.

    Keyed weakly by the loaded version, so an unloaded version's table (and its session)
    is freed with it; a reload is a new object with a new table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: weakref.WeakKeyDictionary[PlanModel, dict[float, tuple[float, ...]]] = (
            weakref.WeakKeyDictionary()
        )

    def table(self, model: PlanModel, comp_enc: float) -> tuple[float, ...]:
        comp = float(comp_enc)
        hit = self._tables.get(model, {}).get(comp)
        if hit is not None:
            return hit
        spec = model.manifest.plan
        if spec is None:
            raise ValueError(f"{model.manifest.name} v{model.manifest.version} has no plan")
        acc = model.predict(grid_inputs(spec.axes, comp)).astype(np.float64)
        values = tuple(float(v) for v in np.clip(acc, 0.0, 1.0))
        with self._lock:
            self._tables.setdefault(model, {})[comp] = values
        return values


def build_plan(
    tables: PlanTables,
    model: PlanModel,
    comp_enc: float,
    max_gamma: int,
    objective: Objective,
    timing: StepTiming | None,
    scales: tuple[float, float] | None = None,
) -> DraftPlan:
    """The plan for one sequence; `max_gamma` is the request's largest candidate;
    `scales` overrides the manifest's (first, continue) scales (tuning only)."""
    spec = model.manifest.plan
    if spec is None:
        raise ValueError(f"{model.manifest.name} v{model.manifest.version} is not a plan model")
    if objective is Objective.GOODPUT:
        if timing is None:
            raise ValueError("the goodput objective needs the worker's StepTiming")
        t = goodput_thresholds(
            timing.draft_seconds_per_token,
            timing.verify_base_seconds,
            timing.verify_seconds_per_token,
            timing.target_only_seconds,
            *(scales or (spec.first_scale, spec.continue_scale)),
        )
        first, keep_going = t.first, t.keep_going
    else:
        first, keep_going = 0.0, 0.0
    return DraftPlan(
        axes=spec.axes,
        acceptance=tables.table(model, comp_enc),
        max_gamma=max(1, min(spec.max_gamma, max_gamma)),
        first_threshold=first,
        continue_threshold=keep_going,
        refresh_steps=spec.refresh_steps,
    )
