"""bpfsync: keep eBPF maps consistent across the nodes of a cluster."""

from bpfsync.errors import (
    BpfsyncError,
    ConfigError,
    KernelError,
    PeerError,
    TransportError,
)
from bpfsync.model import Change, Op, Overflow, Seen, WatchEvent

__version__ = "0.1.0"

__all__ = [
    "BpfsyncError",
    "Change",
    "ConfigError",
    "KernelError",
    "Op",
    "Overflow",
    "PeerError",
    "Seen",
    "TransportError",
    "WatchEvent",
    "__version__",
]
