"""Issuing a cluster's certificates: a CA, and one certificate per node that names its id.

What ``bpfsync certs`` runs, and what the tests make their certificates with. The choices, and
why: ECDSA P-256 keys (what every TLS stack accepts, small and fast to verify); a node's
certificate holds its id as the common name and a DNS name (tls.py binds the id to it), plus the
addresses and names it is dialed by, and may act as client and server (one certificate for both
directions of a link); keys are written with mode 0600 and never overwritten unless asked.
Operators with a PKI of their own (cert-manager, Vault, step-ca) issue the same shape instead:
docs/security.md says what each field must hold.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bpfsync.core.messages import NODE_ID_RULE, is_node_id
from bpfsync.errors import ConfigError

__all__ = ["Issued", "issue_node", "make_ca"]


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


def make_ca(out: Path, name: str = "bpfsync cluster CA", days: int = 3650,
            force: bool = False) -> Issued:
    """A new CA in ``out``: ca.pem (give it to every node) and ca.key (keep it off them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(out, "ca", cert, key, force)


def issue_node(
    node: str, ca_cert: Path, ca_key: Path, out: Path, *, ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (), days: int = 365, force: bool = False,
) -> Issued:
    """A certificate for ``node`` signed by the CA: ``out``/NODE.pem and NODE.key."""
    if not is_node_id(node):
        raise ConfigError(f"node id {node!r}: must be {NODE_ID_RULE}")
    try:
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except OSError as err:
        raise ConfigError(f"cannot read the CA: {err.filename}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"the CA files are not a PEM certificate and key: {err}") from err
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key}: expected the EC key `bpfsync certs ca` makes")
    try:
        addresses = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as err:
        raise ConfigError(f"--ip: {err}") from err
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys((node, *dns))]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([*names, *addresses]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                       critical=False)
        .sign(signer, hashes.SHA256())
    )
    return _write(out, node, cert, key, force)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           force: bool) -> Issued:
    out.mkdir(parents=True, exist_ok=True)
    paths = Issued(out / f"{stem}.pem", out / f"{stem}.key")
    if not force:
        for p in (paths.cert, paths.key):
            if p.exists():
                raise ConfigError(f"{p} exists; give --force to replace it")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when --force replaces a file of another mode
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths
