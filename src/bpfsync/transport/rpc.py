"""The one gRPC method the mesh uses, and gRPC failures as bpfsync errors.

The method is registered and called with raw bytes in both directions (no protobuf
(de)serializer in gRPC): a broadcast is encoded once for every peer, received bytes are counted
exactly, and an undecodable frame reaches our codec, which rejects it as the peer's fault, instead
of failing inside gRPC with a generic INTERNAL status.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from bpfsync.errors import BpfsyncError, TransportError
from bpfsync.transport._proto import bpfsync_pb2 as pb

__all__ = ["METHOD", "METHOD_NAME", "SERVICE", "as_error"]

_service = pb.DESCRIPTOR.services_by_name["Sync"]
SERVICE: str = _service.full_name  # "bpfsync.v1.Sync"
METHOD_NAME: str = _service.methods_by_name["Stream"].name
METHOD = f"/{SERVICE}/{METHOD_NAME}"


def as_error(exc: BaseException, where: str) -> BpfsyncError:
    """``exc`` as a bpfsync error (a TransportError unless it already is one), cause kept."""
    if isinstance(exc, BpfsyncError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        name = code.name if code is not None else "UNKNOWN"
        err = TransportError(f"{where}: {name}: {exc.details() or 'no details'}")
    elif isinstance(exc, TimeoutError):
        err = TransportError(f"{where}: timed out")
    elif isinstance(exc, (asyncio.InvalidStateError, grpc.aio.UsageError)):
        err = TransportError(f"{where}: stream already finished")
    else:
        err = TransportError(f"{where}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
