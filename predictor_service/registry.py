"""The predictor's control plane: model versions, load/unload/scan, routing, aliases, publish.

The only writer of what serves. Every change (load, unload, routing) is serialised by one
lock, never waits on a model run, and publishes a new immutable `RouteTable` per model by
replacing its name -> table mapping whole; the decide path (`decider.py`) reads a model's
table through `table(name)` without a lock, once per message. Works on plain values;
`servicer.py` converts protobuf at the edge.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from predictor_service.metrics import PredictorMetrics
from predictor_service.refusals import ErrorKind, RequestRefused
from predictor_service.repository import (
    LoadedVersion,
    LoaderLock,
    LoadError,
    VersionRef,
    complete_versions,
    load_version,
)
from predictor_service.router import (
    RouteTable,
    Routing,
    RoutingError,
    read_routing_file,
    referenced_versions,
    resolve,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryConfig:
    repo: Path
    default_model: str | None = None


class VersionState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass
class VersionStatus:
    version: int
    state: VersionState
    error: str = ""
    loaded: LoadedVersion | None = None


@dataclass(frozen=True)
class ModelView:
    name: str
    versions: tuple[VersionStatus, ...]
    routing: Routing | None
    is_default: bool
    aliases_by_version: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


class ModelRegistry:
    """The model versions this server knows, their states and routing; publishes snapshots."""

    def __init__(self, config: RegistryConfig, metrics: PredictorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or PredictorMetrics()
        self._lock = threading.RLock()
        self._loader_locks = LoaderLock()
        self._status: dict[str, dict[int, VersionStatus]] = {}
        self._routing: dict[str, Routing] = {}
        # The published snapshot: replaced whole on every change, never mutated.
        self._tables: dict[str, RouteTable] = {}
        self._routing_file_digest: str | None = None
        self._routing_file_error: str | None = None

    # ----- reads (no lock on the found path) ---------------------------------------------

    @property
    def ready_count(self) -> int:
        return sum(len(t.versions) for t in self._tables.values())

    def table(self, name: str) -> RouteTable:
        """The current snapshot of a model, or RequestRefused naming the choices."""
        if not name:
            name = self.default_model_name()
        t = self._tables.get(name)
        if t is not None:
            return t
        with self._lock:
            known = self._status.get(name)
            if known:
                why = "; ".join(
                    f"v{s.version} {s.state.value}" + (f": {s.error}" if s.error else "")
                    for s in known.values()
                )
                raise RequestRefused(
                    ErrorKind.UNAVAILABLE,
                    "model.name",
                    f"model {name!r} has no loaded version ({why})",
                )
        raise RequestRefused(
            ErrorKind.NOT_FOUND,
            "model.name",
            f"unknown model {name!r}; this server has {sorted(self._status) or 'no models'}",
        )

    def default_model_name(self) -> str:
        if self.config.default_model:
            return self.config.default_model
        names = sorted(self._status)
        if len(names) == 1:
            return names[0]
        raise RequestRefused(
            ErrorKind.NOT_FOUND,
            "model.name",
            f"no default model: this server has {names or 'no models'}; name one in "
            "ModelSelector.name or start the server with --default-model",
        )

    # ----- repository and admin ----------------------------------------------------------

    def load(self, name: str, version: int) -> VersionStatus:
        """Load one version (0 = the highest on disk); blocking, call it off the event loop."""
        if not name or "/" in name or name.startswith("."):
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT, "name", f"{name!r} is not a model name"
            )
        if version < 0:
            raise RequestRefused(
                ErrorKind.INVALID_ARGUMENT, "version", f"must be >= 0, got {version}"
            )
        on_disk = complete_versions(self.config.repo).get(name, {})
        if version == 0:
            if not on_disk:
                raise RequestRefused(
                    ErrorKind.NOT_FOUND,
                    "name",
                    f"no complete version of {name!r} under {self.config.repo}",
                )
            version = max(on_disk)
        folder = self.config.repo / name / str(version)
        if version not in on_disk:
            why = "has no manifest.json yet" if folder.is_dir() else "does not exist"
            raise RequestRefused(ErrorKind.NOT_FOUND, "version", f"{folder} {why}")
        ref = VersionRef(name, version)
        with self._loader_locks.for_ref(ref):
            with self._lock:
                current = self._status.get(name, {}).get(version)
                if current is not None and current.state is VersionState.READY:
                    return current
                self._status.setdefault(name, {})[version] = VersionStatus(
                    version, VersionState.LOADING
                )
            t0 = time.perf_counter()
            try:
                loaded = load_version(folder, root=self.config.repo)
            except LoadError as e:
                status = VersionStatus(version, VersionState.FAILED, error=str(e))
                with self._lock:
                    self._status[name][version] = status
                self.metrics.loads.labels(name, str(version), "failed").inc()
                log.error("load of %s failed, what was serving is unchanged: %s", ref, e)
                raise RequestRefused(
                    ErrorKind.FAILED_PRECONDITION,
                    "version",
                    f"{ref} failed to load and serves nothing (other versions are unchanged): {e}",
                ) from e
            with self._lock:
                status = VersionStatus(version, VersionState.READY, loaded=loaded)
                self._status[name][version] = status
                self._publish(name)
            self.metrics.loads.labels(name, str(version), "ok").inc()
            self.metrics.ready.labels(name, str(version)).set(1)
            log.info(
                "loaded %s (%s, %.0f ms, validated on %d known answers)",
                ref,
                loaded.window,
                1e3 * (time.perf_counter() - t0),
                len(loaded.manifest.known_answers),
            )
            return status

    def unload(self, name: str, version: int) -> None:
        with self._lock:
            versions = self._status.get(name)
            if not versions:
                raise RequestRefused(ErrorKind.NOT_FOUND, "name", f"unknown model {name!r}")
            st = versions.get(version)
            if st is None or st.state is not VersionState.READY:
                state = "unknown" if st is None else st.state.value
                raise RequestRefused(
                    ErrorKind.NOT_FOUND, "version", f"{name} v{version} is not loaded ({state})"
                )
            ready = [v for v, s in versions.items() if s.state is VersionState.READY]
            if ready == [version]:
                raise RequestRefused(
                    ErrorKind.FAILED_PRECONDITION,
                    "version",
                    f"{name} v{version} is the last serving version of {name!r}; load another "
                    "version first",
                )
            routing = self._routing.get(name)
            if routing is not None:
                refs = referenced_versions(routing)
                if version in refs:
                    raise RequestRefused(
                        ErrorKind.FAILED_PRECONDITION,
                        "version",
                        f"{name} v{version} is still routed ({refs[version]}); move traffic off "
                        "it with SetRouting first",
                    )
            versions[version] = VersionStatus(version, VersionState.UNLOADED)
            self._publish(name)
        self.metrics.ready.labels(name, str(version)).set(0)
        log.info("unloaded %s v%d (requests holding it finish on it)", name, version)

    def set_routing(self, name: str, routing: Routing) -> Routing:
        if not name:
            name = self.default_model_name()
        with self._lock:
            loaded = self._loaded(name)
            if name not in self._status:
                raise RequestRefused(
                    ErrorKind.NOT_FOUND,
                    "model_name",
                    f"unknown model {name!r}; this server has {sorted(self._status)}",
                )
            try:
                table = resolve(name, routing, loaded)
            except RoutingError as e:
                raise RequestRefused(ErrorKind.INVALID_ARGUMENT, e.field, e.message) from e
            self._routing[name] = routing
            tables = dict(self._tables)
            tables[name] = table
            self._tables = tables
        log.info("routing of %s is now %s", name, routing.to_json_dict())
        return routing

    def routing(self, name: str) -> Routing:
        return self.table(name).routing

    def _loaded(self, name: str) -> dict[int, LoadedVersion]:
        return {
            v: s.loaded
            for v, s in sorted(self._status.get(name, {}).items())
            if s.state is VersionState.READY and s.loaded is not None
        }

    def _publish(self, name: str) -> None:
        """Rebuild a model's snapshot after its loaded set changed (lock held)."""
        loaded = self._loaded(name)
        tables = dict(self._tables)
        if not loaded:
            tables.pop(name, None)
        else:
            routing = self._routing.get(name, Routing())
            try:
                tables[name] = resolve(name, routing, loaded)
            except RoutingError as e:
                # Only reachable when a routing names a version that never loaded; keep the
                # previous snapshot if there is one, else fall back to the default.
                log.error("routing of %s cannot be applied: %s", name, e)
                if name not in tables:
                    tables[name] = resolve(name, Routing(), loaded)
        self._tables = tables

    def models(self) -> list[ModelView]:
        with self._lock:
            try:
                default = self.default_model_name()
            except RequestRefused:
                default = ""
            views = []
            for name in sorted(self._status):
                t = self._tables.get(name)
                by_version: dict[int, list[str]] = {}
                if t is not None:
                    for alias, v in t.routing.aliases.items():
                        by_version.setdefault(v, []).append(alias)
                views.append(
                    ModelView(
                        name=name,
                        versions=tuple(self._status[name][v] for v in sorted(self._status[name])),
                        routing=t.routing if t is not None else self._routing.get(name),
                        is_default=name == default,
                        aliases_by_version={v: tuple(sorted(a)) for v, a in by_version.items()},
                    )
                )
            return views

    def model(self, name: str) -> ModelView:
        if not name:
            name = self.default_model_name()
        for m in self.models():
            if m.name == name:
                return m
        raise RequestRefused(
            ErrorKind.NOT_FOUND,
            "name",
            f"unknown model {name!r}; this server has {sorted(self._status) or 'no models'}",
        )

    def scan(self) -> list[str]:
        """Load every complete version never seen before; returns what it loaded or why not."""
        report = []
        for name, versions in complete_versions(self.config.repo).items():
            for version in sorted(versions):
                with self._lock:
                    seen = version in self._status.get(name, {})
                if seen:
                    continue
                try:
                    self.load(name, version)
                    report.append(f"loaded {name} v{version}")
                except RequestRefused as e:
                    report.append(f"failed {name} v{version}: {e.message}")
        return report

    def apply_routing_file(self, path: Path, force: bool = False) -> bool:
        """Apply a routing file when its content changed (or a previous try failed)."""
        try:
            text = path.read_bytes()
        except OSError as e:
            self._routing_file_problem(f"{path}: cannot read the routing file: {e}")
            return False
        digest = hashlib.sha256(text).hexdigest()
        if not force and digest == self._routing_file_digest and self._routing_file_error is None:
            return False
        try:
            wanted = read_routing_file(path)
            with self._lock:
                # All models or none: check every entry before the first one takes effect.
                for name, routing in wanted.items():
                    if name not in self._status:
                        raise RoutingError(name, f"unknown model; known: {sorted(self._status)}")
                    resolve(name, routing, self._loaded(name))
                for name, routing in wanted.items():
                    self.set_routing(name, routing)
        except (RoutingError, RequestRefused) as e:
            self._routing_file_digest = digest
            self._routing_file_problem(f"{path}: {e}; the routing in force is unchanged")
            return False
        self._routing_file_digest = digest
        self._routing_file_error = None
        log.info("applied routing file %s for %s", path, sorted(wanted))
        return True

    def _routing_file_problem(self, message: str) -> None:
        if message != self._routing_file_error:
            log.error("%s", message)
        self._routing_file_error = message
