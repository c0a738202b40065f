"""Plain Python types at the client library's surface (no protobuf here).

These are the values the decode worker and other services exchange with the
predictor; `speckv_client.convert` maps them to and from `speckv.v1` messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Compression(str, Enum):
    FP16 = "fp16"
    INT8 = "int8"
    NF4 = "nf4"

    @property
    def code(self) -> int:
        """The seed's `comp_enc` feature: 0 fp16, 1 int8, 2 nf4."""
        return {"fp16": 0, "int8": 1, "nf4": 2}[self.value]


class Window(str, Enum):
    SAME_STEP = "same_step"
    PREVIOUS_STEP = "previous_step"
    PREFIX = "prefix"


class Objective(str, Enum):
    TOKENS_PER_STEP = "tokens_per_step"
    GOODPUT = "goodput"


@dataclass(frozen=True)
class DraftSignals:
    """Per-step draft signals over the step's drafted tokens (entropy in bits)."""

    mean_draft_entropy: float
    mean_draft_confidence: float
    max_draft_entropy: float
    min_draft_confidence: float


@dataclass(frozen=True)
class StepTiming:
    """Measured costs for the goodput objective: t_verify(g) = base + g * per_token."""

    draft_seconds_per_token: float
    verify_base_seconds: float
    verify_seconds_per_token: float


@dataclass(frozen=True)
class ModelSelector:
    """Pin a predictor model; empty fields mean "the default model / follow routing"."""

    name: str = ""
    version: int = 0
    alias: str = ""


@dataclass(frozen=True)
class FeatureRow:
    routing_key: str
    step: int
    signals: DraftSignals
    compression: Compression


@dataclass(frozen=True)
class DecideBatch:
    """One Decide message: one or more sequences' rows, decided together."""

    rows: tuple[FeatureRow, ...]
    gamma_candidates: tuple[int, ...] = (2, 4, 6, 8)
    window: Window = Window.PREVIOUS_STEP
    objective: Objective | None = None
    timing: StepTiming | None = None
    model: ModelSelector | None = None


@dataclass(frozen=True)
class CandidateScore:
    gamma: int
    predicted_acceptance: float
    score: float


@dataclass(frozen=True)
class Decision:
    routing_key: str
    step: int
    gamma: int
    candidates: tuple[CandidateScore, ...] = field(default_factory=tuple)
    model_name: str = ""
    model_version: int = 0
    arm: str = ""
