"""How the clients dial: TLS, keepalive, reconnect backoff and the retry service config.

One place so that the predictor and decoder clients behave the same on the wire,
and so that the numbers the server must tolerate (keepalive pings) are written once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from speckv_client.flags import check_target


@dataclass(frozen=True)
class TlsConfig:
    """Server verification (and optionally a client certificate) for a TLS channel.

    `ca_cert` is a PEM file of the CA that signed the server's certificate; None uses
    the system roots. `server_name` overrides the name checked against the certificate
    (useful when dialling an IP address).
    """

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read TLS {what} {path}: {exc.strerror}") from exc

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert, "CA certificate"),
            private_key=read(self.client_key, "client key"),
            certificate_chain=read(self.client_cert, "client certificate"),
        )


@dataclass(frozen=True)
class KeepaliveConfig:
    """HTTP/2 keepalive pings, so a dead peer behind a load balancer is noticed.

    Pings are sent only while a call is open (the Decide stream is always open on a
    worker), every `time_ms`; the server must allow pings this often without data
    (`grpc.http2.min_ping_interval_without_data_ms` <= time_ms), or it answers with
    GOAWAY "too_many_pings".
    """

    time_ms: int = 20_000
    timeout_ms: int = 10_000
    permit_without_calls: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC service-config retry for idempotent unary calls (UNAVAILABLE only)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0


@dataclass(frozen=True)
class ReconnectBackoff:
    """Backoff between attempts to (re)open a broken stream, and of the channel's TCP dials.

    Delay n (n = 0, 1, ...) is min(initial_s * multiplier**n, max_s), then scaled by a
    uniform factor in [1 - jitter, 1 + jitter]: 0.1 s, 0.2 s, 0.4 s, ... capped at 2 s.
    """

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, uniform: float) -> float:
        """Delay before attempt `attempt` (0-based), `uniform` drawn from [0, 1)."""
        base = min(self.initial_s * self.multiplier ** max(attempt, 0), self.max_s)
        return base * (1.0 - self.jitter + 2.0 * self.jitter * uniform)


@dataclass(frozen=True)
class ChannelConfig:
    tls: TlsConfig | None = None
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reconnect: ReconnectBackoff = field(default_factory=ReconnectBackoff)
    max_message_bytes: int = 16 * 1024 * 1024
    load_balancing: str = "round_robin"
    """`round_robin` spreads calls over every address `dns:///name:port` resolves to
    (a Kubernetes headless Service); `pick_first` sticks to one."""


def service_config(
    service: str,
    idempotent_methods: tuple[str, ...],
    retry: RetryPolicy,
    load_balancing: str = "round_robin",
) -> str:
    """The JSON service config: retry the idempotent unary methods; the balancing policy."""
    config = {
        "loadBalancingConfig": [{load_balancing: {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": m} for m in idempotent_methods],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s}s",
                    "maxBackoff": f"{retry.max_backoff_s}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    return json.dumps(config)


def channel_options(
    config: ChannelConfig, service: str, idempotent_methods: tuple[str, ...]
) -> list[tuple[str, int | str]]:
    ka = config.keepalive
    rc = config.reconnect
    options: list[tuple[str, int | str]] = [
        ("grpc.enable_retries", 1),
        (
            "grpc.service_config",
            service_config(service, idempotent_methods, config.retry, config.load_balancing),
        ),
        ("grpc.keepalive_time_ms", ka.time_ms),
        ("grpc.keepalive_timeout_ms", ka.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(ka.permit_without_calls)),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's own dial backoff defaults to 1 s .. 120 s; a worker wants its
        # predictor back within seconds of a restart.
        ("grpc.initial_reconnect_backoff_ms", int(rc.initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(rc.initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(rc.max_s * 1000)),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    if config.tls is not None and config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    return options


def open_channel(
    target: str, config: ChannelConfig, service: str, idempotent_methods: tuple[str, ...]
) -> grpc.Channel:
    """A sync channel to `target` ("host:port", "dns:///name:port", ...).

    Raises ValueError for a target gRPC would misread (an empty one, port 99999, which it
    dials as 34463) instead of leaving that to a log line and a late UNAVAILABLE.
    """
    try:
        check_target(target)
    except ValueError as err:
        raise ValueError(f"target {target!r}: {err}") from None
    options = channel_options(config, service, idempotent_methods)
    if config.tls is not None:
        return grpc.secure_channel(target, config.tls.credentials(), options=options)
    return grpc.insecure_channel(target, options=options)
