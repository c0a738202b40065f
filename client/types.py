"""Plain Python types at the client library's surface (no protobuf here).

These are the values the decode worker and other services exchange with the
predictor; `speckv_client.convert` maps them to and from `speckv.v1` messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from speckv import vocabulary as vocab
from speckv.costs import StepTiming as StepTiming  # defined once, beside the cost model
from speckv.draft_plan import DraftPlan
from speckv.vocabulary import Objective as Objective  # defined once, in the vocabulary


# The enums' values are the shared vocabulary's names (speckv.vocabulary).
class Compression(str, Enum):
    FP16 = vocab.FP16
    INT8 = vocab.INT8
    NF4 = vocab.NF4


class Window(str, Enum):
    SAME_STEP = vocab.WINDOW_SAME_STEP
    PREVIOUS_STEP = vocab.WINDOW_PREVIOUS_STEP
    PREFIX = vocab.WINDOW_PREFIX
    DRAFT_PLAN = vocab.WINDOW_DRAFT_PLAN


@dataclass(frozen=True)
class DraftSignals:
    """Per-step draft signals over the step's drafted tokens (entropy in bits)."""

    mean_draft_entropy: float
    mean_draft_confidence: float
    max_draft_entropy: float
    min_draft_confidence: float


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
    signals: DraftSignals | None  # None in the draft_plan window (the plan needs none)
    compression: Compression


@dataclass(frozen=True)
class DecideBatch:
    """One Decide message: one or more sequences' rows, decided together."""

    rows: tuple[FeatureRow, ...]
    gamma_candidates: tuple[int, ...] = vocab.DEFAULT_GAMMA_CANDIDATES
    window: Window = Window.PREVIOUS_STEP
    objective: Objective | None = None
    timing: StepTiming | None = None
    model: ModelSelector | None = None
    # Outcomes of earlier decided steps, piggybacked on this message (may carry no rows).
    outcomes: tuple[StepOutcome, ...] = ()


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
    # The draft_plan window's answer (`gamma` is then its max_gamma).
    plan: DraftPlan | None = None
    # Which of a DecisionStream's streams (replica connections) answered; outcomes of
    # this decision are reported on that stream only (0 = not from a DecisionStream).
    stream: int = 0


# --- Model repository and routing (PredictorService admin and read calls) ---


class ModelState(str, Enum):
    UNSPECIFIED = "unspecified"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class ModelVersionInfo:
    version: int
    state: ModelState
    window: str = ""
    feature_names: tuple[str, ...] = ()
    gamma_candidates: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()
    error: str = ""
    """Why a load failed, when state is FAILED."""
    manifest_json: str = ""


@dataclass(frozen=True)
class RouteWeight:
    """`target` is an alias ("stable", "canary") or a version number as text ("3")."""

    target: str
    weight: float


@dataclass(frozen=True)
class Routing:
    weights: tuple[RouteWeight, ...] = ()
    salt: str = ""
    shadow_version: int = 0
    """Scored on the same rows, recorded in metrics, never returned; 0 means none."""
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: tuple[ModelVersionInfo, ...] = ()
    routing: Routing = field(default_factory=Routing)
    is_default: bool = False


@dataclass(frozen=True)
class Prediction:
    """Raw predicted acceptance for each row of a Predict call, and who answered."""

    predicted_acceptance: tuple[float, ...]
    model_name: str
    model_version: int
    arm: str


# --- DecoderService ---


class DecisionSource(str, Enum):
    UNSPECIFIED = "unspecified"
    REMOTE = "remote"
    FALLBACK = "fallback"
    LOCAL = "local"


class FinishReason(str, Enum):
    UNSPECIFIED = "unspecified"
    EOS = "eos"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StepStats:
    step: int
    gamma: int
    accepted: int
    tokens_produced: int
    source: DecisionSource
    model_name: str = ""
    model_version: int = 0
    arm: str = ""
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    decision_wait_seconds: float = 0.0
    signals: DraftSignals | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Text produced by one decode step, with that step's statistics."""

    text: str
    token_ids: tuple[int, ...] = ()
    step: StepStats | None = None


@dataclass(frozen=True)
class GenerationSummary:
    new_tokens: int
    steps: int
    tokens_per_step: float
    acceptance_rate: float
    mean_gamma: float
    wall_seconds: float
    tokens_per_second: float
    remote_decisions: int = 0
    fallback_decisions: int = 0
    local_decisions: int = 0
    decision_wait_seconds: float = 0.0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    text: str = ""
    request_id: str = ""
    model_versions: dict[str, int] = field(default_factory=dict)
    """Predictor versions that decided, "name:version" -> count."""


GenerateEvent = TokenChunk | GenerationSummary
"""What `DecoderClient.generate` yields: chunks as they come, then one summary."""


@dataclass(frozen=True)
class WorkerInfo:
    draft_model: str
    target_model: str
    compression: Compression | None
    target_dtype: str
    device: str
    policy: str
    predictor_address: str
    window: Window | None
    objective: Objective | None
    fallback_gamma: int
    max_new_tokens_limit: int
    concurrency: str
    version: str


# --- Outcomes and A/B statistics (docs/design.md, "Outcomes and A/B tests") ---


@dataclass(frozen=True)
class StepOutcome:
    """What one decode step produced; the worker reports it on the Decide stream."""

    routing_key: str
    step: int
    source: DecisionSource
    drafted: int  # γ verified
    accepted: int
    tokens: int  # tokens the step produced
    draft_seconds: float
    verify_seconds: float
    compression: Compression | None = None
    # The decision that decided the step (source REMOTE only).
    model_name: str = ""
    model_version: int = 0
    arm: str = ""
    decision_step: int = 0
    sequence_end: bool = False


class OutcomeValues(NamedTuple):
    """A received `StepOutcome` message as a plain tuple (`convert.outcomes_from_pb`): what the
    predictor reads per outcome on its Decide hot path, where building the frozen
    `StepOutcome` would cost about three times as much (docs/predictor.md, "Outcomes and
    arm statistics")."""

    routing_key: str
    step: int
    source: DecisionSource
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
    compression: Compression | None


@dataclass(frozen=True)
class SequenceOutcome:
    """One sequence's totals over the steps one arm decided."""

    routing_key: str
    steps: int
    drafted: int
    accepted: int
    tokens: int
    seconds: float
    ended: bool = False


@dataclass(frozen=True)
class ArmStats:
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
    sequence_outcomes: tuple[SequenceOutcome, ...] = ()

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        seconds = self.draft_seconds + self.verify_seconds
        return self.tokens / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class ShadowCalibration:
    model_name: str
    model_version: int
    steps: int
    mean_predicted_acceptance: float
    mean_realised_acceptance: float
    mean_absolute_error: float


@dataclass(frozen=True)
class ArmStatsReport:
    """One predictor replica's GetArmStats answer."""

    arms: tuple[ArmStats, ...]
    shadows: tuple[ShadowCalibration, ...] = ()
    fallback_steps: int = 0
    local_steps: int = 0
    rejected_outcomes: int = 0
    seconds_since_reset: float = 0.0
    replica: str = ""
