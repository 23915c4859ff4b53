"""edge.uplink.connect: broker URLs, TLS contexts, and operator messages for failed connects.

Failures are provoked against real mosquitto brokers (see conftest.py): a TLS listener that requires
a client certificate signed by the test CA, a paused broker, a closed port, a broker refusing
anonymous clients. Connect timeouts are kept short (1.5 s).
"""

from __future__ import annotations

import dataclasses
import gc
import socket
import ssl
import warnings
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from support.certs import CertPaths, make_certs
from support.mosquitto import Mosquitto, free_port

from edge.config import Tls, Uplink
from edge.errors import KeyError_
from edge.uplink.connect import (
    BrokerAddress,
    BrokerUrlError,
    ConnectParams,
    classify_connect_error,
    connect_params,
    diagnose_connect_error,
    explain_connect_error,
    parse_broker_url,
    probe_tls,
)

CONNECT_TIMEOUT = 1.5


def tls_uplink(url: str, *, ca: Path | None, cert: Path | None = None, key: Path | None = None) -> Uplink:
    return Uplink(broker=url, tls=Tls(ca_file=ca, cert_file=cert, key_file=key))


def params_for(uplink: Uplink) -> ConnectParams:
    return connect_params(uplink, timeout=CONNECT_TIMEOUT)


def tls12_only(params: ConnectParams) -> ConnectParams:
    """The same parameters limited to TLS 1.2, where the broker judges our certificate in the handshake."""
    assert params.tls_context is not None
    params.tls_context.maximum_version = ssl.TLSVersion.TLSv1_2
    return params


async def connect_failure(params: ConnectParams) -> aiomqtt.MqttError:
    """Connect, expect failure, return the error aiomqtt raised."""
    try:
        async with params.client(identifier="dev-test-01"):
            pass
    except aiomqtt.MqttError as exc:
        error = exc
    else:
        pytest.fail(f"connecting to {params.url} should have failed")
    # paho-mqtt 2.x does not close the socket of a failed TLS handshake (Client._ssl_wrap_socket);
    # the tracebacks keep it alive. Free it here, under a filter, rather than in a later test's GC.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        current: BaseException | None = error
        while current is not None:
            current.__traceback__ = None
            current = current.__cause__ or current.__context__
        gc.collect()
    return error


def aiomqtt_style(cause: BaseException) -> aiomqtt.MqttError:
    """Wrap `cause` the way aiomqtt does (`raise MqttError(str(exc)) from None`)."""
    try:
        try:
            raise cause
        except OSError as exc:
            raise aiomqtt.MqttError(str(exc)) from None
    except aiomqtt.MqttError as wrapped:
        return wrapped


# -- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerAddress("mqtt", "broker.local", 1883)),
        ("mqtts://broker.local", BrokerAddress("mqtts", "broker.local", 8883)),
        ("mqtt://127.0.0.1:11883", BrokerAddress("mqtt", "127.0.0.1", 11883)),
        ("mqtts://[::1]:8884", BrokerAddress("mqtts", "::1", 8884)),
        ("mqtts://Broker.Example.COM:8883/", BrokerAddress("mqtts", "broker.example.com", 8883)),
    ],
)
def test_broker_urls_parse_with_scheme_default_ports(url: str, expected: BrokerAddress) -> None:
    """mqtt:// defaults to port 1883 and mqtts:// to 8883; an explicit port wins."""
    assert parse_broker_url(url) == expected


def test_broker_address_renders_back_to_a_url() -> None:
    """`url` is canonical: scheme, host (IPv6 bracketed) and explicit port."""
    assert parse_broker_url("mqtts://[::1]").url == "mqtts://[::1]:8883"
    assert parse_broker_url("mqtt://h").url == "mqtt://h:1883"


@pytest.mark.parametrize(
    "url",
    ["http://h:1883", "mqtt://", "mqtt://:1883", "mqtt://h:notaport", "mqtt://h:70000", "mqtt://h:0",
     "mqtt://h/path", "mqtt://user:pw@h", "mqtt://h?x=1", "auto", "", "h:1883"],
)
def test_bad_broker_urls_raise_broker_url_error_with_a_hint(url: str) -> None:
    """Anything but mqtt(s)://host[:port] is rejected with an error that shows the expected form."""
    with pytest.raises(BrokerUrlError) as info:
        parse_broker_url(url)
    assert info.value.hint is not None
    assert "mqtts://" in info.value.hint


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_broker_url_never_raises_anything_but_broker_url_error(url: str) -> None:
    """Garbage in, BrokerUrlError out (never ValueError/IndexError from the URL parser)."""
    try:
        address = parse_broker_url(url)
    except BrokerUrlError:
        return
    assert address.scheme in ("mqtt", "mqtts")
    assert 0 < address.port < 65536


# -- parameters -------------------------------------------------------------------------------------


def test_plain_url_gives_no_tls_context_and_warns_when_tls_is_configured(tls_certs: CertPaths) -> None:
    """TLS settings only apply to mqtts://; configuring them for mqtt:// is logged, not silently ignored."""
    with capture_logs() as logs:
        params = connect_params(tls_uplink("mqtt://127.0.0.1:1883", ca=tls_certs.ca))
    assert params.tls_context is None
    assert [e["event"] for e in logs] == ["uplink_tls_ignored"]


def test_tls_ignored_is_logged_once_per_uplink_not_per_reconnect(tls_certs: CertPaths) -> None:
    """The uplink passes one `warned` set for its life: ten reconnects, one uplink_tls_ignored."""
    warned: set[str] = set()
    uplink = tls_uplink("mqtt://127.0.0.1:1883", ca=tls_certs.ca)
    with capture_logs() as logs:
        for _ in range(10):
            connect_params(uplink, warned=warned)
    assert [e["event"] for e in logs] == ["uplink_tls_ignored"]


def test_tls_context_verifies_the_server_and_requires_tls_1_2(tls_certs: CertPaths) -> None:
    """mqtts:// contexts verify the certificate chain and the host name, and never go below TLS 1.2."""
    params = connect_params(tls_uplink("mqtts://localhost", ca=tls_certs.ca,
                                       cert=tls_certs.client_cert, key=tls_certs.client_key))
    ctx = params.tls_context
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert params.address == BrokerAddress("mqtts", "localhost", 8883)


def test_discovered_url_overrides_auto_and_auto_alone_is_refused() -> None:
    """`broker: auto` needs the discovered URL; without it connect_params says so."""
    uplink = Uplink(broker="auto")
    assert connect_params(uplink, url="mqtt://127.0.0.1:1884").url == "mqtt://127.0.0.1:1884"
    with pytest.raises(BrokerUrlError, match="discover"):
        connect_params(uplink)


def test_missing_ca_file_is_a_key_error_naming_the_file(tmp_path: Path) -> None:
    """A CA file that does not exist fails at startup with the path and the config key in the message."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(KeyError_) as info:
        connect_params(tls_uplink("mqtts://localhost", ca=missing))
    assert str(missing) in str(info.value)
    assert "uplink.tls.ca_file" in str(info.value)


def test_client_key_not_matching_its_certificate_is_a_key_error(tls_certs: CertPaths) -> None:
    """cert_file with another certificate's key is caught when the context is built."""
    with pytest.raises(KeyError_, match="client certificate"):
        connect_params(tls_uplink("mqtts://localhost", ca=tls_certs.ca,
                                  cert=tls_certs.client_cert, key=tls_certs.rogue_client_key))


# -- real connects ----------------------------------------------------------------------------------


async def test_correct_client_certificate_connects_and_round_trips(mosquitto_tls: Mosquitto) -> None:
    """a) CA + device certificate: the TLS broker accepts us, and a QoS 1 message comes back."""
    certs = mosquitto_tls.certs
    assert certs is not None
    params = params_for(tls_uplink(mosquitto_tls.tls_url, ca=certs.ca,
                                   cert=certs.client_cert, key=certs.client_key))
    async with params.client(identifier="dev-test-01") as client:
        await client.subscribe("t/echo", qos=1)
        await client.publish("t/echo", b"hello", qos=1)
        async for message in client.messages:
            assert message.payload == b"hello"
            break
    assert await probe_tls(params) is None


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
async def test_rogue_client_certificate_is_reported_as_rejected_by_the_broker(
    mosquitto_tls: Mosquitto, tls12: bool
) -> None:
    """b) A certificate from another CA: the message says the broker rejected our client certificate."""
    certs = mosquitto_tls.certs
    assert certs is not None
    params = params_for(tls_uplink(mosquitto_tls.tls_url, ca=certs.ca,
                                   cert=certs.rogue_client_cert, key=certs.rogue_client_key))
    if tls12:
        params = tls12_only(params)
    error = await connect_failure(params)
    failure = await diagnose_connect_error(error, params)
    assert failure.reason == "client-cert-rejected"
    assert "broker rejected our client certificate" in str(failure)
    assert mosquitto_tls.tls_url in str(failure)
    if tls12:  # the handshake itself fails, so no probe is needed
        assert classify_connect_error(error, url=params.url).reason == "client-cert-rejected"


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
async def test_missing_client_certificate_is_reported_as_required_by_the_broker(
    mosquitto_tls: Mosquitto, tls12: bool
) -> None:
    """c) No client certificate for a require_certificate broker: the message says one is required."""
    certs = mosquitto_tls.certs
    assert certs is not None
    params = params_for(tls_uplink(mosquitto_tls.tls_url, ca=certs.ca))
    if tls12:
        params = tls12_only(params)
    failure = await diagnose_connect_error(await connect_failure(params), params)
    assert failure.reason == "client-cert-missing"
    assert "client certificate" in str(failure)
    assert "uplink.tls.cert_file" in failure.hint


async def test_wrong_ca_reports_the_server_certificate_as_untrusted(mosquitto_tls: Mosquitto) -> None:
    """d) ca_file is not the CA that signed the broker: the message says unknown CA, not trusted."""
    certs = mosquitto_tls.certs
    assert certs is not None
    params = params_for(tls_uplink(mosquitto_tls.tls_url, ca=certs.rogue_ca,
                                   cert=certs.client_cert, key=certs.client_key))
    message = explain_connect_error(await connect_failure(params), url=params.url)
    assert "certificate is not trusted: unknown CA" in message
    assert "uplink.tls.ca_file" in message


async def test_closed_port_reports_connection_refused() -> None:
    """e) Nothing listening: connection refused, broker down or wrong port."""
    params = params_for(Uplink(broker=f"mqtt://127.0.0.1:{free_port()}"))
    failure = classify_connect_error(await connect_failure(params), url=params.url)
    assert failure.reason == "refused"
    assert "connection refused" in str(failure)


async def test_certificate_for_another_host_reports_a_hostname_mismatch(
    mosquitto_binary: Path, tmp_path: Path
) -> None:
    """A broker certificate issued for broker.invalid, reached as 127.0.0.1: hostname mismatch."""
    certs = make_certs(tmp_path / "pki", server_hosts=("broker.invalid",))
    with Mosquitto(tmp_path / "m", tls=certs, binary=mosquitto_binary) as broker:
        params = params_for(tls_uplink(broker.tls_url, ca=certs.ca,
                                       cert=certs.client_cert, key=certs.client_key))
        failure = classify_connect_error(await connect_failure(params), url=params.url)
    assert failure.reason == "hostname-mismatch"
    assert "not valid for this host" in str(failure)


async def test_broker_refusing_the_client_reports_not_authorized(
    mosquitto_binary: Path, tmp_path: Path
) -> None:
    """CONNACK 'not authorised' (3.1.1 code 5) is named as such, with the code."""
    with Mosquitto(tmp_path / "m", allow_anonymous=False, binary=mosquitto_binary) as broker:
        params = params_for(Uplink(broker=broker.url))
        error = await connect_failure(params)
    assert isinstance(error, MqttConnectError)
    failure = classify_connect_error(error, url=params.url)
    assert failure.reason == "not-authorized"
    assert "not authorized" in str(failure)


async def test_silent_broker_reports_a_timeout(mosquitto: Mosquitto) -> None:
    """A broker that accepts TCP but never answers (SIGSTOP): the message says no answer in time."""
    params = params_for(Uplink(broker=mosquitto.url))
    mosquitto.pause()
    try:
        failure = classify_connect_error(await connect_failure(params), url=params.url)
    finally:
        mosquitto.resume()
    assert failure.reason == "timeout"
    assert "no answer" in str(failure)


async def test_mqtts_to_a_plain_port_points_at_the_scheme(mosquitto_tls: Mosquitto) -> None:
    """mqtts:// against a plain listener fails fast; the hint names the mqtt:// / mqtts:// choice."""
    certs = mosquitto_tls.certs
    assert certs is not None
    params = params_for(tls_uplink(f"mqtts://127.0.0.1:{mosquitto_tls.port}", ca=certs.ca,
                                   cert=certs.client_cert, key=certs.client_key))
    failure = await diagnose_connect_error(await connect_failure(params), params)
    assert failure.reason in ("reset", "not-tls")
    assert "mqtt://" in failure.hint


# -- classification of errors that cannot be provoked locally --------------------------------------


def test_dns_failure_is_named() -> None:
    """getaddrinfo failing (wrapped by aiomqtt) is reported as a DNS problem with the host name hint."""
    error = aiomqtt_style(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    failure = classify_connect_error(error, url="mqtt://broker.example:1883")
    assert failure.reason == "dns"
    assert "resolve" in str(failure)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(5, "not-authorized"), (4, "credentials"), (2, "client-id"), (3, "unavailable"), (1, "protocol")],
)
def test_connack_codes_are_named(code: int, reason: str) -> None:
    """MQTT 3.1.1 CONNACK return codes map to distinct reasons."""
    assert classify_connect_error(MqttConnectError(code), url="mqtt://h:1883").reason == reason


def test_unknown_errors_still_produce_a_message() -> None:
    """Anything unrecognised becomes reason 'other' with the original text; never an exception."""
    failure = classify_connect_error(RuntimeError("boom"), url="mqtt://h:1883")
    assert failure.reason == "other"
    assert "boom" in str(failure)


def test_connect_params_are_values() -> None:
    """ConnectParams is a frozen value (safe to share between reconnect attempts)."""
    params = connect_params(Uplink(broker="mqtt://127.0.0.1:1883", keepalive=12.4))
    assert params.keepalive == 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.keepalive = 1  # type: ignore[misc]  # assigning to a frozen field is the point
