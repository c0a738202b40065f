"""The predictor's decide path: validate a message's rows, route, score, answer.

Reads only what the registry (`registry.py`, the control plane) publishes: each message
reads the current immutable `RouteTable` of its model once, without a lock, so a load,
unload or routing change never waits on a model run and never changes a message mid-way.
Works on numpy arrays and dataclasses only; `servicer.py` converts protobuf at the edge.
After an answer is sent, `score_shadow` scores the shadow version on the same rows and
hands its predictions to the outcomes calibration (`outcomes.ShadowScores`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from speckv.draft_plan import WINDOW_DRAFT_PLAN, DraftPlan
from speckv.vocabulary import (
    COMP_ENC_BY_WIRE,
    WINDOW_SERVED_BY,
    WIRE_COMPRESSION_MAX,
    WIRE_COMPRESSION_MIN,
    comp_enc_from_wire,
)

from predictor_service.decisions import (
    CandidateSet,
    Choice,
    Objective,
    StepTiming,
    choose_gamma,
)
from predictor_service.manifest import DRAFT_SIGNALS
from predictor_service.metrics import PredictorMetrics
from predictor_service.outcomes import ShadowScores
from predictor_service.plan import PlanTables, build_plan
from predictor_service.refusals import ErrorKind, RequestRefused
from predictor_service.repository import LoadedVersion
from predictor_service.router import RouteTable

CONFIDENCE_SLACK = 1e-6
CANDIDATE_CACHE_SIZE = 256
# Valid signal ranges per column (DRAFT_SIGNALS order: entropy, confidence, entropy,
# confidence); comparisons are False for NaN and ±inf falls outside, so one range test per
# value finds every refused row (the slow path then names the first one). The bounds are in
# the units the model runs in: float32, so a value finite in float64 but not in float32
# (entropy 1e39) is refused instead of reaching the model as inf and coming back as NaN.
_FLOAT_MAX = float(np.finfo(np.float32).max)
_SIGNAL_LOW = np.zeros(4)
_SIGNAL_HIGH = np.array([_FLOAT_MAX, 1 + CONFIDENCE_SLACK, _FLOAT_MAX, 1 + CONFIDENCE_SLACK])
_SIGNAL_BOUNDS = tuple(zip(_SIGNAL_LOW.tolist(), _SIGNAL_HIGH.tolist(), strict=True))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# comp_enc of a single-row message, shared read-only instead of allocated per message.
_ONE_ROW_COMP_ENC = {
    c: _frozen(np.array([e], dtype=np.float32)) for c, e in COMP_ENC_BY_WIRE.items()
}


@dataclass(frozen=True)
class DeciderConfig:
    """Per-message limits of the decide path (the `serve` flags of the same names)."""

    max_batch_rows: int = 1024
    max_candidates: int = 16
    max_gamma: int = 64


@dataclass(frozen=True)
class Selector:
    name: str = ""
    version: int = 0
    alias: str = ""


@dataclass(frozen=True)
class DecideInput:
    keys: Sequence[str]  # [R]
    steps: Sequence[int]  # [R]
    signals: np.ndarray  # [R, 4] float64, DRAFT_SIGNALS order
    compression: np.ndarray  # [R] int64, the Compression enum value (1 fp16, 2 int8, 3 nf4)
    window: str  # "same_step" | "prefix" | "previous_step"
    gammas: Sequence[int]
    objective: Objective | None  # None: the manifest's default
    timing: StepTiming | None
    model: Selector = Selector()


@dataclass(frozen=True)
class Group:
    """Rows of one message served by one version through one arm."""

    version: LoadedVersion
    arm: str
    rows: np.ndarray | None  # [k] row indices, None = every row


@dataclass(frozen=True)
class DecideResult:
    choice: Choice  # rows in request order
    candidates: tuple[int, ...]
    groups: tuple[Group, ...]
    row_group: np.ndarray | None  # [R] index into groups, None when there is one group
    # What the shadow needs; scored after the answer is sent.
    shadow: LoadedVersion | None
    comp_enc: np.ndarray
    signals: np.ndarray
    objective: Objective
    timing: StepTiming | None
    table_model: str
    # The draft_plan window's answers, one per row (choice.gamma is each plan's max_gamma).
    plans: list[DraftPlan] | None = None
    # The rows' routing keys and steps (what a shadow's predictions are remembered by).
    keys: Sequence[str] = ()
    steps: Sequence[int] = ()


def objective_for(requested: Objective | None, version: LoadedVersion) -> Objective:
    """The objective a version decides with: the request's, else its manifest's default."""
    return requested or Objective(version.manifest.default_objective)


def check_choice(choice: Choice, timing: StepTiming | None) -> None:
    """Never answer a non-finite score or an acceptance outside [0, 1]: refuse the message.

    Inputs are validated in float32 before the model runs, but a model can still overflow
    inside (huge finite signals) and tiny timings can overflow the goodput score.
    """
    acc, score = choice.acceptance, choice.score
    if np.isfinite(score).all() and acc.min() >= 0.0 and acc.max() <= 1.0:
        return
    bad_acc = ~((acc >= 0.0) & (acc <= 1.0))  # NaN compares False
    if bad_acc.any():
        i = int(np.argwhere(bad_acc)[0][0])
        raise RequestRefused(
            ErrorKind.INVALID_ARGUMENT,
            f"rows[{i}].signals",
            "the model's predicted acceptance for these signals is not a number in [0, 1] "
            "(the signals are far outside what it was trained on); nothing was answered",
        )
    i = int(np.argwhere(~np.isfinite(score))[0][0])
    what = f"timing {timing}" if timing is not None else "these inputs"
    raise RequestRefused(
        ErrorKind.INVALID_ARGUMENT,
        "timing",
        f"the objective is not a finite number for rows[{i}] with {what}; send the "
        "worker's measured times in seconds (e.g. verify_base_seconds 0.005)",
    )


class PublishedTables(Protocol):
    """What the decide path reads of the control plane: a model's current snapshot
    (`ModelRegistry.table`), or `RequestRefused` naming the choices."""

    def table(self, name: str) -> RouteTable: ...


class Decider:
    """The decide path on plain values: Decide messages, raw Predict rows, shadow scoring."""

    def __init__(
        self,
        tables: PublishedTables,
        config: DeciderConfig | None = None,
        metrics: PredictorMetrics | None = None,
    ) -> None:
        self.tables = tables
        self.config = config or DeciderConfig()
        self.metrics = metrics or PredictorMetrics()
        self.plan_tables = PlanTables()
        self._candidates: dict[tuple[int, ...], CandidateSet] = {}

    def _pick(self, table: RouteTable, sel: Selector) -> tuple[LoadedVersion, str] | None:
        """A pinned version and its arm name, or None to follow the routing."""
        if sel.version and sel.alias:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT, "model", "pin a version or an alias, not both"
            )
        if sel.version < 0:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT, "model.version", f"must be >= 0, got {sel.version}"
            )
        if sel.version:
            v = table.versions.get(sel.version)
            if v is None:
                raise RequestRefused(
                    ErrorKind.NOT_FOUND,
                    "model.version",
                    f"{table.model} v{sel.version} is not loaded (loaded: "
                    f"{sorted(table.versions)})",
                )
            return v, "pinned"
        if sel.alias:
            v = table.aliases.get(sel.alias)
            if v is None:
                raise RequestRefused(
                    ErrorKind.NOT_FOUND,
                    "model.alias",
                    f"{table.model} has no alias {sel.alias!r} (aliases: {sorted(table.aliases)})",
                )
            return v, "pinned"
        return None

    # ----- decisions ---------------------------------------------------------------------

    def check_candidates(self, gammas: Sequence[int]) -> CandidateSet:
        """Validated candidates; a set seen before comes from a cache (workers repeat theirs)."""
        key = tuple(gammas)
        cached = self._candidates.get(key)
        if cached is not None:
            return cached
        c = self._check_candidates(gammas)
        if len(self._candidates) >= CANDIDATE_CACHE_SIZE:
            self._candidates.clear()  # bounded: a client cycling through sets cannot grow it
        self._candidates[key] = c
        return c

    def _check_candidates(self, gammas: Sequence[int]) -> CandidateSet:
        if not gammas:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "gamma_candidates",
                "is empty; send the gamma values to choose among (e.g. [0, 2, 4, 6, 8])",
            )
        if len(gammas) > self.config.max_candidates:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "gamma_candidates",
                f"has {len(gammas)} values; at most {self.config.max_candidates} are allowed",
            )
        seen: set[int] = set()
        for i, g in enumerate(gammas):
            if g < 0 or g > self.config.max_gamma:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    f"gamma_candidates[{i}]",
                    f"is {g}; candidates must lie in [0, {self.config.max_gamma}] "
                    "(0 = a plain target step)",
                )
            if g in seen:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    f"gamma_candidates[{i}]",
                    f"{g} is listed twice; candidates must be distinct",
                )
            seen.add(g)
        return CandidateSet.of(gammas)

    def check_rows(self, signals: np.ndarray, compression: np.ndarray) -> np.ndarray:
        """Validate row values; returns comp_enc `[R]` float32 (Compression value - 1)."""
        r = signals.shape[0]
        if r == 0:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT, "rows", "is empty; send one row per sequence"
            )
        if r > self.config.max_batch_rows:
            raise RequestRefused(
                ErrorKind.RESOURCE_EXHAUSTED,
                "rows",
                f"has {r} rows; at most {self.config.max_batch_rows} per message (split the batch)",
            )
        if r == 1:
            # The common single-sequence message: plain float compares, no array temporaries.
            values = signals[0].tolist()
            ok = all(lo <= v <= hi for v, (lo, hi) in zip(values, _SIGNAL_BOUNDS, strict=True))
            if ok:
                comp = int(compression[0])
                one = _ONE_ROW_COMP_ENC.get(comp)
                if one is not None:
                    return one
        elif (
            ((signals >= _SIGNAL_LOW) & (signals <= _SIGNAL_HIGH)).all()
            and compression.min() >= WIRE_COMPRESSION_MIN
            and compression.max() <= WIRE_COMPRESSION_MAX
        ):
            return comp_enc_from_wire(compression)
        # Something is refused: find the first bad value and name it.
        bad = ~np.isfinite(signals)
        bad |= np.abs(signals) > _FLOAT_MAX
        bad |= signals < 0
        bad[:, 1] |= signals[:, 1] > 1 + CONFIDENCE_SLACK
        bad[:, 3] |= signals[:, 3] > 1 + CONFIDENCE_SLACK
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            name = DRAFT_SIGNALS[j]
            want = "in [0, 1]" if "confidence" in name else f">= 0 (bits) and <= {_FLOAT_MAX:.8g}"
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                f"rows[{i}].signals.{name}",
                f"is {signals[i, j]}; must be a finite float32 number {want} (the model runs in "
                "float32)",
            )
        bad_comp = (compression < WIRE_COMPRESSION_MIN) | (compression > WIRE_COMPRESSION_MAX)
        if bad_comp.any():
            i = int(np.argmax(bad_comp))
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                f"rows[{i}].compression",
                f"is {int(compression[i])}; must be COMPRESSION_FP16 (1), COMPRESSION_INT8 (2) "
                "or COMPRESSION_NF4 (3)",
            )
        return comp_enc_from_wire(compression)

    def decide(self, inp: DecideInput) -> DecideResult:
        """γ for every row; one onnxruntime run per version the rows route to (usually one)."""
        served_by = WINDOW_SERVED_BY.get(inp.window)
        if served_by is None:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "window",
                f"is {inp.window!r}; set DECISION_WINDOW_SAME_STEP, _PREVIOUS_STEP or _PREFIX",
            )
        candidates = self.check_candidates(inp.gammas)
        comp_enc = self.check_rows(inp.signals, inp.compression)
        if inp.timing is not None:
            problem = inp.timing.problem()
            if problem:
                raise RequestRefused(ErrorKind.INVALID_ARGUMENT, f"timing.{problem[0]}", problem[1])
        table = self.tables.table(inp.model.name)
        pinned = self._pick(table, inp.model)
        if pinned is not None:
            groups: tuple[Group, ...] = (Group(pinned[0], pinned[1], None),)
            row_group = None
        elif len(table.arms) == 1:
            groups = (Group(table.arms[0].version, table.arms[0].name, None),)
            row_group = None
        else:
            idx = table.assign(inp.keys)
            present = np.unique(idx)
            if present.shape[0] == 1:
                arm = table.arms[int(present[0])]
                groups, row_group = (Group(arm.version, arm.name, None),), None
            else:
                groups = tuple(
                    Group(
                        table.arms[int(a)].version,
                        table.arms[int(a)].name,
                        np.flatnonzero(idx == a),
                    )
                    for a in present
                )
                row_group = np.searchsorted(present, idx)
        objective = inp.objective
        for g in groups:
            v = g.version
            if v.window != served_by:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    "window",
                    f"{v.name} v{v.version} is a {v.window} model; a {inp.window} request needs "
                    f"a {served_by} model (pin one with ModelSelector.name)",
                )
            obj = objective_for(objective, v)
            if obj is Objective.GOODPUT and inp.timing is None:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    "timing",
                    "is missing; the goodput objective needs the worker's measured draft and "
                    "verify times (or ask for OBJECTIVE_TOKENS_PER_STEP)",
                )
        resolved = objective_for(objective, groups[0].version)
        if served_by == WINDOW_DRAFT_PLAN:
            return self._decide_plans(inp, candidates, comp_enc, groups, row_group, table.model)
        if len(groups) == 1:
            t0 = time.perf_counter()
            choice = choose_gamma(
                groups[0].version.predict, inp.signals, comp_enc, candidates, resolved, inp.timing
            )
            self._record(table.model, groups[0], choice.gamma, time.perf_counter() - t0)
        else:
            r, n = inp.signals.shape[0], len(candidates.gammas)
            gamma = np.empty(r, dtype=np.int64)
            acc = np.empty((r, n))
            score = np.empty((r, n))
            for g in groups:
                t0 = time.perf_counter()
                obj = objective_for(objective, g.version)
                rows = g.rows
                assert rows is not None
                c = choose_gamma(
                    g.version.predict,
                    inp.signals[rows],
                    comp_enc[rows],
                    candidates,
                    obj,
                    inp.timing,
                )
                gamma[rows], acc[rows], score[rows] = c.gamma, c.acceptance, c.score
                self._record(table.model, g, c.gamma, time.perf_counter() - t0)
            choice = Choice(gamma, acc, score)
        check_choice(choice, inp.timing)
        shadow = table.shadow if pinned is None else None
        if shadow is not None and shadow.window != served_by:
            shadow = None
        return DecideResult(
            choice=choice,
            candidates=candidates.gammas,
            groups=groups,
            row_group=row_group,
            shadow=shadow,
            comp_enc=comp_enc,
            signals=inp.signals,
            objective=resolved,
            timing=inp.timing,
            table_model=table.model,
            keys=inp.keys,
            steps=inp.steps,
        )

    def _decide_plans(
        self,
        inp: DecideInput,
        candidates: CandidateSet,
        comp_enc: np.ndarray,
        groups: tuple[Group, ...],
        row_group: np.ndarray | None,
        model_name: str,
    ) -> DecideResult:
        """One draft plan per row; the table is cached per (version, compression)."""
        r = comp_enc.shape[0]
        top = max(candidates.gammas)
        if top < 1:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                "gamma_candidates",
                "has no value ≥ 1; a draft plan needs a largest draft length",
            )
        plans: list[DraftPlan] = []
        gamma = np.empty(r, dtype=np.int64)
        for i in range(r):
            g = groups[int(row_group[i])] if row_group is not None else groups[0]
            obj = objective_for(inp.objective, g.version)
            t0 = time.perf_counter()
            plan = build_plan(self.plan_tables, g.version, float(comp_enc[i]), top, obj, inp.timing)
            plans.append(plan)
            gamma[i] = plan.max_gamma
            self._record(model_name, g, gamma[i : i + 1], time.perf_counter() - t0)
        empty = np.zeros((r, 0))
        return DecideResult(
            choice=Choice(gamma, empty, empty),
            candidates=(),
            groups=groups,
            row_group=row_group,
            shadow=None,
            comp_enc=comp_enc,
            signals=inp.signals,
            objective=objective_for(inp.objective, groups[0].version),
            timing=inp.timing,
            table_model=model_name,
            plans=plans,
        )

    def _record(self, model: str, g: Group, gammas: np.ndarray, seconds: float) -> None:
        self.metrics.record_decisions(model, g.version.version, g.arm, gammas, seconds)

    def score_shadow(self, result: DecideResult) -> ShadowScores | None:
        """Score the shadow version on the rows just answered (after the answer was sent).

        Only metrics and the shadow's calibration see the result: the returned predictions
        go to `ArmStatsTracker.remember_shadow` until the steps' outcomes arrive.
        """
        shadow = result.shadow
        if shadow is None:
            return None
        c = choose_gamma(
            shadow.predict,
            result.signals,
            result.comp_enc,
            CandidateSet.of(result.candidates),
            result.objective,
            result.timing,
        )
        disagree = int(np.count_nonzero(c.gamma != result.choice.gamma))
        diff = float(np.mean(np.abs(c.acceptance - result.choice.acceptance)))
        self.metrics.record_shadow(
            result.table_model, shadow.version, int(c.gamma.shape[0]), disagree, diff
        )
        return ShadowScores(
            model=result.table_model,
            version=shadow.version,
            keys=result.keys,
            steps=result.steps,
            candidates=result.candidates,
            acceptance=c.acceptance,
        )

    def predict(
        self, sel: Selector, routing_key: str, rows: Sequence[Sequence[float]]
    ) -> tuple[np.ndarray, LoadedVersion, str]:
        """Raw predicted acceptance for feature vectors in the manifest's order."""
        table = self.tables.table(sel.name)
        if not rows:
            raise RequestRefused(ErrorKind.INVALID_ARGUMENT, "rows", "is empty")
        if len(rows) > self.config.max_batch_rows:
            raise RequestRefused(
                ErrorKind.RESOURCE_EXHAUSTED,
                "rows",
                f"has {len(rows)} rows; at most {self.config.max_batch_rows} per call",
            )
        pinned = self._pick(table, sel)
        if pinned is None:
            arm = table.arms[int(table.assign([routing_key])[0])]
            version, arm_name = arm.version, arm.name
        else:
            version, arm_name = pinned
        n = version.n_features
        for i, row in enumerate(rows):
            if len(row) != n:
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    f"rows[{i}].values",
                    f"has {len(row)} values; {version.name} v{version.version} takes {n}: "
                    f"{', '.join(version.manifest.feature_names)}",
                )
        x = np.asarray(rows, dtype=np.float64)
        self._check_raw_rows(x, version.manifest.feature_names)
        t0 = time.perf_counter()
        out = version.predict(x.astype(np.float32))
        bad = ~((out >= 0.0) & (out <= 1.0))  # NaN compares False
        if bad.any():
            i = int(np.argmax(bad))
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT,
                f"rows[{i}].values",
                "the model's predicted acceptance for this row is not a number in [0, 1] "
                "(the values are far outside what it was trained on); nothing was answered",
            )
        labels = (table.model, str(version.version), arm_name)
        self.metrics.predict_rows.labels(*labels).inc(len(rows))
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - t0)
        return out, version, arm_name

    def _check_raw_rows(self, x: np.ndarray, names: Sequence[str]) -> None:
        """A raw Predict row, checked per feature in float32 (the units the model runs in)."""
        for j, name in enumerate(names):
            col = x[:, j]
            if "confidence" in name:
                ok, want = (col >= 0) & (col <= 1 + CONFIDENCE_SLACK), "in [0, 1]"
            elif "entropy" in name:
                ok, want = (col >= 0) & (col <= _FLOAT_MAX), f"in [0, {_FLOAT_MAX:.8g}] (bits)"
            elif name == "comp_enc":
                ok = (col == 0) | (col == 1) | (col == 2)
                want = "0 (fp16), 1 (int8) or 2 (nf4)"
            elif name == "gamma":
                ok = (col >= 0) & (col <= self.config.max_gamma)
                want = f"in [0, {self.config.max_gamma}]"
            else:
                ok, want = np.abs(col) <= _FLOAT_MAX, "a finite float32 number"
            if not ok.all():
                i = int(np.argmin(ok))
                raise RequestRefused(
                    ErrorKind.INVALID_ARGUMENT,
                    f"rows[{i}].values[{j}]",
                    f"is {x[i, j]} ({name}); must be {want}",
                )
