from speckv.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecisionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_SOURCE_UNSPECIFIED: _ClassVar[DecisionSource]
    DECISION_SOURCE_REMOTE: _ClassVar[DecisionSource]
    DECISION_SOURCE_FALLBACK: _ClassVar[DecisionSource]
    DECISION_SOURCE_LOCAL: _ClassVar[DecisionSource]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
DECISION_SOURCE_UNSPECIFIED: DecisionSource
DECISION_SOURCE_REMOTE: DecisionSource
DECISION_SOURCE_FALLBACK: DecisionSource
DECISION_SOURCE_LOCAL: DecisionSource
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_p", "stop", "seed", "request_id", "policy", "predictor_model", "objective")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    request_id: str
    policy: str
    predictor_model: _common_pb2.ModelSelector
    objective: _common_pb2.Objective
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ..., policy: _Optional[str] = ..., predictor_model: _Optional[_Union[_common_pb2.ModelSelector, _Mapping]] = ..., objective: _Optional[_Union[_common_pb2.Objective, str]] = ...) -> None: ...

class StepStats(_message.Message):
    __slots__ = ("step", "gamma", "accepted", "tokens_produced", "source", "model_name", "model_version", "arm", "draft_seconds", "verify_seconds", "decision_wait_seconds", "signals")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PRODUCED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    step: int
    gamma: int
    accepted: int
    tokens_produced: int
    source: DecisionSource
    model_name: str
    model_version: int
    arm: str
    draft_seconds: float
    verify_seconds: float
    decision_wait_seconds: float
    signals: _common_pb2.DraftSignals
    def __init__(self, step: _Optional[int] = ..., gamma: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens_produced: _Optional[int] = ..., source: _Optional[_Union[DecisionSource, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., arm: _Optional[str] = ..., draft_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., decision_wait_seconds: _Optional[float] = ..., signals: _Optional[_Union[_common_pb2.DraftSignals, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids", "step")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    step: StepStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., step: _Optional[_Union[StepStats, _Mapping]] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("new_tokens", "steps", "tokens_per_step", "acceptance_rate", "mean_gamma", "wall_seconds", "tokens_per_second", "remote_decisions", "fallback_decisions", "local_decisions", "decision_wait_seconds", "finish_reason", "text", "request_id", "model_versions")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_GAMMA_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REMOTE_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    new_tokens: int
    steps: int
    tokens_per_step: float
    acceptance_rate: float
    mean_gamma: float
    wall_seconds: float
    tokens_per_second: float
    remote_decisions: int
    fallback_decisions: int
    local_decisions: int
    decision_wait_seconds: float
    finish_reason: FinishReason
    text: str
    request_id: str
    model_versions: _containers.ScalarMap[str, int]
    def __init__(self, new_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_per_step: _Optional[float] = ..., acceptance_rate: _Optional[float] = ..., mean_gamma: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., remote_decisions: _Optional[int] = ..., fallback_decisions: _Optional[int] = ..., local_decisions: _Optional[int] = ..., decision_wait_seconds: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., request_id: _Optional[str] = ..., model_versions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "summary")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    summary: GenerationSummary
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("draft_model", "target_model", "compression", "target_dtype", "device", "policy", "predictor_address", "window", "objective", "fallback_gamma", "max_new_tokens_limit", "concurrency", "version")
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_GAMMA_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    draft_model: str
    target_model: str
    compression: _common_pb2.Compression
    target_dtype: str
    device: str
    policy: str
    predictor_address: str
    window: _common_pb2.DecisionWindow
    objective: _common_pb2.Objective
    fallback_gamma: int
    max_new_tokens_limit: int
    concurrency: str
    version: str
    def __init__(self, draft_model: _Optional[str] = ..., target_model: _Optional[str] = ..., compression: _Optional[_Union[_common_pb2.Compression, str]] = ..., target_dtype: _Optional[str] = ..., device: _Optional[str] = ..., policy: _Optional[str] = ..., predictor_address: _Optional[str] = ..., window: _Optional[_Union[_common_pb2.DecisionWindow, str]] = ..., objective: _Optional[_Union[_common_pb2.Objective, str]] = ..., fallback_gamma: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., concurrency: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
