"""Mutual TLS for the mesh: the PEM files, what is checked in them, and rotation without a restart.

Every node holds a certificate signed by the cluster CA that names its node id (a DNS SAN or the
common name). Both directions are checked:

- accepting (server.py): a peer must present a certificate the CA signed (gRPC's
  require_client_auth), and the node id of its Hello must be a name in that certificate;
- dialing (peer.py): the peer's certificate must be valid for the name dialed, which is the node
  id for a peer given as ``ID@HOST:PORT``, else ``server_name`` if set, else the address's host.

The files are checked here before gRPC sees them, so a wrong file is a start-up error that says
what is wrong (expired, key of another certificate, not signed by the CA, another node's id),
not a handshake failure on every peer later.

Rotation (``TlsStore.refresh``): the mesh re-reads the three files every few seconds and on
SIGHUP. A set that passes every check above replaces the current one, and the mesh re-establishes
every connection with it (grpc_mesh.py): new handshakes in both directions, so a CA that no longer
signs a peer's certificate takes effect at once. A set that fails a check is logged and counted
and the current one stays: a half-written file never takes a node off its cluster.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from bpfsync.errors import ConfigError

__all__ = ["TlsFiles", "TlsMaterial", "TlsStore", "load_tls"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where this node's PEM files are: its certificate (chain) and key, and the cluster CA.

    ``server_name``: the name every peer's certificate must hold when dialed, for clusters
    whose certificates do not name their addresses (peers given as ``ID@HOST:PORT`` are
    checked against their id instead). ``node_in_cert``: a peer's Hello must announce a node
    id its certificate names (always so in the agent).
    """

    cert: Path
    key: Path
    ca: Path
    server_name: str | None = None
    node_in_cert: bool = True

    def read(self) -> tuple[bytes, bytes, bytes]:
        """The files' bytes: (cert, key, ca)."""
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as err:
            raise ConfigError(f"tls: cannot read {err.filename}: {err.strerror}") from err


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One checked set of the three files, and what status pages show of it."""

    cert: bytes
    key: bytes
    ca: bytes
    names: tuple[str, ...]  # the certificate's DNS SANs and common name
    not_after: float  # the certificate's expiry, seconds since the epoch
    fingerprint: str  # SHA-256 of the certificate, hex

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def load_tls(files: TlsFiles, node: str | None = None, now: float | None = None) -> TlsMaterial:
    """Read and check the files (see the module docstring); ``node``: the id the certificate
    must name. Raises ConfigError that says which file is wrong and how."""
    cert_pem, key_pem, ca_pem = files.read()
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as err:
        raise ConfigError(f"tls.cert {files.cert}: not a PEM certificate ({err})") from err
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"tls.key {files.key}: not an unencrypted PEM private key ({err})"
                          ) from err
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as err:
        raise ConfigError(f"tls.ca {files.ca}: not a PEM certificate ({err})") from err
    leaf = chain[0]
    if _public(key.public_key()) != _public(leaf.public_key()):
        raise ConfigError(f"tls.key {files.key} is not the key of the certificate {files.cert}")
    moment = datetime.datetime.fromtimestamp(
        now if now is not None else datetime.datetime.now(datetime.UTC).timestamp(),
        datetime.UTC,
    )
    if not leaf.not_valid_before_utc <= moment <= leaf.not_valid_after_utc:
        raise ConfigError(
            f"tls.cert {files.cert} is valid from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to"
            f" {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now: issue a new one"
        )
    top = chain[-1]  # the leaf, or the last intermediate: the CA must have signed it
    if not any(_issued_by(top, ca) for ca in cas):
        raise ConfigError(
            f"tls.cert {files.cert} is not signed by the CA in {files.ca}: peers would refuse it"
        )
    names = _names(leaf)
    if node is not None and node not in names:
        raise ConfigError(
            f"tls.cert {files.cert} names {list(names)}, not this node's id {node!r}: peers"
            " bind a node id to its certificate (make one with `bpfsync certs node`)"
        )
    return TlsMaterial(
        cert=cert_pem, key=key_pem, ca=ca_pem, names=names,
        not_after=leaf.not_valid_after_utc.timestamp(),
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names))


class TlsStore:
    """The current checked material of one node, and its refresh from the files."""

    def __init__(self, files: TlsFiles, node: str) -> None:
        self.files = files
        self.node = node
        self.current = load_tls(files, node)
        self.reloads = 0  # sets taken since start
        self.failures = 0  # changed sets refused by a check
        self.last_error: str | None = None

    def refresh(self) -> bool:
        """Re-read the files; True if they changed and the new set passed every check."""
        try:
            cert, key, ca = self.files.read()
        except ConfigError as err:
            return self._refused(err)
        cur = self.current
        if (cert, key, ca) == (cur.cert, cur.key, cur.ca):
            return False
        try:
            material = load_tls(self.files, self.node)
        except ConfigError as err:
            return self._refused(err)
        self.current = material
        self.reloads += 1
        self.last_error = None
        log.info("tls: took the new certificate %s (valid until %s)", material.fingerprint[:16],
                 datetime.datetime.fromtimestamp(material.not_after, datetime.UTC))
        return True

    def _refused(self, err: ConfigError) -> bool:
        if str(err) != self.last_error:  # once per distinct problem, not every few seconds
            log.error("tls: keeping the current certificate: %s", err)
            self.failures += 1
        self.last_error = str(err)
        return False
