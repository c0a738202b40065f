from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_FP16: _ClassVar[Compression]
    COMPRESSION_INT8: _ClassVar[Compression]
    COMPRESSION_NF4: _ClassVar[Compression]

class DecisionWindow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_WINDOW_UNSPECIFIED: _ClassVar[DecisionWindow]
    DECISION_WINDOW_SAME_STEP: _ClassVar[DecisionWindow]
    DECISION_WINDOW_PREVIOUS_STEP: _ClassVar[DecisionWindow]
    DECISION_WINDOW_PREFIX: _ClassVar[DecisionWindow]
    DECISION_WINDOW_DRAFT_PLAN: _ClassVar[DecisionWindow]

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_TOKENS_PER_STEP: _ClassVar[Objective]
    OBJECTIVE_GOODPUT: _ClassVar[Objective]
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_FP16: Compression
COMPRESSION_INT8: Compression
COMPRESSION_NF4: Compression
DECISION_WINDOW_UNSPECIFIED: DecisionWindow
DECISION_WINDOW_SAME_STEP: DecisionWindow
DECISION_WINDOW_PREVIOUS_STEP: DecisionWindow
DECISION_WINDOW_PREFIX: DecisionWindow
DECISION_WINDOW_DRAFT_PLAN: DecisionWindow
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_TOKENS_PER_STEP: Objective
OBJECTIVE_GOODPUT: Objective

class DraftSignals(_message.Message):
    __slots__ = ("mean_draft_entropy", "mean_draft_confidence", "max_draft_entropy", "min_draft_confidence")
    MEAN_DRAFT_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MEAN_DRAFT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MIN_DRAFT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    mean_draft_entropy: float
    mean_draft_confidence: float
    max_draft_entropy: float
    min_draft_confidence: float
    def __init__(self, mean_draft_entropy: _Optional[float] = ..., mean_draft_confidence: _Optional[float] = ..., max_draft_entropy: _Optional[float] = ..., min_draft_confidence: _Optional[float] = ...) -> None: ...

class ModelSelector(_message.Message):
    __slots__ = ("name", "version", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    alias: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...
