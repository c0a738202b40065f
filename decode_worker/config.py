"""Typed configuration of the decode worker, validated once and passed explicitly.

`EngineConfig` is what the speculative loop needs; `RemotePolicyConfig` what the
predictor-backed gamma policy needs; `WorkerConfig` is what `speckv-worker serve`
builds from its flags. No module globals: every knob lives in one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speckv.vocabulary import DEFAULT_GAMMA_CANDIDATES as DEFAULT_GAMMA_CANDIDATES
from speckv_client.types import ModelSelector, Objective, Window

FALLBACK_MODES = ("fixed", "last")
# Generous bytes per token: a prompt longer than this many UTF-8 bytes per model position
# cannot fit the models' positions unless its tokens average over 32 bytes (ordinary text
# is a few bytes per token), so the default limit refuses it before tokenizing.
PROMPT_BYTES_PER_POSITION = 32
# Upper bound of --max-prompt-bytes (and of the derived limit).
MAX_PROMPT_BYTES = 64 << 20
# The predictor's default routing-key limit (predictor_service/wire.py); request ids are
# routing keys, so the worker never sends a longer one.
MAX_ROUTING_KEY_BYTES = 256


class ConfigError(ValueError):
    """A configuration value a user gave is out of range; the message names it."""


@dataclass(frozen=True)
class EngineConfig:
    """Limits and defaults of the speculative loop (one engine per loaded pair)."""

    # Used when a request leaves max_new_tokens at 0.
    default_max_new_tokens: int = 128
    # Requests asking for more are refused, never silently cut.
    max_new_tokens_limit: int = 1024
    # Upper bound on any policy's gamma (a remote answer above it is clipped).
    max_gamma: int = 16
    # Weight of the newest sample in the draft/verify timing moving averages.
    timing_ema_alpha: float = 0.1
    # Label written in the `task` column of step records (the seed's schema needs one).
    record_task: str = "live"

    def __post_init__(self) -> None:
        if self.default_max_new_tokens < 1:
            raise ConfigError(
                f"default_max_new_tokens must be ≥ 1, got {self.default_max_new_tokens}"
            )
        if self.max_new_tokens_limit < self.default_max_new_tokens:
            raise ConfigError(
                f"max_new_tokens_limit ({self.max_new_tokens_limit}) must be ≥ "
                f"default_max_new_tokens ({self.default_max_new_tokens})"
            )
        if not 1 <= self.max_gamma <= 64:
            raise ConfigError(f"max_gamma must be in [1, 64], got {self.max_gamma}")
        if not 0.0 < self.timing_ema_alpha <= 1.0:
            raise ConfigError(f"timing_ema_alpha must be in (0, 1], got {self.timing_ema_alpha}")


@dataclass(frozen=True)
class RemotePolicyConfig:
    """How the `remote` policy asks the predictor and what it does when no answer comes."""

    window: Window = Window.PREVIOUS_STEP
    # None: the model manifest's default objective.
    objective: Objective | None = Objective.GOODPUT
    gamma_candidates: tuple[int, ...] = DEFAULT_GAMMA_CANDIDATES
    # Gamma of the first step (previous_step window) and of every step without an answer.
    fallback_gamma: int = 4
    # "fixed": fallback_gamma; "last": the last gamma the sequence used.
    fallback_mode: str = "fixed"
    # How long the step loop waits for an answer that has not arrived when it is needed.
    decision_timeout_s: float = 0.010
    model: ModelSelector | None = None
    # Tokens drafted before asking, in the prefix window.
    prefix_tokens: int = 2
    # The largest draft a plan may ask for, in the draft_plan window (the engine's
    # --max-gamma; the model's manifest may cap it lower).
    plan_max_gamma: int = 16
    # Report every step's outcome on the Decide stream, so the predictor measures each
    # A/B arm (docs/worker.md, "Outcome reporting"); --no-report-outcomes turns it off.
    report_outcomes: bool = True

    def __post_init__(self) -> None:
        if self.window not in (Window.PREVIOUS_STEP, Window.PREFIX, Window.DRAFT_PLAN):
            raise ConfigError(
                f"window {self.window.value!r} cannot be served causally; "
                "use previous_step, prefix or draft_plan"
            )
        if not self.gamma_candidates or any(g < 0 for g in self.gamma_candidates):
            raise ConfigError(f"gamma candidates must be non-negative, got {self.gamma_candidates}")
        if len(set(self.gamma_candidates)) != len(self.gamma_candidates):
            raise ConfigError(f"gamma candidates must be distinct, got {self.gamma_candidates}")
        if self.fallback_gamma < 0:
            raise ConfigError(f"fallback gamma must be ≥ 0, got {self.fallback_gamma}")
        if self.fallback_mode not in FALLBACK_MODES:
            raise ConfigError(
                f"fallback mode {self.fallback_mode!r} unknown; use one of {FALLBACK_MODES}"
            )
        if not 0.0 <= self.decision_timeout_s <= 10.0:
            raise ConfigError(
                f"decision timeout must be in [0, 10] s, got {self.decision_timeout_s}"
            )
        if self.prefix_tokens < 1:
            raise ConfigError(f"prefix_tokens must be ≥ 1, got {self.prefix_tokens}")


@dataclass(frozen=True)
class RecordConfig:
    """Production step recording (`--record-steps DIR`, docs/worker.md "Step recording"):
    rotating CSV files in `directory`, each complete or absent."""

    directory: str
    # A file is closed (and becomes readable) before it would grow past this many bytes...
    max_bytes: int = 64 << 20
    # ...or once it is this old, so records are readable within this delay.
    max_seconds: float = 300.0
    # Complete files kept in `directory`; the oldest are deleted beyond this.
    max_files: int = 64

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("--record-steps needs a directory")
        if self.max_bytes < 4096:
            raise ConfigError(
                f"--record-max-bytes must be ≥ 4096 (a header and some rows), got {self.max_bytes}"
            )
        if not 0.0 < self.max_seconds <= 86400.0:
            raise ConfigError(f"--record-max-seconds must be in (0, 86400], got {self.max_seconds}")
        if self.max_files < 1:
            raise ConfigError(f"--record-max-files must be ≥ 1, got {self.max_files}")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `speckv-worker serve` runs with; built by serve_cli from its flags."""

    draft: str
    target: str
    compression: str = "fp16"
    device: str = "auto"
    predictor: str = ""
    policy: str = "heuristic"
    host: str = "127.0.0.1"
    port: int = 0
    log_steps: str = ""
    # Rotating step-record files (`--record-steps DIR`); None: off.
    record: RecordConfig | None = None
    # Prometheus /metrics port (`--metrics-port`); None: off, 0: a free port.
    metrics_port: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    remote: RemotePolicyConfig = field(default_factory=RemotePolicyConfig)
    # Seconds in-flight generations get to finish on shutdown.
    shutdown_grace_s: float = 5.0
    # Concurrent Generate calls admitted (they interleave step by step on one device); one
    # more is refused at once with RESOURCE_EXHAUSTED (no queue).
    max_concurrent_requests: int = 8
    # Prompt size refused before tokenizing, in UTF-8 bytes; 0: PROMPT_BYTES_PER_POSITION x
    # the pair's positions (`prompt_bytes_limit`).
    max_prompt_bytes: int = 0
    # Stop strings per request and UTF-8 bytes per stop string.
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    # UTF-8 bytes of a request_id (it is the predictor's routing key on the shared stream,
    # so it must stay within the predictor's routing-key limit).
    max_request_id_bytes: int = 128
    # Measure draft/verify costs at start so the first goodput decisions are informed.
    warmup: bool = True
    # Continuous batching (`--batching on`, decode_worker/batching.py): sequences in the
    # batch (`--max-batch-size`) and requests waiting for a place (`--max-queue`); one more
    # is refused with RESOURCE_EXHAUSTED. Off: `max_concurrent_requests` interleave.
    batching: bool = False
    max_batch_size: int = 8
    max_queue: int = 16
    # Ask the predictor for its model's window at start (serve with no --window).
    learn_window: bool = False
    # Check the configured window against the predictor's model at start (a given --window).
    check_window: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port must be in [0, 65535], got {self.metrics_port}")
        if self.max_concurrent_requests < 1:
            raise ConfigError(
                f"max_concurrent_requests must be ≥ 1, got {self.max_concurrent_requests}"
            )
        if not 1 <= self.max_batch_size <= 1024 or not 0 <= self.max_queue <= 65536:
            raise ConfigError(
                f"--max-batch-size must be in [1, 1024] and --max-queue in [0, 65536], got "
                f"{self.max_batch_size} and {self.max_queue}"
            )
        if not 0 <= self.max_prompt_bytes <= MAX_PROMPT_BYTES:
            raise ConfigError(
                f"max_prompt_bytes (--max-prompt-bytes) must be in [0, {MAX_PROMPT_BYTES}] "
                f"(0: derived from the pair's positions), got {self.max_prompt_bytes}"
            )
        if not 0 <= self.max_stop_strings <= 1024:
            raise ConfigError(
                "max_stop_strings (--max-stop-strings) must be in [0, 1024], "
                f"got {self.max_stop_strings}"
            )
        if not 1 <= self.max_stop_string_bytes <= 65536:
            raise ConfigError(
                "max_stop_string_bytes (--max-stop-string-bytes) must be in [1, 65536], "
                f"got {self.max_stop_string_bytes}"
            )
        if not 1 <= self.max_request_id_bytes <= MAX_ROUTING_KEY_BYTES:
            raise ConfigError(
                "max_request_id_bytes (--max-request-id-bytes) must be in "
                f"[1, {MAX_ROUTING_KEY_BYTES}] (the predictor's routing-key limit), "
                f"got {self.max_request_id_bytes}"
            )

    def prompt_bytes_limit(self, max_positions: int) -> int:
        """The prompt byte limit in force for a pair with `max_positions` positions."""
        if self.max_prompt_bytes:
            return self.max_prompt_bytes
        return min(PROMPT_BYTES_PER_POSITION * max_positions, MAX_PROMPT_BYTES)
