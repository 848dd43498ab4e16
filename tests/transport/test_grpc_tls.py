"""Mutual TLS between mesh nodes, with certificates from a throwaway CA made by the openssl CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from aio import eventually, run
from transport_harness import FAST, Node, batch, closing, free_port, hello

from bpfsync.errors import ConfigError
from bpfsync.transport import GrpcMesh, MeshOptions, PeerUp, TlsFiles, encode
from bpfsync.transport.rpc import METHOD
from bpfsync.transport.tls import load_tls


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
             cwd=d)


def make_cert(d: Path, ca: str, node: str) -> TlsFiles:
    """A certificate for ``node`` (CN and DNS SAN), valid for 127.0.0.1, signed by ``ca``."""
    ext = d / f"{node}.ext"
    ext.write_text(f"subjectAltName=DNS:{node},IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{node}.key", "-out", f"{node}.csr", "-subj", f"/CN={node}", cwd=d)
    _openssl("x509", "-req", "-in", f"{node}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{node}.pem", "-days", "1", "-extfile", ext.name, cwd=d)
    return TlsFiles(cert=d / f"{node}.pem", key=d / f"{node}.key", ca=d / f"{ca}.pem",
                    node_in_cert=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    certs = {n: make_cert(d, "ca", n) for n in ("a", "b", "c")}
    (d / "second").mkdir()
    certs["a2"] = make_cert(d / "second", "../ca", "a")  # another certificate for a
    certs["stranger"] = make_cert(d, "other-ca", "stranger")
    return certs


def first_error(n: Node) -> Callable[[], str | None]:
    return lambda: n.mesh.peers()[0].last_error


def opts(tls: TlsFiles | None) -> MeshOptions:
    return MeshOptions(tls=tls, backoff_base=0.02, backoff_cap=0.25)


def test_mtls_mesh_exchanges_messages(pki: dict[str, TlsFiles]) -> None:
    async def go() -> None:
        pa, pb = free_port(), free_port()
        a = await Node.start("a", [f"127.0.0.1:{pb}"], port=pa, options=opts(pki["a"]))
        b = await Node.start("b", [f"127.0.0.1:{pa}"], port=pb, options=opts(pki["b"]))
        try:
            await a.up("b")
            await b.up("a")
            assert a.mesh.send("b", batch("a", 1))
            assert (await b.received("a", 2))[1] == batch("a", 1)
        finally:
            await closing(a, b)

    run(go)


def test_node_id_must_match_its_certificate(pki: dict[str, TlsFiles]) -> None:
    # our own mesh refuses to start as "c" with b's certificate: a clear error, not a handshake
    with pytest.raises(ConfigError, match=r"names \['b'\], not this node's id 'c'"):
        GrpcMesh(hello("c"), "127.0.0.1:0", options=opts(pki["b"]))

    async def go() -> None:  # a client built by hand does try: the server refuses it
        a = await Node.start("a", options=opts(pki["a"]))
        try:
            creds = load_tls(pki["b"]).channel_credentials()
            async with grpc.aio.secure_channel(a.address, creds) as channel:
                call = channel.stream_stream(METHOD)()
                await call.write(encode(hello("c")))
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "not a name in its TLS certificate" in await call.details()
            assert a.mesh.stats["rejected_unauthenticated"] == 1
            assert not a.mesh._server.inbound  # nothing kept for "c"
        finally:
            await closing(a)

    run(go)


def test_a_peer_given_with_its_id_must_hold_that_ids_certificate(
    pki: dict[str, TlsFiles],
) -> None:
    """Dialing b@ADDRESS checks b's certificate for the name b, not for the address: a member
    listening at that address under another id cannot take b's traffic."""
    async def go() -> None:
        pa, pb = free_port(), free_port()
        a = await Node.start("a", [f"b@127.0.0.1:{pb}"], port=pa, options=opts(pki["a"]))
        impostor = await Node.start("c", [], port=pb, options=opts(pki["c"]))  # same CA
        try:
            err = await eventually(lambda: a.mesh.peers()[0].last_error, "a refuses the impostor")
            assert "handshake" in err
            assert not any(isinstance(e, PeerUp) for e in a.events)
        finally:
            await closing(a, impostor)
        b = await Node.start("b", [f"a@127.0.0.1:{pa}"], port=pb, options=opts(pki["b"]))
        a = await Node.start("a", [f"b@127.0.0.1:{pb}"], port=pa, options=opts(pki["a"]))
        try:
            await a.up("b")
            await b.up("a")
        finally:
            await closing(a, b)

    run(go)


def test_rotation_takes_new_files_and_refuses_broken_ones(
    pki: dict[str, TlsFiles], tmp_path: Path,
) -> None:
    """The files are re-read: a valid new set re-establishes the links with it, a broken one
    (a key of another certificate, a half-written file) is refused and the old set stays."""
    def place(node: str, src: TlsFiles) -> TlsFiles:
        d = tmp_path / node
        d.mkdir(exist_ok=True)
        for f in ("cert", "key", "ca"):
            shutil.copy(getattr(src, f), d / f)
        return TlsFiles(cert=d / "cert", key=d / "key", ca=d / "ca")

    async def go() -> None:
        fa, fb = place("a", pki["a"]), place("b", pki["b"])
        pa, pb = free_port(), free_port()
        rotating = dataclasses.replace(FAST, tls_refresh=0.2)
        a = await Node.start("a", [f"127.0.0.1:{pb}"], port=pa,
                             options=dataclasses.replace(rotating, tls=fa))
        b = await Node.start("b", [f"127.0.0.1:{pa}"], port=pb,
                             options=dataclasses.replace(rotating, tls=fb))
        try:
            await a.up("b")
            first = a.mesh.tls
            assert first is not None
            # broken: the key of another certificate, then a truncated certificate
            shutil.copy(pki["b"].key, fa.key)
            await eventually(lambda: a.mesh.stats["tls_reload_failures"] >= 1, "refused")
            fa.cert.write_bytes(pki["a2"].cert.read_bytes()[:100])
            await eventually(lambda: a.mesh.stats["tls_reload_failures"] >= 2, "refused again")
            assert a.mesh.tls is first and a.mesh.stats["tls_reloads"] == 0
            assert a.mesh.send("b", batch("a", 1))  # still linked, on the old set
            # a valid new certificate for a: taken, and the link comes up again with it
            shutil.copy(pki["a2"].key, fa.key)
            shutil.copy(pki["a2"].cert, fa.cert)
            await eventually(lambda: a.mesh.stats["tls_reloads"] == 1, "the new set taken")
            tls = a.mesh.tls
            assert tls is not None and tls.fingerprint != first.fingerprint
            await eventually(lambda: a.mesh.peers()[0].reconnects >= 1, "a redialed b")
            await eventually(lambda: a.mesh.send("b", batch("a", 2)), "a's link up again")
            await b.received("a", 2)
        finally:
            await closing(a, b)

    run(go)


def test_plaintext_and_foreign_ca_peers_cannot_connect(pki: dict[str, TlsFiles]) -> None:
    async def go() -> None:
        a = await Node.start("a", options=opts(pki["a"]))
        plain = await Node.start("plain", [a.address], options=opts(None))
        stranger = await Node.start("stranger", [a.address], options=opts(pki["stranger"]))
        b = await Node.start("b", [a.address], options=opts(pki["b"]))
        try:
            await a.wait_event(lambda e: getattr(e, "peer", None) == "b", "b's Hello")
            for n in (plain, stranger):
                await eventually(first_error(n), f"{n.mesh.node}'s handshake failure")
                assert not any(isinstance(e, PeerUp) for e in n.events)
            assert a.mesh.stats["streams_accepted"] == 1  # only b got through
        finally:
            await closing(a, plain, stranger, b)

    run(go)
