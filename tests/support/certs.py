"""Throwaway X.509 material for TLS tests: a CA, a server and a client certificate, and a rogue CA.

Everything is generated with `cryptography` (EC P-256, valid for a day) and written as PEM files
into a directory the caller owns (normally pytest's tmp_path). Nothing here is fit for production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DEVICE_ID = "dev-test-01"
DEFAULT_SERVER_HOSTS = ("127.0.0.1", "localhost")


@dataclass(slots=True, frozen=True)
class CertPaths:
    """PEM files written by `make_certs`.

    `ca` signed `server_cert` (SANs: `server_hosts`, by default IP:127.0.0.1 and DNS:localhost)
    and `client_cert` (CN = device id).
    `rogue_ca` is unrelated to `ca`; it signed `rogue_client_cert`, which a broker trusting only `ca`
    must reject, and a client trusting only `rogue_ca` must reject the server.
    """

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    device_id: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "store-edge tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))


def _make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _validity(builder).sign(key, hashes.SHA256()), key


def _make_leaf(
    cn: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server_hosts: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    server = bool(server_hosts)
    ca_cert, ca_key = ca
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]),
                                        critical=False)
    return _validity(builder).sign(ca_key, hashes.SHA256()), key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def make_certs(
    directory: Path,
    *,
    device_id: str = DEFAULT_DEVICE_ID,
    server_hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
) -> CertPaths:
    """Generate the CA, server, client and rogue material into `directory` (created if needed).

    `server_hosts` become the server certificate's SANs (IP or DNS); give other names to provoke a
    hostname mismatch when clients connect to 127.0.0.1.
    """
    if not server_hosts:
        raise ValueError("server_hosts must name at least one host")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("store-edge test CA")
    server = _make_leaf(server_hosts[0], ca, server_hosts=server_hosts)
    client = _make_leaf(device_id, ca)
    rogue = _make_ca("rogue CA")
    rogue_client = _make_leaf(device_id, rogue)
    return CertPaths(
        dir=directory,
        ca=_write_cert(directory / "ca.pem", ca[0]),
        server_cert=_write_cert(directory / "server.pem", server[0]),
        server_key=_write_key(directory / "server.key", server[1]),
        client_cert=_write_cert(directory / "client.pem", client[0]),
        client_key=_write_key(directory / "client.key", client[1]),
        rogue_ca=_write_cert(directory / "rogue-ca.pem", rogue[0]),
        rogue_client_cert=_write_cert(directory / "rogue-client.pem", rogue_client[0]),
        rogue_client_key=_write_key(directory / "rogue-client.key", rogue_client[1]),
        device_id=device_id,
    )
