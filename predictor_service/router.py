"""Sticky weighted routing over a model's versions: A/B, canary, aliases and shadow.

A routing key (sequence or session id) is hashed with the model's salt into [0, 1) and
walked along cumulative weights, so one key always lands on the same arm while the weights
stay put, and moving weight from one arm to the next only moves the keys in between.
`RouteTable` is an immutable snapshot: a message reads the current one once, which is what
makes a weight change take effect on the next message of every stream and never mid-message.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predictor_service.repository import LoadedVersion

ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_ARMS = ("pinned",)
_TWO_64 = float(2**64)


class RoutingError(ValueError):
    """A routing the server refuses; the message names the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Routing:
    """What an operator asks for. Targets are aliases or version numbers ("3" or "v3").

    Empty weights mean the default: all traffic to the highest loaded version.
    """

    weights: tuple[tuple[str, float], ...] = ()
    salt: str = ""
    shadow_version: int = 0
    aliases: Mapping[str, int] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "salt": self.salt,
            "shadow_version": self.shadow_version,
            "aliases": dict(self.aliases),
        }


@dataclass(frozen=True)
class Arm:
    name: str  # an alias or "v<N>"
    version: LoadedVersion


@dataclass(frozen=True)
class RouteTable:
    """A model's routing resolved against its loaded versions at one moment."""

    model: str
    routing: Routing
    arms: tuple[Arm, ...]
    cumulative: np.ndarray  # [A] cumulative normalised weights; last entry is 1.0
    shadow: LoadedVersion | None
    aliases: Mapping[str, LoadedVersion]
    versions: Mapping[int, LoadedVersion]
    salt_bytes: bytes = b""
    explicit: bool = False  # False while the default (latest version) applies

    def assign(self, keys: Sequence[str]) -> np.ndarray:
        """Arm index per routing key `[R]`; deterministic in (salt, key)."""
        if len(self.arms) == 1:
            return np.zeros(len(keys), dtype=np.intp)
        u = np.fromiter(
            (bucket(self.salt_bytes, k) for k in keys), dtype=np.float64, count=len(keys)
        )
        idx = np.searchsorted(self.cumulative, u, side="right")
        return np.minimum(idx, len(self.arms) - 1)


def bucket(salt: bytes, key: str) -> float:
    """hash(salt, key) mapped uniformly into [0, 1)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "little") / _TWO_64


def parse_target(target: str) -> int | None:
    """A version number written as "3" or "v3", or None for an alias."""
    t = target.strip()
    if t.startswith("v") and t[1:].isdigit():
        t = t[1:]
    return int(t) if t.isdigit() else None


def resolve(model: str, routing: Routing, loaded: Mapping[int, LoadedVersion]) -> RouteTable:
    """Check a routing against the loaded versions and build its snapshot, or raise RoutingError."""
    if not loaded:
        raise RoutingError("model_name", f"model {model!r} has no loaded version to route to")
    aliases: dict[str, LoadedVersion] = {}
    for alias, version in sorted(routing.aliases.items()):
        f = f"routing.aliases[{alias!r}]"
        if not ALIAS_PATTERN.match(alias) or alias in RESERVED_ARMS or parse_target(alias):
            raise RoutingError(
                f,
                f"alias {alias!r} must match {ALIAS_PATTERN.pattern}, not be a version "
                f"number and not be {RESERVED_ARMS}",
            )
        if version not in loaded:
            raise RoutingError(
                f,
                f"alias {alias!r} points at version {version}, which is not loaded "
                f"(loaded: {sorted(loaded)}); aliases may only point at loaded versions",
            )
        aliases[alias] = loaded[version]
    if routing.shadow_version and routing.shadow_version not in loaded:
        raise RoutingError(
            "routing.shadow_version",
            f"version {routing.shadow_version} is not loaded (loaded: {sorted(loaded)})",
        )
    arms: list[Arm] = []
    weights: list[float] = []
    seen: set[str] = set()
    for i, (target, weight) in enumerate(routing.weights):
        f = f"routing.weights[{i}]"
        if not math.isfinite(weight) or weight < 0:
            raise RoutingError(f + ".weight", f"must be a finite number >= 0, got {weight}")
        number = parse_target(target)
        if number is not None:
            if number not in loaded:
                raise RoutingError(
                    f + ".target",
                    f"version {number} is not loaded (loaded: {sorted(loaded)}); load it first",
                )
            arm = Arm(f"v{number}", loaded[number])
        elif target in aliases:
            arm = Arm(target, aliases[target])
        else:
            raise RoutingError(
                f + ".target",
                f"{target!r} is neither a loaded version nor an alias of this routing "
                f"(aliases: {sorted(aliases)})",
            )
        if arm.name in seen:
            raise RoutingError(f + ".target", f"{target!r} is listed twice")
        seen.add(arm.name)
        arms.append(arm)
        weights.append(weight)
    explicit = bool(arms)
    if not arms:
        latest = max(loaded)
        arms, weights = [Arm(f"v{latest}", loaded[latest])], [1.0]
    cumulative = normalised_cumulative(weights)
    return RouteTable(
        model=model,
        routing=routing,
        arms=tuple(arms),
        cumulative=cumulative,
        shadow=loaded[routing.shadow_version] if routing.shadow_version else None,
        aliases=aliases,
        versions=dict(loaded),
        salt_bytes=routing.salt.encode()[:64],
        explicit=explicit,
    )


def normalised_cumulative(weights: Sequence[float]) -> np.ndarray:
    """Cumulative shares of finite weights >= 0; raises RoutingError when all are 0.

    Weights are relative, so they are scaled by the largest first: 1e308 + 1e308 would
    overflow to inf (and every share to 0, sending all keys to the last arm), 5e-324 alone
    would be subnormal; after scaling the largest is 1 and the sum is at most len(weights).
    """
    w = np.asarray(weights, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    if not top > 0:
        raise RoutingError("routing.weights", "weights sum to 0; give at least one arm weight > 0")
    w = w / top
    cumulative = np.cumsum(w / w.sum())
    # Zero-weight arms stay listed (GetRouting shows them) but can never be drawn.
    cumulative[-1] = 1.0
    return cumulative


def referenced_versions(routing: Routing) -> dict[int, str]:
    """Versions an explicit routing depends on, with why (unloading them is refused)."""
    refs: dict[int, str] = {}
    for alias, version in routing.aliases.items():
        refs.setdefault(version, f"alias {alias!r}")
    if routing.shadow_version:
        refs.setdefault(routing.shadow_version, "the shadow version")
    for target, weight in routing.weights:
        if weight <= 0:
            continue
        number = parse_target(target)
        if number is not None:
            refs.setdefault(number, f"weight {weight} on {target!r}")
    return refs


def routing_from_json(model: str, raw: Any, source: str) -> Routing:
    """One model's routing-file entry: {weights: {target: w}, salt, shadow_version, aliases}."""
    where = f"{source}: [{model!r}]"
    if not isinstance(raw, dict):
        raise RoutingError(where, "must be an object with weights, salt, shadow_version, aliases")
    unknown = set(raw) - {"weights", "salt", "shadow_version", "aliases"}
    if unknown:
        raise RoutingError(where, f"unknown keys {sorted(unknown)}")
    weights = raw.get("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(w, int | float) and not isinstance(w, bool) for w in weights.values()
    ):
        raise RoutingError(where + ".weights", "must map targets to numbers")
    salt = raw.get("salt", "")
    if not isinstance(salt, str):
        raise RoutingError(where + ".salt", "must be a string")
    shadow = raw.get("shadow_version", 0) or 0
    if not isinstance(shadow, int) or isinstance(shadow, bool) or shadow < 0:
        raise RoutingError(where + ".shadow_version", "must be a version number (0 = none)")
    aliases = raw.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in aliases.values()
    ):
        raise RoutingError(where + ".aliases", "must map alias names to version numbers")
    return Routing(
        weights=tuple((str(t), float(w)) for t, w in weights.items()),
        salt=salt,
        shadow_version=shadow,
        aliases=dict(aliases),
    )


def read_routing_file(path: Path) -> dict[str, Routing]:
    """Parse a routing file (the shape a Kubernetes ConfigMap mounts); raises RoutingError."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RoutingError(str(path), "routing file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RoutingError(str(path), f"cannot read routing JSON: {e}") from e
    if not isinstance(raw, dict):
        raise RoutingError(str(path), "must be a JSON object keyed by model name")
    return {str(m): routing_from_json(str(m), v, str(path)) for m, v in raw.items()}
