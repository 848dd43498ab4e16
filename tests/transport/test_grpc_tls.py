"""Mutual TLS between mesh nodes, with certificates from a throwaway CA made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from transport_harness import Node, batch, closing, eventually, free_port, run

from bpfsync.transport import MeshOptions, PeerUp, TlsFiles

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


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
    certs = {n: make_cert(d, "ca", n) for n in ("a", "b")}
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
    async def go() -> None:
        a = await Node.start("a", options=opts(pki["a"]))
        c = await Node.start("c", [a.address], options=opts(pki["b"]))  # "c" holding b's cert
        try:
            err = await eventually(lambda: c.mesh.peers()[0].last_error, "c refused")
            assert "PERMISSION_DENIED" in err and "certificate" in err
            assert a.mesh.stats["rejected_unauthenticated"] >= 1
        finally:
            await closing(a, c)

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
