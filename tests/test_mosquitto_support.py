"""The test infrastructure itself: throwaway certificates and the Mosquitto subprocess wrapper.

Other tests rely on these fixtures behaving exactly as documented (same port after restart, TLS
listener really requiring a client certificate, a failed start saying why), so it is tested too.
"""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.certs import CertPaths, make_certs
from support.mosquitto import Mosquitto, MosquittoError

pytestmark = pytest.mark.mosquitto


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# -- certificates -----------------------------------------------------------------------------------


def test_server_and_client_certificates_are_signed_by_the_ca(tls_certs: CertPaths) -> None:
    """server and client chain to `ca`; the client's CN is the device id."""
    ca = load(tls_certs.ca)
    server, client = load(tls_certs.server_cert), load(tls_certs.client_cert)
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == tls_certs.device_id
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage


def test_server_certificate_names_loopback_ip_and_localhost(tls_certs: CertPaths) -> None:
    """The server certificate is valid for IP 127.0.0.1 and DNS localhost (subjectAltName)."""
    san = load(tls_certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_rogue_client_certificate_is_not_from_the_ca(tls_certs: CertPaths) -> None:
    """The rogue client certificate chains to the rogue CA only."""
    rogue, ca = load(tls_certs.rogue_client_cert), load(tls_certs.ca)
    rogue.verify_directly_issued_by(load(tls_certs.rogue_ca))
    with pytest.raises((ValueError, InvalidSignature)):  # issuer name differs, and so would the signature
        rogue.verify_directly_issued_by(ca)


def test_private_keys_are_owner_only(tls_certs: CertPaths) -> None:
    """Key files are written 0600."""
    for key in (tls_certs.server_key, tls_certs.client_key, tls_certs.rogue_client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_server_hosts_become_the_subject_alt_names(tmp_path: Path) -> None:
    """make_certs(server_hosts=...) issues the server certificate for exactly those names."""
    certs = make_certs(tmp_path, server_hosts=("broker.invalid", "10.9.8.7"))
    san = load(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.invalid"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.9.8.7"]


# -- the broker -------------------------------------------------------------------------------------


async def round_trip(host: str, port: int, tls_params: aiomqtt.TLSParameters | None = None) -> object:
    """Publish b"ping" at QoS 1 to ourselves and return the payload received."""
    async with aiomqtt.Client(host, port, timeout=3, tls_params=tls_params) as client:
        await client.subscribe("support/echo", qos=1)
        await client.publish("support/echo", b"ping", qos=1)
        async with asyncio.timeout(3):
            async for message in client.messages:
                return message.payload
    raise AssertionError("no message")


async def test_plain_fixture_serves_mqtt_on_loopback(mosquitto: Mosquitto) -> None:
    """`mosquitto` is running on 127.0.0.1 with the URL it advertises, and relays QoS 1 messages."""
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.running
    assert await round_trip(mosquitto.host, mosquitto.port) == b"ping"


async def test_tls_fixture_accepts_the_ca_signed_client(mosquitto_tls: Mosquitto) -> None:
    """`mosquitto_tls` serves TLS on tls_url to a client presenting the CA-signed certificate."""
    certs = mosquitto_tls.certs
    assert certs is not None
    assert mosquitto_tls.tls_port is not None
    assert mosquitto_tls.tls_url == f"mqtts://127.0.0.1:{mosquitto_tls.tls_port}"
    params = aiomqtt.TLSParameters(ca_certs=str(certs.ca), certfile=str(certs.client_cert),
                                   keyfile=str(certs.client_key))
    assert await round_trip("127.0.0.1", mosquitto_tls.tls_port, tls_params=params) == b"ping"


def test_restart_keeps_the_same_ports(mosquitto_tls: Mosquitto) -> None:
    """restart() stops and starts on the same plain and TLS ports, with a new process."""
    before = (mosquitto_tls.url, mosquitto_tls.tls_url, mosquitto_tls.pid)
    mosquitto_tls.restart()
    assert (mosquitto_tls.url, mosquitto_tls.tls_url) == before[:2]
    assert mosquitto_tls.pid != before[2]
    assert mosquitto_tls.running


def test_stop_closes_the_port_and_is_idempotent(mosquitto: Mosquitto) -> None:
    """After stop() connections are refused; stopping twice is harmless."""
    mosquitto.stop()
    mosquitto.stop()
    assert not mosquitto.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((mosquitto.host, mosquitto.port), timeout=1).close()


def test_config_has_the_documented_options(mosquitto_tls: Mosquitto) -> None:
    """The generated configuration carries the options tests rely on."""
    text = mosquitto_tls.config_text()
    for line in ("set_tcp_nodelay true", "allow_anonymous true", "persistence false",
                 "max_queued_messages 100000", "max_inflight_messages 0", "require_certificate true",
                 "use_identity_as_username false"):
        assert line in text.splitlines()


def test_failed_start_raises_with_the_log_tail(mosquitto_binary: Path, tmp_path: Path) -> None:
    """A port already taken: start() raises MosquittoError quoting mosquitto's own complaint."""
    broker = Mosquitto(tmp_path, binary=mosquitto_binary)
    with socket.socket() as squatter:
        squatter.bind((broker.host, broker.port))
        squatter.listen()
        try:
            with pytest.raises(MosquittoError, match=r"(?i)address already in use"):
                broker.start()
        finally:
            broker.stop()
    assert not broker.running


def test_tls_url_without_tls_listener_is_an_error(mosquitto: Mosquitto) -> None:
    """Asking a plain-only broker for tls_url fails loudly rather than returning a useless URL."""
    with pytest.raises(MosquittoError):
        _ = mosquitto.tls_url
