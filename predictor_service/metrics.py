"""Prometheus metrics of one predictor server, in the spirit of Triton's `nv_inference_*`.

Each server owns its registry (no process-global state), so several servers can run in one
test process and each reports only its own traffic.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.messages = Counter(
            f"{PREFIX}_messages",
            "Decide/Predict messages answered (success or error)",
            ["rpc"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Messages refused, by RPC, error code and model",
            ["rpc", "code", "model"],
            registry=r,
        )
        self.decisions = Counter(
            f"{PREFIX}_decisions", "Rows decided (one gamma each)", mva, registry=r
        )
        self.predict_rows = Counter(
            f"{PREFIX}_predict_rows", "Rows answered by Predict", mva, registry=r
        )
        self.batch_rows = Histogram(
            f"{PREFIX}_batch_rows", "Rows per message", ["rpc"], buckets=BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}_compute_seconds",
            "Server time per message group: validation, model run, scoring",
            mva,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gamma = Counter(
            f"{PREFIX}_chosen_gamma", "Chosen gamma values", [*mva, "gamma"], registry=r
        )
        self.shadow_rows = Counter(
            f"{PREFIX}_shadow_rows",
            "Rows also scored by the shadow version",
            ["model", "version"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            f"{PREFIX}_shadow_disagreements",
            "Shadow rows whose gamma differs from the served one",
            ["model", "version"],
            registry=r,
        )
        self.shadow_abs_diff = Histogram(
            f"{PREFIX}_shadow_abs_acceptance_diff",
            "Mean |shadow - served| predicted acceptance per message",
            ["model", "version"],
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.loads = Counter(
            f"{PREFIX}_model_loads",
            "Version load attempts",
            ["model", "version", "result"],
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 while a version is loaded and serving",
            ["model", "version"],
            registry=r,
        )
        self.open_streams = Gauge(f"{PREFIX}_open_streams", "Open Decide streams", registry=r)
        # Hot-path children, resolved once (see ArmMetrics).
        self.decide_messages = self.messages.labels("Decide")
        self.decide_batch_rows = self.batch_rows.labels("Decide")
        self._arms: dict[ArmKey, ArmMetrics] = {}

    def arm(self, model: str, version: int, arm: str) -> ArmMetrics:
        key = (model, version, arm)
        m = self._arms.get(key)
        if m is None:
            m = self._arms[key] = ArmMetrics(self, model, version, arm)
        return m

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
