"""Prometheus metrics of one predictor server, in the spirit of Triton's `nv_inference_*`.

Each server owns its registry (no process-global state), so several servers can run in one
test process and each reports only its own traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

if TYPE_CHECKING:
    from predictor_service.outcomes import RecordSummary

ArmKey = tuple[str, int, str]


class ArmMetrics:
    """The label children of one (model, version, arm), looked up once instead of per message.

    `.labels()` hashes and validates the label values on every call (about 1 µs each, several
    per message); children are never removed from these metrics, so caching them is safe.
    """

    def __init__(self, metrics: PredictorMetrics, model: str, version: int, arm: str) -> None:
        self.labels = (model, str(version), arm)
        self.decisions = metrics.decisions.labels(*self.labels)
        self.latency = metrics.latency.labels(*self.labels)
        self._gamma_metric = metrics.gamma
        self._gamma: dict[int, Counter] = {}

    def gamma(self, value: int) -> Counter:
        child = self._gamma.get(value)
        if child is None:
            child = self._gamma[value] = self._gamma_metric.labels(*self.labels, str(value))
        return child


class ArmOutcomeMetrics:
    """The outcome counters' children of one (model, version, arm), resolved once."""

    def __init__(self, metrics: PredictorMetrics, model: str, version: int, arm: str) -> None:
        labels = (model, str(version), arm)
        self.steps = metrics.arm_outcome_steps.labels(*labels)
        self.drafted = metrics.arm_outcome_drafted.labels(*labels)
        self.accepted = metrics.arm_outcome_accepted.labels(*labels)
        self.tokens = metrics.arm_outcome_tokens.labels(*labels)
        self.seconds = metrics.arm_outcome_seconds.labels(*labels)
        self.sequences = metrics.arm_outcome_sequences.labels(*labels)


PREFIX = "speckv_predictor"
# Per-message compute time: tens of microseconds when healthy, milliseconds when not.
LATENCY_BUCKETS = (
    10e-6,
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    50e-3,
    0.25,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class PredictorMetrics:
    """Counters and histograms labelled by model, version and arm."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mva = ["model", "version", "arm"]
        mv = ["model", "version"]

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def summary(name: str, doc: str) -> Summary:
            return Summary(f"{PREFIX}_{name}", doc, mv, registry=r)

        def histogram(
            name: str, doc: str, labels: list[str], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)

        self.messages = counter(
            "messages", "Decide/Predict messages answered (success or error)", ["rpc"]
        )
        self.errors = counter(
            "errors", "Messages refused, by RPC, error code and model", ["rpc", "code", "model"]
        )
        self.decisions = counter("decisions", "Rows decided (one gamma each)", mva)
        self.predict_rows = counter("predict_rows", "Rows answered by Predict", mva)
        self.batch_rows = histogram("batch_rows", "Rows per message", ["rpc"], BATCH_BUCKETS)
        self.latency = histogram(
            "compute_seconds",
            "Server time per message group: validation, model run, scoring",
            mva,
            LATENCY_BUCKETS,
        )
        self.gamma = counter("chosen_gamma", "Chosen gamma values", [*mva, "gamma"])
        self.shadow_rows = counter("shadow_rows", "Rows also scored by the shadow version", mv)
        self.shadow_disagreements = counter(
            "shadow_disagreements", "Shadow rows whose gamma differs from the served one", mv
        )
        self.shadow_abs_diff = histogram(
            "shadow_abs_acceptance_diff",
            "Mean |shadow - served| predicted acceptance per message",
            mv,
            (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        )
        self.loads = counter("model_loads", "Version load attempts", [*mv, "result"])
        self.ready = Gauge(
            f"{PREFIX}_model_ready", "1 while a version is loaded and serving", mv, registry=r
        )
        self.open_streams = Gauge(f"{PREFIX}_open_streams", "Open Decide streams", registry=r)
        # Outcomes workers report for decided steps (docs/predictor.md, "Outcomes and arm
        # statistics"); never reset (ResetArmStats resets GetArmStats only).
        self.arm_outcome_steps = counter(
            "arm_outcome_steps",
            "Steps an arm decided whose outcome a worker reported (REMOTE outcomes only)",
            mva,
        )
        self.arm_outcome_drafted = counter(
            "arm_outcome_drafted_tokens",
            "Tokens drafted and verified in the steps an arm decided",
            mva,
        )
        self.arm_outcome_accepted = counter(
            "arm_outcome_accepted_tokens",
            "Drafted tokens the target accepted in the steps an arm decided",
            mva,
        )
        self.arm_outcome_tokens = counter(
            "arm_outcome_tokens",
            "Tokens produced by the steps an arm decided (accepted + 1 per step, fewer at a stop)",
            mva,
        )
        self.arm_outcome_seconds = counter(
            "arm_outcome_step_seconds",
            "Draft plus verify seconds of the steps an arm decided (tokens / this = tokens/s)",
            mva,
        )
        self.arm_outcome_sequences = counter(
            "arm_outcome_sequences", "Sequences with a first reported outcome for an arm", mva
        )
        self.outcomes_unattributed = counter(
            "outcomes_unattributed",
            "Reported steps no arm decided (fallback or local gamma), never credited to an arm",
            ["source"],
        )
        self.outcomes_rejected = counter(
            "outcomes_rejected",
            "Reported step outcomes refused: invalid (malformed) or unknown_arm (an arm this "
            "server never served)",
            ["reason"],
        )
        self.shadow_calibration_steps = counter(
            "shadow_calibration_steps",
            "Shadowed steps whose outcome was compared with the shadow's prediction",
            mv,
        )
        self.shadow_calibration_abs_error = summary(
            "shadow_calibration_abs_error",
            "|shadow predicted - realised acceptance| at the drafted gamma, per shadowed step",
        )
        self.shadow_calibration_predicted = summary(
            "shadow_calibration_predicted_acceptance",
            "The shadow's predicted acceptance at the drafted gamma, per shadowed step",
        )
        self.shadow_calibration_realised = summary(
            "shadow_calibration_realised_acceptance",
            "Realised acceptance (accepted / drafted), per shadowed step",
        )
        self._unattributed = {
            "fallback": self.outcomes_unattributed.labels("fallback"),
            "local": self.outcomes_unattributed.labels("local"),
        }
        # Both reasons exist from the start (0), so an alert on their rate has a series.
        self._rejected = {
            reason: self.outcomes_rejected.labels(reason) for reason in ("invalid", "unknown_arm")
        }
        # Hot-path children, resolved once (see ArmMetrics).
        self.decide_messages = self.messages.labels("Decide")
        self.decide_batch_rows = self.batch_rows.labels("Decide")
        self._arms: dict[ArmKey, ArmMetrics] = {}
        self._outcome_arms: dict[ArmKey, ArmOutcomeMetrics] = {}

    def arm(self, model: str, version: int, arm: str) -> ArmMetrics:
        key = (model, version, arm)
        m = self._arms.get(key)
        if m is None:
            m = self._arms[key] = ArmMetrics(self, model, version, arm)
        return m

    def has_arm(self, key: ArmKey) -> bool:
        """Whether this server decided anything through (model, version, arm)."""
        return key in self._arms

    def record_outcomes(self, summary: RecordSummary) -> None:
        """One Decide message's outcomes, already aggregated per arm by the tracker."""
        for key, d in summary.arms.items():
            m = self._outcome_arms.get(key)
            if m is None:
                m = self._outcome_arms[key] = ArmOutcomeMetrics(self, *key)
            m.steps.inc(d.steps)
            m.drafted.inc(d.drafted)
            m.accepted.inc(d.accepted)
            m.tokens.inc(d.tokens)
            m.seconds.inc(d.seconds)
            if d.sequences:
                m.sequences.inc(d.sequences)
        if summary.fallback:
            self._unattributed["fallback"].inc(summary.fallback)
        if summary.local:
            self._unattributed["local"].inc(summary.local)
        for reason, n in summary.rejected.items():
            child = self._rejected.get(reason)
            if child is None:
                child = self._rejected[reason] = self.outcomes_rejected.labels(reason)
            child.inc(n)
        for model, version, predicted, realised in summary.shadow:
            labels = (model, str(version))
            self.shadow_calibration_steps.labels(*labels).inc()
            self.shadow_calibration_abs_error.labels(*labels).observe(abs(predicted - realised))
            self.shadow_calibration_predicted.labels(*labels).observe(predicted)
            self.shadow_calibration_realised.labels(*labels).observe(realised)

    def record_decisions(
        self, model: str, version: int, arm: str, gammas: np.ndarray, seconds: float
    ) -> None:
        m = self.arm(model, version, arm)
        n = int(gammas.shape[0])
        m.decisions.inc(n)
        m.latency.observe(seconds)
        if n == 1:  # the common single-sequence message: no np.unique
            m.gamma(int(gammas[0])).inc(1)
            return
        values, counts = np.unique(gammas, return_counts=True)
        for g, c in zip(values.tolist(), counts.tolist(), strict=True):
            m.gamma(g).inc(c)

    def record_shadow(
        self, model: str, version: int, rows: int, disagreements: int, mean_abs_diff: float
    ) -> None:
        labels = (model, str(version))
        self.shadow_rows.labels(*labels).inc(rows)
        self.shadow_disagreements.labels(*labels).inc(disagreements)
        self.shadow_abs_diff.labels(*labels).observe(mean_abs_diff)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the CLI."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
