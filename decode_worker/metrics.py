"""Prometheus metrics of one decode worker (docs/worker.md, "Metrics").

Each worker owns its registry (no process-global state), so several workers in one test
process report only their own traffic. The servicer observes every `StepResult` it streams
and every finished generation; counters that live elsewhere (the predictor stream's
reconnects, dropped step records) are read when Prometheus scrapes.

Names follow Prometheus conventions: counters end in `_total`, times are in seconds. What an
operator reads (PromQL in docs/worker.md):

    tokens/s of the worker      rate(speckv_worker_tokens_total[5m])
    tokens/s of a sequence      rate(speckv_worker_tokens_total[5m])
                                  / rate(speckv_worker_generation_seconds_total[5m])
    tokens per step             rate(speckv_worker_tokens_total[5m])
                                  / rate(speckv_worker_steps_total[5m])
    acceptance                  rate(speckv_worker_accepted_tokens_total[5m])
                                  / rate(speckv_worker_drafted_tokens_total[5m])

Label values are bounded: `source` is one of remote/fallback/local; (model, version, arm)
come only from the predictor's answers and at most `max_arms` distinct sets are kept — the
rest are counted under model="other", version="other", arm="other".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from speckv_client.types import DecisionSource

if TYPE_CHECKING:
    from decode_worker.engine import GenerationResult, StepResult

PREFIX = "speckv_worker"
# Distinct (model, version, arm) label sets kept; the rest go under OTHER.
MAX_ARMS = 64
OTHER = "other"
# Label values are cut to this many characters (a model name is a folder name).
MAX_LABEL_CHARS = 128
GAMMA_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
# A previous_step decision is usually waiting already (~0); a late one waits up to the
# decision timeout (10 ms by default); a draft plan's first answer can take longer.
WAIT_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)

ArmKey = tuple[str, str, str]


class _Arm:
    """The label children of one (model, version, arm), resolved once."""

    def __init__(self, m: WorkerMetrics, key: ArmKey) -> None:
        self.steps = m.arm_steps.labels(*key)
        self.tokens = m.arm_tokens.labels(*key)
        self.drafted = m.arm_drafted.labels(*key)
        self.accepted = m.arm_accepted.labels(*key)


class _LabeledSource(NamedTuple):
    name: str
    documentation: str
    labels: Sequence[str]
    read: Callable[[], Mapping[tuple[str, ...], float]]


class _Readout(Collector):
    """Metrics whose value lives elsewhere, read at scrape time (no copies to keep in sync)."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, str, str, Callable[[], float]]] = []
        self._labeled: list[_LabeledSource] = []

    def add(self, kind: str, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._sources.append((kind, name, documentation, read))

    def add_labeled(self, source: _LabeledSource) -> None:
        self._labeled.append(source)

    def collect(self) -> Iterable[Metric]:
        for kind, name, documentation, read in self._sources:
            value = float(read())
            if kind == "counter":
                yield CounterMetricFamily(name, documentation, value=value)
            else:
                yield GaugeMetricFamily(name, documentation, value=value)
        for name, documentation, labels, read_many in self._labeled:
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for key, value in sorted(read_many().items()):
                family.add_metric(list(key), float(value))
            yield family

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class WorkerMetrics:
    """Counters, histograms and gauges of one worker; `observe_step` is on the step path
    (a handful of counter increments on cached children)."""

    def __init__(self, max_arms: int = MAX_ARMS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mva = ["model", "version", "arm"]

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, registry=r)

        self.tokens = counter("tokens", "Tokens generated (streamed to clients)")
        self.steps = counter("steps", "Speculative steps (one target forward each)")
        self.drafted = counter(
            "drafted_tokens", "Drafted tokens the target verified (sum of gamma)"
        )
        self.accepted = counter("accepted_tokens", "Drafted tokens the target accepted")
        self.gamma = histogram(
            "gamma", "Gamma (tokens drafted and verified) per step", GAMMA_BUCKETS
        )
        self.decisions = counter(
            "decisions",
            "Steps by where their gamma came from: remote (the predictor), fallback (no "
            "answer in time, predictor down) or local (fixed/heuristic policy)",
            ["source"],
        )
        self.decision_wait = histogram(
            "decision_wait_seconds", "Time a step waited for its gamma decision", WAIT_BUCKETS
        )
        self.generation_seconds = counter(
            "generation_seconds",
            "Wall seconds of generations (summed over sequences; grows while they run)",
        )
        self.generations = counter(
            "generations", "Generations finished, by finish reason", ["finish_reason"]
        )
        self.active = gauge("active_requests", "Generations producing steps now")
        self.queued = gauge(
            "queued_requests", "Generations admitted that have not produced their first step yet"
        )
        self.arm_steps = counter(
            "arm_steps", "Steps decided remotely, by predictor model/version/arm", mva
        )
        self.arm_tokens = counter(
            "arm_tokens", "Tokens of steps decided remotely, by model/version/arm", mva
        )
        self.arm_drafted = counter(
            "arm_drafted_tokens",
            "Drafted tokens of steps decided remotely, by model/version/arm",
            mva,
        )
        self.arm_accepted = counter(
            "arm_accepted_tokens",
            "Accepted tokens of steps decided remotely, by model/version/arm",
            mva,
        )
        self._readout = _Readout()
        self._max_arms = max_arms
        self._arms: dict[ArmKey, _Arm] = {}
        self._arms_lock = threading.Lock()
        self._source = {
            s: self.decisions.labels(s.value)
            for s in (DecisionSource.REMOTE, DecisionSource.FALLBACK, DecisionSource.LOCAL)
        }
        self._registered_readout = False

    # -- wiring

    def read_stream_stats(self, stats: Callable[[], Any]) -> None:
        """Export the predictor stream's counters (speckv_client's DecisionStreamStats):
        reconnects = streams opened after the first."""
        self._readout.add(
            "counter",
            f"{PREFIX}_predictor_stream_reconnects",
            "Decide streams to the predictor opened after the first (reconnects)",
            lambda: max(0, int(stats().streams_opened) - 1),
        )

    def read_records_dropped(self, dropped: Callable[[], int]) -> None:
        self._readout.add(
            "counter",
            f"{PREFIX}_records_dropped",
            "Step records that could not be written (full disk, unwritable directory)",
            lambda: float(dropped()),
        )

    def read_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._readout.add("gauge", f"{PREFIX}_{name}", documentation, read)

    def read_counters(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        read: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> None:
        """A counter family read at scrape time: `read` maps label values to counts."""
        self._readout.add_labeled(_LabeledSource(f"{PREFIX}_{name}", documentation, labels, read))

    def finish_wiring(self) -> None:
        """Register the read-at-scrape metrics (after every `read_*` call)."""
        if not self._registered_readout:
            self.registry.register(self._readout)
            self._registered_readout = True

    # -- the servicer's side

    def observe_step(self, r: StepResult, seconds: float) -> None:
        """One step streamed; `seconds` of generation wall time since the previous one."""
        n = len(r.token_ids)
        self.tokens.inc(n)
        self.steps.inc()
        self.gamma.observe(r.gamma)
        if r.gamma:
            self.drafted.inc(r.gamma)
            self.accepted.inc(r.accepted)
        d = r.decision
        source = self._source.get(d.source)
        if source is None:
            source = self._source[d.source] = self.decisions.labels(d.source.value)
        source.inc()
        self.decision_wait.observe(d.wait_seconds)
        if seconds > 0:
            self.generation_seconds.inc(seconds)
        if d.source == DecisionSource.REMOTE:
            arm = self._arm(d.model_name, d.model_version, d.arm)
            arm.steps.inc()
            arm.tokens.inc(n)
            if r.gamma:
                arm.drafted.inc(r.gamma)
                arm.accepted.inc(r.accepted)

    def observe_generation(self, result: GenerationResult, seconds_counted: float) -> None:
        """A generation finished; tops generation seconds up to its measured wall time."""
        rest = result.wall_seconds - seconds_counted
        if rest > 0:
            self.generation_seconds.inc(rest)
        self.generations.labels(result.finish_reason.value).inc()

    def _arm(self, model: str, version: int, arm: str) -> _Arm:
        key = (model[:MAX_LABEL_CHARS], str(version), arm[:MAX_LABEL_CHARS])
        found = self._arms.get(key)
        if found is not None:
            return found
        with self._arms_lock:
            found = self._arms.get(key)
            if found is None:
                if len(self._arms) >= self._max_arms:
                    key = (OTHER, OTHER, OTHER)
                    found = self._arms.get(key)
                if found is None:
                    found = _Arm(self, key)
                    # The OTHER set is stored beyond the cap: at most max_arms + 1 sets.
                    self._arms[key] = found
            return found

    # -- reading

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
