"""What `speckv-predictor serve` can be told: `ServerConfig` and the per-message limits.

Only the standard library is imported at module level, so `serve_cli.py` reads its flags'
defaults from this dataclass (one source) while a training-only install can still build the
command line; the pieces each method builds are imported when it runs. `wire.py` enforces the
limits; `server.py` runs a server with this configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from predictor_service.decider import DeciderConfig
    from predictor_service.outcomes import OutcomeConfig
    from predictor_service.registry import RegistryConfig
    from predictor_service.wire import StreamLimits

# Per-message limits answered with a per-message error (docs/predictor.md, "Limits").
MAX_MESSAGE_BYTES = 1 << 20
MAX_ROUTING_KEY_BYTES = 256
MAX_NAME_BYTES = 256


@dataclass(frozen=True)
class ServerConfig:
    """Everything `speckv-predictor serve` can be told; built once by the CLI."""

    repo: Path
    host: str = "127.0.0.1"
    port: int = 0
    admin_token: str | None = None
    poll_seconds: float | None = None
    metrics_port: int | None = None
    default_model: str | None = None
    routing_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # SIGTERM: seconds streams get to finish after being told to reconnect.
    grace_seconds: float = 10.0
    # Connections are closed (GOAWAY) after this age so load rebalances across pods.
    max_connection_age_seconds: float = 900.0
    keepalive_seconds: float = 30.0
    max_batch_rows: int = 1024
    max_candidates: int = 16
    max_gamma: int = 64
    # Per-message limits answered with a per-message error (docs/predictor.md, "Limits").
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_routing_key_bytes: int = MAX_ROUTING_KEY_BYTES
    max_decide_streams: int = 1024
    # Outcomes and arm statistics (docs/predictor.md, "Outcomes and arm statistics").
    arm_stats_max_sequences: int = 20_000
    max_outcomes_per_message: int = 4096
    switch_interval_s: float | None = 0.0005

    def registry_config(self) -> RegistryConfig:
        from predictor_service.registry import RegistryConfig

        return RegistryConfig(repo=self.repo, default_model=self.default_model)

    def decider_config(self) -> DeciderConfig:
        from predictor_service.decider import DeciderConfig

        return DeciderConfig(
            max_batch_rows=self.max_batch_rows,
            max_candidates=self.max_candidates,
            max_gamma=self.max_gamma,
        )

    def limits(self) -> StreamLimits:
        from predictor_service.wire import StreamLimits

        return StreamLimits(
            max_message_bytes=self.max_message_bytes,
            max_routing_key_bytes=self.max_routing_key_bytes,
            max_name_bytes=MAX_NAME_BYTES,
            max_decide_streams=self.max_decide_streams,
        )

    def outcome_config(self) -> OutcomeConfig:
        from predictor_service.outcomes import OutcomeConfig

        return OutcomeConfig(
            max_sequences=self.arm_stats_max_sequences,
            max_outcomes_per_message=self.max_outcomes_per_message,
            max_routing_key_bytes=self.max_routing_key_bytes,
            max_name_bytes=MAX_NAME_BYTES,
            max_gamma=self.max_gamma,
        )

    def check(self) -> None:
        """Refuse configurations that cannot work, with the flag to fix."""
        from predictor_service.router import read_routing_file

        for flag, value, low, high in (
            ("--max-message-bytes", self.max_message_bytes, 1024, 1 << 30),
            ("--max-routing-key-bytes", self.max_routing_key_bytes, 1, 1 << 20),
            ("--max-decide-streams", self.max_decide_streams, 1, 1 << 20),
            ("--arm-stats-max-sequences", self.arm_stats_max_sequences, 0, 1 << 24),
            ("--max-outcomes-per-message", self.max_outcomes_per_message, 1, 1 << 20),
        ):
            if not low <= value <= high:
                raise ValueError(f"{flag} must be in [{low}, {high}], got {value}")
        if not self.repo.is_dir():
            raise ValueError(f"--repo {self.repo}: not a directory; point it at a model repository")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together; give both or neither")
        if self.poll_seconds is not None and self.poll_seconds <= 0:
            raise ValueError(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.grace_seconds < 0:
            raise ValueError(f"--grace-seconds must be >= 0, got {self.grace_seconds}")
        if self.max_batch_rows < 1:
            raise ValueError(f"--max-batch-rows must be >= 1, got {self.max_batch_rows}")
        if self.routing_file is not None:
            read_routing_file(self.routing_file)  # RoutingError names the file and key

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Settings for long-lived streams behind a Kubernetes headless Service."""
        from predictor_service.wire import transport_limit

        return [
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Accept client keepalive pings down to every 10 s without a GOAWAY.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(self.grace_seconds, 1.0) * 1000)),
            # Above --max-message-bytes a message is still read and refused on its own
            # (the stream stays open); only above this transport limit does gRPC end it.
            ("grpc.max_receive_message_length", transport_limit(self.max_message_bytes)),
        ]
