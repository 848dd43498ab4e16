"""Every error bpfsync raises, arranged by whose fault it is.

    BpfsyncError
    ├── ConfigError                 the operator's configuration or command line is wrong
    ├── KernelError                 the local kernel refused or failed an operation (has .errno)
    │   ├── NotSupportedError       this kernel or build cannot do it (feature missing, policy)
    │   ├── PermissionDeniedError   EPERM/EACCES: capabilities, lockdown, LSM
    │   ├── NotFoundError           no such map, program, pin path or BTF type
    │   │   └── KeyNotFoundError    a lookup or delete on a key that is not in the map
    │   └── InvalidError            the kernel rejected the arguments (EINVAL, E2BIG, EEXIST, ...)
    │       ├── VerifierError       a program was rejected at load; carries the verifier log
    │       └── MapFullError        E2BIG on update: the map has no room for a new key
    ├── PeerError                   a peer sent something we refuse; the peer is at fault
    │   ├── MalformedMessageError   undecodable, oversized or out-of-bounds message
    │   ├── UnknownMapError         a change for a map this node does not sync
    │   ├── SizeMismatchError       key/value length differs from the local map's
    │   ├── ClockDriftError         a stamp further ahead of our clock than the drift bound
    │   ├── UnauthenticatedPeerError  the sender could not prove who it is, or may not connect
    │   │   └── NotMemberError      a node id (a peer's, or a record's origin) outside the cluster
    │   └── IncompatiblePeerError   the peer speaks another version of the protocol
    ├── TransportError              the network failed; nobody's input was wrong
    └── OversizedMessageError       this node tried to send a frame over the limit (a bug)

Adapters at each boundary map the lower layer's exceptions (OSError from bpf(2), grpc.RpcError,
pydantic.ValidationError) to these, keeping the original as ``__cause__``.
"""

from __future__ import annotations

import errno as _errno
import os

_ENOTSUPP = 524  # kernel-internal errno that leaks out of bpf(2) for unsupported operations


class BpfsyncError(Exception):
    """Base of every bpfsync error."""


class ConfigError(BpfsyncError):
    """The configuration or command line is wrong. The message names the field and the fix."""


class KernelError(BpfsyncError):
    """The local kernel refused or failed an operation."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class NotSupportedError(KernelError):
    """The running kernel, its configuration or its policy does not allow this."""


class PermissionDeniedError(KernelError):
    """EPERM or EACCES: missing capability, lockdown, or a security policy."""


class NotFoundError(KernelError):
    """No such map, program, pin path or BTF type."""


class KeyNotFoundError(NotFoundError):
    """The key is not in the map."""


class InvalidError(KernelError):
    """The kernel rejected the arguments."""


class VerifierError(InvalidError):
    """The verifier rejected a program. ``log`` holds the verifier's output."""

    def __init__(self, message: str, errno: int = 0, log: str = "") -> None:
        super().__init__(message, errno)
        self.log = log

    def __str__(self) -> str:
        base = super().__str__()
        if not self.log:
            return base
        tail = "\n".join(self.log.rstrip().splitlines()[-20:])
        return f"{base}\nverifier log (last lines):\n{tail}"


class MapFullError(InvalidError):
    """The map has no room for a new key (E2BIG)."""


def kernel_error(err: int, what: str) -> KernelError:
    """Map an errno from bpf(2) or libbpf to the matching KernelError subclass."""
    err = abs(err)
    text = f"{what}: {_errno.errorcode.get(err, str(err))} ({err}): {_strerror(err)}"
    if err in (_errno.EPERM, _errno.EACCES):
        return PermissionDeniedError(text, err)
    if err == _errno.ENOENT:
        return NotFoundError(text, err)
    if err in (_errno.EOPNOTSUPP, _errno.ENOTSUP, _errno.ENOSYS, _ENOTSUPP):
        return NotSupportedError(text, err)
    if err == _errno.E2BIG:
        return MapFullError(text, err)
    if err in (_errno.EINVAL, _errno.EEXIST, _errno.EBADF, _errno.EFAULT, _errno.ENOSPC):
        return InvalidError(text, err)
    return KernelError(text, err)


def _strerror(err: int) -> str:
    if err == _ENOTSUPP:
        return "operation not supported by this kernel"
    return os.strerror(err)


class PeerError(BpfsyncError):
    """A peer sent input this node refuses. ``peer`` names the sender when known."""

    def __init__(self, message: str, peer: str = "") -> None:
        super().__init__(f"{message} (from peer {peer})" if peer else message)
        self.peer = peer


class MalformedMessageError(PeerError):
    """The message could not be decoded, or is larger than the configured limit."""


class UnknownMapError(PeerError):
    """The change names a map that this node does not sync."""


class SizeMismatchError(PeerError):
    """A key or value length does not match the local map's key/value size."""


class UnauthenticatedPeerError(PeerError):
    """The sender could not prove who it is, or is not allowed to connect to this node."""


class NotMemberError(UnauthenticatedPeerError):
    """A node id that is not a member of this node's cluster: a peer at its Hello, or the
    origin of a record (core/membership.py)."""


class IncompatiblePeerError(PeerError):
    """The peer speaks another version of the peer protocol: run one version on every node."""


class ClockDriftError(PeerError):
    """A record's stamp is further in the future than the allowed clock drift.

    The origin node's clock is wrong (the sender may only be relaying): fix NTP on that node.
    """


class TransportError(BpfsyncError):
    """The network failed (connection refused, stream broken, deadline exceeded)."""


class OversizedMessageError(BpfsyncError, ValueError):
    """This node tried to send a message larger than the frame limit: split it (a local bug,
    hence also a ValueError)."""
