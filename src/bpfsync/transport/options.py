"""Settings of the gRPC mesh and how they become gRPC channel/server options and credentials.

Every limit that protects this node from a peer lives here, with its default and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpfsync.errors import ConfigError
from bpfsync.transport.codec import Limits
from bpfsync.transport.tls import TlsFiles

__all__ = ["MeshOptions", "TlsFiles"]


@dataclass(frozen=True, slots=True)
class MeshOptions:
    """How the mesh connects, and what it accepts. Defaults suit a LAN of up to ~32 nodes."""

    # Frames larger than this are refused when sending (OversizedMessageError) and when received
    # (the stream is reset with RESOURCE_EXHAUSTED and counted). Same value on every node.
    max_message_bytes: int = 16 << 20
    # Per outbound link, encoded bytes waiting to be written. A send that would pass it resets the
    # link (the peer cannot keep up); the core resends after the next PeerUp.
    max_queue_bytes: int = 64 << 20
    # Received messages (and their frames' bytes) waiting for the agent before the transport
    # stops reading from peers.
    max_pending_messages: int = 1024
    max_pending_bytes: int = 64 << 20
    # Streams one member may hold open to this node: one, plus reconnects racing half-dead ones.
    max_streams_per_peer: int = 4
    # Redial delay: full jitter, uniform in [0, min(cap, base * 2**attempt)].
    backoff_base: float = 0.05
    backoff_cap: float = 2.0
    # A member disconnected for bad input is refused for base * 2**offences seconds, up to cap
    # (penalty.py).
    penalty_base: float = 1.0
    penalty_cap: float = 60.0
    # Each side must send its Hello within this time of the stream opening.
    handshake_timeout: float = 10.0
    # HTTP/2 pings on idle connections: a dead peer is noticed within time + timeout.
    keepalive_time: float = 10.0
    keepalive_timeout: float = 5.0
    # Re-resolve DNS peer names this often (seconds).
    dns_refresh: float = 30.0
    # Mutual TLS (tls.py); None is plaintext. The files are re-read this often (seconds).
    tls: TlsFiles | None = None
    tls_refresh: float = 5.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
        if not 0 < self.penalty_base <= self.penalty_cap:
            raise ConfigError("penalties need 0 < penalty_base <= penalty_cap")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ConfigError("backoff needs 0 < backoff_base <= backoff_cap")
        if self.max_streams_per_peer < 1 or self.max_pending_bytes < 1:
            raise ConfigError("max_streams_per_peer and max_pending_bytes must be at least 1")
        if self.keepalive_time < 1.0:
            # servers refuse pings more frequent than 1 s (min_recv_ping_interval below)
            raise ConfigError("keepalive_time must be at least 1 second")

    @property
    def hard_receive_limit(self) -> int:
        """gRPC's own limit: frames up to this are read and refused by us, with a count and a
        clear error; beyond it gRPC resets the stream before the frame reaches Python."""
        return 2 * self.max_message_bytes

    def channel_options(self, server_name: str | None = None) -> list[tuple[str, int | str]]:
        """Options of a channel to one peer; ``server_name``: the name its TLS certificate must
        hold (default ``tls.server_name``, else the address's host)."""
        name = server_name or (self.tls.server_name if self.tls else None)
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.hard_receive_limit),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # links idle between batches: ping anyway
            # gRPC's own reconnect backoff (default max 120 s) would outlast ours: align them.
            ("grpc.initial_reconnect_backoff_ms", int(self.backoff_base * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.backoff_base * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_cap * 1000)),
            # one connection per link, not shared process-wide: links fail independently, and
            # several nodes can run in one (test) process
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
        ] + ([("grpc.ssl_target_name_override", name)] if self.tls and name else [])

    def server_options(self) -> list[tuple[str, int | str]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.hard_receive_limit),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC's ping-abuse policy counts our peers' keepalive pings as strikes on a link
            # where the accepting side sends nothing after its Hello (grpc_mesh.py), and would
            # end every idle link with GOAWAY too_many_pings; the peers are members, and a
            # ping costs less than a reconnect
            ("grpc.http2.max_ping_strikes", 0),
            # never let two agents bind the same port by accident
            ("grpc.so_reuseport", 0),
        ]
