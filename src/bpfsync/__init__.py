"""bpfsync: keep eBPF maps consistent across the nodes of a cluster."""

from bpfsync.errors import (
    BpfsyncError,
    ClockDriftError,
    ConfigError,
    IncompatiblePeerError,
    InvalidError,
    KernelError,
    KeyNotFoundError,
    MalformedMessageError,
    MapFullError,
    NotFoundError,
    NotMemberError,
    NotSupportedError,
    OversizedMessageError,
    PeerError,
    PermissionDeniedError,
    SizeMismatchError,
    TransportError,
    UnauthenticatedPeerError,
    UnknownMapError,
    VerifierError,
)
from bpfsync.model import Change, Op, Overflow, Seen, WatchEvent


def __getattr__(name: str) -> str:
    """``__version__``, read when asked: pyproject.toml is the one place the version is
    written, and the installed metadata carries it. Not at import: importlib.metadata loads
    socket and threading, which the sans-I/O core must not pull in (test_core_surface.py)."""
    if name != "__version__":
        raise AttributeError(f"module 'bpfsync' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bpfsync")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"

__all__ = [
    "BpfsyncError",
    "Change",
    "ClockDriftError",
    "ConfigError",
    "IncompatiblePeerError",
    "InvalidError",
    "KernelError",
    "KeyNotFoundError",
    "MalformedMessageError",
    "MapFullError",
    "NotFoundError",
    "NotMemberError",
    "NotSupportedError",
    "Op",
    "Overflow",
    "OversizedMessageError",
    "PeerError",
    "PermissionDeniedError",
    "Seen",
    "SizeMismatchError",
    "TransportError",
    "UnauthenticatedPeerError",
    "UnknownMapError",
    "VerifierError",
    "WatchEvent",
    "__version__",
]
