"""Protobuf <-> the library's dataclasses. The only module that touches message fields.

`*_to_pb` builds request messages from dataclasses; `*_from_pb` turns responses into
dataclasses. Everything above this module works on `speckv_client.types`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from speckv import vocabulary as vocab
from speckv.draft_plan import DraftPlan, PlanAxis
from speckv.v1 import common_pb2, decoder_pb2, predictor_pb2
from speckv_client.types import (
    ArmStats,
    ArmStatsReport,
    CandidateScore,
    Compression,
    DecideBatch,
    Decision,
    DecisionSource,
    DraftSignals,
    FeatureRow,
    FinishReason,
    GenerateEvent,
    GenerationSummary,
    ModelInfo,
    ModelSelector,
    ModelState,
    ModelVersionInfo,
    Objective,
    OutcomeValues,
    Prediction,
    RouteWeight,
    Routing,
    SequenceOutcome,
    ShadowCalibration,
    StepOutcome,
    StepStats,
    StepTiming,
    TokenChunk,
    Window,
    WorkerInfo,
)

# Each wire enum is mapped here once. Compression, DecisionWindow and Objective take their
# wire values from the shared vocabulary (speckv.vocabulary; checked against the stubs by
# tests/contract/test_vocabulary.py); the others map each wire value to the client enum member
# of the same name (`_by_name`).
_COMPRESSION_TO_PB = {Compression(n): v for n, v in vocab.COMPRESSION_WIRE.items()}
_COMPRESSION_FROM_PB = {v: k for k, v in _COMPRESSION_TO_PB.items()}

_WINDOW_TO_PB = {Window(n): v for n, v in vocab.WINDOW_WIRE.items()}
_WINDOW_FROM_PB = {v: k for k, v in _WINDOW_TO_PB.items()}

_OBJECTIVE_TO_PB = {Objective(n): v for n, v in vocab.OBJECTIVE_WIRE.items()}
_OBJECTIVE_FROM_PB = {v: k for k, v in _OBJECTIVE_TO_PB.items()}


def _by_name(pb_enum: Any, cls: type[enum.Enum], prefix: str) -> dict[int, Any]:
    """A wire enum's values to the client enum member of the same name (MODEL_STATE_READY ->
    ModelState.READY); a wire value the client does not know is left out (read as
    UNSPECIFIED)."""
    return {
        value: cls[name.removeprefix(prefix)]
        for name, value in pb_enum.items()
        if name.removeprefix(prefix) in cls.__members__
    }


_STATE_FROM_PB = _by_name(predictor_pb2.ModelState, ModelState, "MODEL_STATE_")
_SOURCE_FROM_PB = _by_name(decoder_pb2.DecisionSource, DecisionSource, "DECISION_SOURCE_")
_SOURCE_TO_PB = {v: k for k, v in _SOURCE_FROM_PB.items()}
_FINISH_FROM_PB = _by_name(decoder_pb2.FinishReason, FinishReason, "FINISH_REASON_")
_FINISH_TO_PB = {v: k for k, v in _FINISH_FROM_PB.items()}


def error_code_name(code: int) -> str:
    """ "INVALID_ARGUMENT" for ERROR_CODE_INVALID_ARGUMENT, etc."""
    if code in predictor_pb2.ErrorCode.values():
        name: str = predictor_pb2.ErrorCode.Name(code)
    else:
        name = f"ERROR_CODE_{code}"
    return name.removeprefix("ERROR_CODE_")


# Where a message and its dataclass share field names, both directions copy by name: one
# list of fields, the dataclass's; `skip` names the fields mapped by hand (enums, nested or
# repeated fields).
@functools.cache
def _names(cls: type, skip: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in skip)


def _scalars(obj: object, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in _names(cls, skip)}


# --- common ---


def signals_to_pb(s: DraftSignals) -> common_pb2.DraftSignals:
    return common_pb2.DraftSignals(**_scalars(s, DraftSignals))


def signals_from_pb(m: common_pb2.DraftSignals) -> DraftSignals:
    return DraftSignals(**_scalars(m, DraftSignals))


def selector_to_pb(sel: ModelSelector | None) -> common_pb2.ModelSelector | None:
    if sel is None:
        return None
    return common_pb2.ModelSelector(name=sel.name, version=sel.version, alias=sel.alias)


# --- enums, for the servicers (the only mappings of these enums) ---


def objective_to_pb(objective: Objective | None) -> int:
    return common_pb2.OBJECTIVE_UNSPECIFIED if objective is None else _OBJECTIVE_TO_PB[objective]


def objective_from_pb(value: int) -> Objective | None:
    """None for OBJECTIVE_UNSPECIFIED and for a value this version does not know."""
    return _OBJECTIVE_FROM_PB.get(value)


def compression_to_pb(compression: Compression | str | None) -> int:
    if compression is None:
        return common_pb2.COMPRESSION_UNSPECIFIED
    return _COMPRESSION_TO_PB[Compression(compression)]


def window_to_pb(window: Window | str | None) -> int:
    if window is None:
        return common_pb2.DECISION_WINDOW_UNSPECIFIED
    return _WINDOW_TO_PB[Window(window)]


def source_to_pb(source: DecisionSource) -> int:
    return _SOURCE_TO_PB[DecisionSource(source)]


def finish_reason_to_pb(reason: FinishReason) -> int:
    return _FINISH_TO_PB[FinishReason(reason)]


# --- predictor: Decide ---


def timing_to_pb(t: StepTiming) -> predictor_pb2.StepTiming:
    return predictor_pb2.StepTiming(**_scalars(t, StepTiming))


def row_to_pb(row: FeatureRow) -> predictor_pb2.FeatureRow:
    return predictor_pb2.FeatureRow(
        routing_key=row.routing_key,
        step=row.step,
        compression=_COMPRESSION_TO_PB[Compression(row.compression)],
        signals=None if row.signals is None else signals_to_pb(row.signals),
    )


def plan_to_pb(plan: DraftPlan) -> predictor_pb2.DraftPlan:
    """The one mapping of a draft plan to the wire; the predictor's servicer uses it too."""
    return predictor_pb2.DraftPlan(
        axes=[predictor_pb2.PlanAxis(feature=a.feature, edges=a.edges) for a in plan.axes],
        acceptance=plan.acceptance,
        max_gamma=plan.max_gamma,
        first_token_threshold=plan.first_threshold,
        continue_threshold=plan.continue_threshold,
        refresh_steps=plan.refresh_steps,
    )


def plan_from_pb(m: predictor_pb2.DraftPlan) -> DraftPlan:
    return DraftPlan(
        axes=tuple(PlanAxis(a.feature, tuple(a.edges)) for a in m.axes),
        acceptance=tuple(m.acceptance),
        max_gamma=m.max_gamma,
        first_threshold=m.first_token_threshold,
        continue_threshold=m.continue_threshold,
        refresh_steps=m.refresh_steps,
    )


def decide_request_to_pb(batch: DecideBatch, request_id: int) -> predictor_pb2.DecideRequest:
    req = predictor_pb2.DecideRequest(
        request_id=request_id,
        rows=[row_to_pb(r) for r in batch.rows],
        window=_WINDOW_TO_PB[Window(batch.window)],
        gamma_candidates=list(batch.gamma_candidates),
        objective=objective_to_pb(batch.objective),
        timing=None if batch.timing is None else timing_to_pb(batch.timing),
        model=selector_to_pb(batch.model),
    )
    if batch.outcomes:
        req.outcomes.extend(outcome_to_pb(o) for o in batch.outcomes)
    return req


def outcome_to_pb(o: StepOutcome) -> predictor_pb2.StepOutcome:
    m = predictor_pb2.StepOutcome(
        source=_SOURCE_TO_PB[DecisionSource(o.source)],
        **_scalars(o, StepOutcome, ("source", "compression")),
    )
    if o.compression is not None:
        m.compression = _COMPRESSION_TO_PB[Compression(o.compression)]
    return m


def outcomes_from_pb(ms: Iterable[predictor_pb2.StepOutcome]) -> list[OutcomeValues]:
    """The one mapping of received `StepOutcome` messages: plain tuples, not frozen
    dataclasses, because the predictor maps every outcome of every Decide message."""
    source = _SOURCE_FROM_PB.get
    compression = _COMPRESSION_FROM_PB.get
    unspecified = DecisionSource.UNSPECIFIED
    return [
        OutcomeValues(
            m.routing_key,
            m.step,
            source(m.source, unspecified),
            m.model_name,
            m.model_version,
            m.arm,
            m.decision_step,
            m.drafted,
            m.accepted,
            m.tokens,
            m.draft_seconds,
            m.verify_seconds,
            m.sequence_end,
            compression(m.compression),
        )
        for m in ms
    ]


_NESTED = ("arms", "shadows", "sequence_outcomes")


def arm_stats_from_pb(m: predictor_pb2.GetArmStatsResponse) -> ArmStatsReport:
    return ArmStatsReport(
        arms=tuple(
            ArmStats(
                **_scalars(a, ArmStats, _NESTED),
                sequence_outcomes=tuple(
                    SequenceOutcome(**_scalars(q, SequenceOutcome)) for q in a.sequence_outcomes
                ),
            )
            for a in m.arms
        ),
        shadows=tuple(ShadowCalibration(**_scalars(c, ShadowCalibration)) for c in m.shadows),
        **_scalars(m, ArmStatsReport, _NESTED),
    )


def arm_stats_to_pb(r: ArmStatsReport) -> predictor_pb2.GetArmStatsResponse:
    """What the predictor answers GetArmStats with (the inverse of `arm_stats_from_pb`)."""
    return predictor_pb2.GetArmStatsResponse(
        arms=[
            predictor_pb2.ArmStats(
                **_scalars(a, ArmStats, _NESTED),
                sequence_outcomes=[
                    predictor_pb2.SequenceOutcome(**_scalars(q, SequenceOutcome))
                    for q in a.sequence_outcomes
                ],
            )
            for a in r.arms
        ],
        shadows=[
            predictor_pb2.ShadowCalibration(**_scalars(c, ShadowCalibration)) for c in r.shadows
        ],
        **_scalars(r, ArmStatsReport, _NESTED),
    )


def decision_from_pb(m: predictor_pb2.Decision) -> Decision:
    return Decision(
        routing_key=m.routing_key,
        step=m.step,
        gamma=m.gamma,
        candidates=tuple(
            CandidateScore(
                gamma=c.gamma, predicted_acceptance=c.predicted_acceptance, score=c.score
            )
            for c in m.candidates
        ),
        model_name=m.model_name,
        model_version=m.model_version,
        arm=m.arm,
        plan=plan_from_pb(m.plan) if m.HasField("plan") else None,
    )


def decisions_from_pb(m: predictor_pb2.DecideResponse) -> list[Decision]:
    return [decision_from_pb(d) for d in m.decisions]


# --- predictor: Predict and the repository ---


def predict_request_to_pb(
    rows: Sequence[Sequence[float]], model: ModelSelector | None, routing_key: str
) -> predictor_pb2.PredictRequest:
    return predictor_pb2.PredictRequest(
        rows=[predictor_pb2.FeatureVector(values=[float(v) for v in r]) for r in rows],
        routing_key=routing_key,
        model=selector_to_pb(model),
    )


def prediction_from_pb(m: predictor_pb2.PredictResponse) -> Prediction:
    return Prediction(
        predicted_acceptance=tuple(m.predicted_acceptance),
        model_name=m.model_name,
        model_version=m.model_version,
        arm=m.arm,
    )


def version_info_from_pb(m: predictor_pb2.ModelVersionInfo) -> ModelVersionInfo:
    return ModelVersionInfo(
        version=m.version,
        state=_STATE_FROM_PB.get(m.state, ModelState.UNSPECIFIED),
        window=m.window,
        feature_names=tuple(m.feature_names),
        gamma_candidates=tuple(m.gamma_candidates),
        aliases=tuple(m.aliases),
        error=m.error,
        manifest_json=m.manifest_json,
    )


def routing_from_pb(m: predictor_pb2.Routing) -> Routing:
    return Routing(
        weights=tuple(RouteWeight(target=w.target, weight=w.weight) for w in m.weights),
        salt=m.salt,
        shadow_version=m.shadow_version,
        aliases=dict(sorted(m.aliases.items())),
    )


def routing_to_pb(r: Routing) -> predictor_pb2.Routing:
    return predictor_pb2.Routing(
        weights=[predictor_pb2.RouteWeight(target=w.target, weight=w.weight) for w in r.weights],
        salt=r.salt,
        shadow_version=r.shadow_version,
        aliases=dict(r.aliases),
    )


def model_info_from_pb(m: predictor_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        versions=tuple(version_info_from_pb(v) for v in m.versions),
        routing=routing_from_pb(m.routing),
        is_default=m.is_default,
    )


# --- decoder ---


def generate_request_to_pb(
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
    seed: int,
    request_id: str,
    policy: str,
    predictor_model: ModelSelector | None,
    objective: Objective | None,
) -> decoder_pb2.GenerateRequest:
    return decoder_pb2.GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop),
        seed=seed,
        request_id=request_id,
        policy=policy,
        objective=objective_to_pb(objective),
        predictor_model=selector_to_pb(predictor_model),
    )


def step_stats_from_pb(m: decoder_pb2.StepStats) -> StepStats:
    return StepStats(
        source=_SOURCE_FROM_PB.get(m.source, DecisionSource.UNSPECIFIED),
        signals=signals_from_pb(m.signals) if m.HasField("signals") else None,
        **_scalars(m, StepStats, ("source", "signals")),
    )


def summary_from_pb(m: decoder_pb2.GenerationSummary) -> GenerationSummary:
    return GenerationSummary(
        finish_reason=_FINISH_FROM_PB.get(m.finish_reason, FinishReason.UNSPECIFIED),
        model_versions=dict(sorted(m.model_versions.items())),
        **_scalars(m, GenerationSummary, ("finish_reason", "model_versions")),
    )


def generate_event_from_pb(m: decoder_pb2.GenerateResponse) -> GenerateEvent | None:
    """A chunk or the summary; None for an empty message (a newer server's unknown event)."""
    kind = m.WhichOneof("event")
    if kind == "chunk":
        return TokenChunk(
            text=m.chunk.text,
            token_ids=tuple(m.chunk.token_ids),
            step=step_stats_from_pb(m.chunk.step) if m.chunk.HasField("step") else None,
        )
    if kind == "summary":
        return summary_from_pb(m.summary)
    return None


def worker_info_from_pb(m: decoder_pb2.GetInfoResponse) -> WorkerInfo:
    return WorkerInfo(
        compression=_COMPRESSION_FROM_PB.get(m.compression),
        window=_WINDOW_FROM_PB.get(m.window),
        objective=_OBJECTIVE_FROM_PB.get(m.objective),
        **_scalars(m, WorkerInfo, ("compression", "window", "objective")),
    )
