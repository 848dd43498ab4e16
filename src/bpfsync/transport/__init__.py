"""Moving protocol messages between nodes: the Transport interface and its implementations.

    base.py        Transport (what the agent drives), its events and PeerState
    codec.py       protocol values <-> protobuf frames, validating what peers send
    eventloop.py   GrpcEventLoop, the loop the mesh runs on, with grpcio's wake-ups drained
    grpc_mesh.py   GrpcMesh, the embedded full mesh (server.py accepts, peer.py dials)
    tls.py         mutual TLS: the files, their checks, rotation
    penalty.py     members refused for a while after bad input
    memory.py      an in-process network of transports, for tests of the layers above
"""

from bpfsync.transport.base import (
    Event,
    OversizedMessageError,
    PeerDown,
    PeerState,
    PeerUp,
    Received,
    Transport,
)
from bpfsync.transport.codec import Limits, decode, encode
from bpfsync.transport.grpc_mesh import GrpcMesh
from bpfsync.transport.options import MeshOptions
from bpfsync.transport.tls import TlsFiles

__all__ = [
    "Event",
    "GrpcMesh",
    "Limits",
    "MeshOptions",
    "OversizedMessageError",
    "PeerDown",
    "PeerState",
    "PeerUp",
    "Received",
    "TlsFiles",
    "Transport",
    "decode",
    "encode",
]
