from speckv.v1 import common_pb2 as _common_pb2
from speckv.v1 import decoder_pb2 as _decoder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADED: ModelState

class StepTiming(_message.Message):
    __slots__ = ("draft_seconds_per_token", "verify_base_seconds", "verify_seconds_per_token", "target_only_seconds")
    DRAFT_SECONDS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_ONLY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    draft_seconds_per_token: float
    verify_base_seconds: float
    verify_seconds_per_token: float
    target_only_seconds: float
    def __init__(self, draft_seconds_per_token: _Optional[float] = ..., verify_base_seconds: _Optional[float] = ..., verify_seconds_per_token: _Optional[float] = ..., target_only_seconds: _Optional[float] = ...) -> None: ...

class PlanAxis(_message.Message):
    __slots__ = ("feature", "edges")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    feature: str
    edges: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, feature: _Optional[str] = ..., edges: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftPlan(_message.Message):
    __slots__ = ("axes", "acceptance", "max_gamma", "first_token_threshold", "continue_threshold", "refresh_steps")
    AXES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_GAMMA_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REFRESH_STEPS_FIELD_NUMBER: _ClassVar[int]
    axes: _containers.RepeatedCompositeFieldContainer[PlanAxis]
    acceptance: _containers.RepeatedScalarFieldContainer[float]
    max_gamma: int
    first_token_threshold: float
    continue_threshold: float
    refresh_steps: int
    def __init__(self, axes: _Optional[_Iterable[_Union[PlanAxis, _Mapping]]] = ..., acceptance: _Optional[_Iterable[float]] = ..., max_gamma: _Optional[int] = ..., first_token_threshold: _Optional[float] = ..., continue_threshold: _Optional[float] = ..., refresh_steps: _Optional[int] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("routing_key", "step", "signals", "compression")
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    routing_key: str
    step: int
    signals: _common_pb2.DraftSignals
    compression: _common_pb2.Compression
    def __init__(self, routing_key: _Optional[str] = ..., step: _Optional[int] = ..., signals: _Optional[_Union[_common_pb2.DraftSignals, _Mapping]] = ..., compression: _Optional[_Union[_common_pb2.Compression, str]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("request_id", "rows", "window", "gamma_candidates", "objective", "timing", "model", "outcomes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    GAMMA_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    window: _common_pb2.DecisionWindow
    gamma_candidates: _containers.RepeatedScalarFieldContainer[int]
    objective: _common_pb2.Objective
    timing: StepTiming
    model: _common_pb2.ModelSelector
    outcomes: _containers.RepeatedCompositeFieldContainer[StepOutcome]
    def __init__(self, request_id: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ..., window: _Optional[_Union[_common_pb2.DecisionWindow, str]] = ..., gamma_candidates: _Optional[_Iterable[int]] = ..., objective: _Optional[_Union[_common_pb2.Objective, str]] = ..., timing: _Optional[_Union[StepTiming, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., outcomes: _Optional[_Iterable[_Union[StepOutcome, _Mapping]]] = ...) -> None: ...

class StepOutcome(_message.Message):
    __slots__ = ("routing_key", "step", "source", "model_name", "model_version", "arm", "decision_step", "drafted", "accepted", "tokens", "draft_seconds", "verify_seconds", "sequence_end", "compression")
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DECISION_STEP_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_END_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    routing_key: str
    step: int
    source: _decoder_pb2.DecisionSource
    model_name: str
    model_version: int
    arm: str
    decision_step: int
    drafted: int
    accepted: int
    tokens: int
    draft_seconds: float
    verify_seconds: float
    sequence_end: bool
    compression: _common_pb2.Compression
    def __init__(self, routing_key: _Optional[str] = ..., step: _Optional[int] = ..., source: _Optional[_Union[_decoder_pb2.DecisionSource, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., arm: _Optional[str] = ..., decision_step: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens: _Optional[int] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., sequence_end: _Optional[bool] = ..., compression: _Optional[_Union[_common_pb2.Compression, str]] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("gamma", "predicted_acceptance", "score")
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    gamma: int
    predicted_acceptance: float
    score: float
    def __init__(self, gamma: _Optional[int] = ..., predicted_acceptance: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("routing_key", "step", "gamma", "candidates", "model_name", "model_version", "arm", "plan")
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    routing_key: str
    step: int
    gamma: int
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    model_name: str
    model_version: int
    arm: str
    plan: DraftPlan
    def __init__(self, routing_key: _Optional[str] = ..., step: _Optional[int] = ..., gamma: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., arm: _Optional[str] = ..., plan: _Optional[_Union[DraftPlan, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "field", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    field: str
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("request_id", "decisions", "error", "reconnect")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    error: Error
    reconnect: bool
    def __init__(self, request_id: _Optional[int] = ..., decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., reconnect: _Optional[bool] = ...) -> None: ...

class FeatureVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "rows", "routing_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelSelector
    rows: _containers.RepeatedCompositeFieldContainer[FeatureVector]
    routing_key: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[FeatureVector, _Mapping]]] = ..., routing_key: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predicted_acceptance", "model_name", "model_version", "arm")
    PREDICTED_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    predicted_acceptance: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    model_version: int
    arm: str
    def __init__(self, predicted_acceptance: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., arm: _Optional[str] = ...) -> None: ...

class ModelVersionInfo(_message.Message):
    __slots__ = ("version", "state", "window", "feature_names", "gamma_candidates", "aliases", "error", "manifest_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    GAMMA_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: ModelState
    window: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    gamma_candidates: _containers.RepeatedScalarFieldContainer[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    error: str
    manifest_json: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., window: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., gamma_candidates: _Optional[_Iterable[int]] = ..., aliases: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class RouteWeight(_message.Message):
    __slots__ = ("target", "weight")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    target: str
    weight: float
    def __init__(self, target: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("weights", "salt", "shadow_version", "aliases")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedCompositeFieldContainer[RouteWeight]
    salt: str
    shadow_version: int
    aliases: _containers.ScalarMap[str, int]
    def __init__(self, weights: _Optional[_Iterable[_Union[RouteWeight, _Mapping]]] = ..., salt: _Optional[str] = ..., shadow_version: _Optional[int] = ..., aliases: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "versions", "routing", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    routing: Routing
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class GetRoutingRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class GetRoutingResponse(_message.Message):
    __slots__ = ("routing",)
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersionInfo
    def __init__(self, version: _Optional[_Union[ModelVersionInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetRoutingRequest(_message.Message):
    __slots__ = ("model_name", "routing")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    routing: Routing
    def __init__(self, model_name: _Optional[str] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class SetRoutingResponse(_message.Message):
    __slots__ = ("routing",)
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class GetArmStatsRequest(_message.Message):
    __slots__ = ("model_name", "window_seconds", "include_sequences")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    window_seconds: float
    include_sequences: bool
    def __init__(self, model_name: _Optional[str] = ..., window_seconds: _Optional[float] = ..., include_sequences: _Optional[bool] = ...) -> None: ...

class SequenceOutcome(_message.Message):
    __slots__ = ("routing_key", "steps", "drafted", "accepted", "tokens", "seconds", "ended")
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    routing_key: str
    steps: int
    drafted: int
    accepted: int
    tokens: int
    seconds: float
    ended: bool
    def __init__(self, routing_key: _Optional[str] = ..., steps: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., ended: _Optional[bool] = ...) -> None: ...

class ArmStats(_message.Message):
    __slots__ = ("model_name", "model_version", "arm", "sequences", "steps", "drafted", "accepted", "tokens", "draft_seconds", "verify_seconds", "sequence_outcomes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    arm: str
    sequences: int
    steps: int
    drafted: int
    accepted: int
    tokens: int
    draft_seconds: float
    verify_seconds: float
    sequence_outcomes: _containers.RepeatedCompositeFieldContainer[SequenceOutcome]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., arm: _Optional[str] = ..., sequences: _Optional[int] = ..., steps: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens: _Optional[int] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., sequence_outcomes: _Optional[_Iterable[_Union[SequenceOutcome, _Mapping]]] = ...) -> None: ...

class ShadowCalibration(_message.Message):
    __slots__ = ("model_name", "model_version", "steps", "mean_predicted_acceptance", "mean_realised_acceptance", "mean_absolute_error")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_PREDICTED_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    MEAN_REALISED_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABSOLUTE_ERROR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    steps: int
    mean_predicted_acceptance: float
    mean_realised_acceptance: float
    mean_absolute_error: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., steps: _Optional[int] = ..., mean_predicted_acceptance: _Optional[float] = ..., mean_realised_acceptance: _Optional[float] = ..., mean_absolute_error: _Optional[float] = ...) -> None: ...

class GetArmStatsResponse(_message.Message):
    __slots__ = ("arms", "shadows", "fallback_steps", "local_steps", "rejected_outcomes", "seconds_since_reset", "replica")
    ARMS_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_RESET_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    arms: _containers.RepeatedCompositeFieldContainer[ArmStats]
    shadows: _containers.RepeatedCompositeFieldContainer[ShadowCalibration]
    fallback_steps: int
    local_steps: int
    rejected_outcomes: int
    seconds_since_reset: float
    replica: str
    def __init__(self, arms: _Optional[_Iterable[_Union[ArmStats, _Mapping]]] = ..., shadows: _Optional[_Iterable[_Union[ShadowCalibration, _Mapping]]] = ..., fallback_steps: _Optional[int] = ..., local_steps: _Optional[int] = ..., rejected_outcomes: _Optional[int] = ..., seconds_since_reset: _Optional[float] = ..., replica: _Optional[str] = ...) -> None: ...

class ResetArmStatsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ResetArmStatsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
