"""From `edge.config.Uplink` to an aiomqtt connection, and from a failed connection to a clear message.

`connect_params(uplink)` parses the broker URL and builds the TLS context once (at startup, so a
missing key file fails early); `ConnectParams.client()` makes an `aiomqtt.Client` from it.
`explain_connect_error(exc, url=...)` names the cause of a failed connect for an operator.

Under TLS 1.3 the broker judges our client certificate *after* the handshake has completed on our
side, so aiomqtt only sees its connect time out (paho logs the alert and drops it). When a TLS connect
failed without a precise cause, `diagnose_connect_error` repeats the handshake alone and reads the
broker's verdict (an alert such as `certificate required` or `unknown ca`), then explains that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import Properties

from edge.config import Tls, Uplink
from edge.errors import EdgeError, KeyError_

log = structlog.get_logger()

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# paho leaves Nagle's algorithm on; with the peer's delayed ACKs every small write that follows
# another (a PUBACK after a PUBLISH, an ack after a PUBACK) can wait ~40 ms for the previous one's
# TCP ACK, which caps a window-1 link at ~11 round trips/s even on loopback
NO_DELAY: tuple[tuple[int, int, int], ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
Scheme = Literal["mqtt", "mqtts"]
_E = TypeVar("_E", bound=BaseException)


class BrokerUrlError(EdgeError, ValueError):
    """The broker URL is not mqtt://host[:port] or mqtts://host[:port]."""


@dataclass(slots=True, frozen=True)
class BrokerAddress:
    scheme: Scheme
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse mqtt://host[:port] (default 1883) or mqtts://host[:port] (default 8883).

    `auto` is not a URL: resolve it with `edge.uplink.discovery.discover_broker` first.
    """
    hint = "write mqtt://host:port or mqtts://host:port, e.g. mqtts://broker.example.com:8883"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerUrlError(f"bad broker URL {url!r}: {exc}", hint=hint) from exc
    scheme = parts.scheme
    if scheme not in ("mqtt", "mqtts"):
        raise BrokerUrlError(f"bad broker URL {url!r}: scheme must be mqtt or mqtts", hint=hint)
    if not parts.hostname:
        raise BrokerUrlError(f"bad broker URL {url!r}: no host", hint=hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise BrokerUrlError(f"bad broker URL {url!r}: only scheme, host and port are allowed", hint=hint)
    if port == 0:
        raise BrokerUrlError(f"bad broker URL {url!r}: port 0", hint=hint)
    resolved: Scheme = "mqtts" if scheme == "mqtts" else "mqtt"
    return BrokerAddress(resolved, parts.hostname, port or DEFAULT_PORTS[resolved])


def tls_context(tls: Tls) -> ssl.SSLContext:
    """Client context: TLS >= 1.2, server certificate and hostname verified.

    Trusts `tls.ca_file` (or the system store when unset) and presents `cert_file`/`key_file` when
    configured. Unreadable or mismatched files raise `KeyError_` naming the file.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:  # FileNotFoundError, PermissionError, bad PEM
        raise KeyError_(
            f"cannot load CA file {tls.ca_file}: {exc}",
            hint="uplink.tls.ca_file must be a readable PEM file with the CA that signed the broker's "
            "certificate",
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise KeyError_(
                f"cannot load client certificate {tls.cert_file} with key {tls.key_file}: {exc}",
                hint="check both files exist, are readable by the service user, are PEM, and that the "
                "key belongs to the certificate",
            ) from exc
    return ctx


@dataclass(slots=True, frozen=True)
class ConnectParams:
    """Everything aiomqtt needs to reach the broker (identifier, will and session are the caller's)."""

    address: BrokerAddress
    tls_context: ssl.SSLContext | None
    keepalive: int
    timeout: float
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return self.address.url

    def client(
        self,
        *,
        identifier: str | None = None,
        will: aiomqtt.Will | None = None,
        clean_session: bool | None = None,
        max_inflight_messages: int | None = None,
        protocol: aiomqtt.ProtocolVersion | None = None,
        properties: Properties | None = None,
        max_queued_incoming_messages: int | None = None,
    ) -> aiomqtt.Client:
        """A new (not yet connected) aiomqtt client; enter it with `async with`."""
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=identifier,
            will=will,
            clean_session=clean_session,
            max_inflight_messages=max_inflight_messages,
            max_queued_incoming_messages=max_queued_incoming_messages,
            protocol=protocol,
            properties=properties,
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            keepalive=self.keepalive,
            timeout=self.timeout,
            socket_options=NO_DELAY,
        )


def connect_params(
    uplink: Uplink, *, url: str | None = None, timeout: float = 10.0, warned: set[str] | None = None
) -> ConnectParams:
    """Connection parameters for `uplink`; `url` overrides `uplink.broker` (the result of discovery).

    TLS settings apply to mqtts:// only; with mqtt:// they are ignored and a warning is logged,
    once per `warned` set (the uplink passes one for its whole life, so a reconnect does not
    repeat it; the set records what was logged).
    """
    target = url if url is not None else uplink.broker
    if target == "auto":
        raise BrokerUrlError(
            "broker is 'auto': discover the broker first",
            hint="call edge.uplink.discovery.discover_broker and pass its URL",
        )
    address = parse_broker_url(target)
    if uplink.broker == "auto" and address.tls and uplink.tls.ca_file is None:
        # a discovered broker is whoever answered on the LAN: its certificate must come from the
        # store's own CA, and a public CA would vouch for any domain an attacker owns
        raise KeyError_(
            "broker: auto needs uplink.tls.ca_file (the system CA store is never trusted for a discovered broker)",
            hint="set uplink.tls.ca_file to the CA that signed the store broker's certificate",
        )
    configured = any(v is not None for v in (uplink.tls.ca_file, uplink.tls.cert_file, uplink.tls.key_file))
    note = f"uplink_tls_ignored {address.url}"
    if not address.tls and configured and (warned is None or note not in warned):
        log.warning("uplink_tls_ignored", broker=address.url, reason="plain mqtt:// URL")
        if warned is not None:
            warned.add(note)
    ctx = tls_context(uplink.tls) if address.tls else None
    return ConnectParams(address, ctx, keepalive=round(uplink.keepalive), timeout=timeout,
                         username=uplink.auth.username, password=read_password(uplink.auth.password_file))


def read_password(path: Path | None) -> str | None:
    """The MQTT password in `path` (one line; the trailing newline an editor adds is not part of it)."""
    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"uplink.auth.password_file {path} cannot be read: {exc.strerror or exc}",
                        hint="check the path and that the service user may read it") from exc
    if len(raw) > 4096:
        raise KeyError_(f"uplink.auth.password_file {path} holds {len(raw)} bytes, expected one line",
                        hint="put only the password in the file")
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise KeyError_(f"uplink.auth.password_file {path} is not UTF-8 text",
                        hint="put only the password in the file") from exc
    if not text or "\n" in text:
        raise KeyError_(f"uplink.auth.password_file {path} must hold exactly one non-empty line",
                        hint="put only the password in the file")
    return text


# -- explaining failures -------------------------------------------------------------------------

Reason = Literal[
    "refused", "dns", "timeout", "unreachable", "reset",
    "server-untrusted", "hostname-mismatch", "server-cert-expired", "server-cert-not-yet-valid",
    "client-cert-rejected", "client-cert-missing", "not-tls", "tls-version", "tls",
    "not-authorized", "credentials", "client-id", "protocol", "unavailable", "unspecified", "other",
]

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h
_V_NOT_YET_VALID = 9
_V_EXPIRED = 10
_V_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_V_HOSTNAME_MISMATCH = frozenset({62, 64})  # hostname mismatch, IP address mismatch

# TLS alerts sent by a broker that does not accept the certificate we presented (or its absence)
_CLIENT_CERT_ALERTS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "TLSV1_ALERT_ACCESS_DENIED",
    "TLSV1_ALERT_DECRYPT_ERROR",
})
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE",
                      "HTTP_REQUEST", "UNKNOWN_PROTOCOL"})
_VERSION = frozenset({"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"})

# CONNACK codes: MQTT 5 reason codes (paho maps 3.1.1 return codes 1-5 onto 132-136)
_CONNACK: dict[int, tuple[Reason, str]] = {
    1: ("protocol", "the broker does not support this MQTT protocol version"),
    2: ("client-id", "the broker rejected the client identifier"),
    3: ("unavailable", "the broker says it is unavailable"),
    4: ("credentials", "bad user name or password"),
    5: ("not-authorized", "not authorized: the broker refused this client"),
    128: ("unspecified", "the broker refused the connection (unspecified error)"),
    132: ("protocol", "the broker does not support this MQTT protocol version"),
    133: ("client-id", "the broker rejected the client identifier"),
    134: ("credentials", "bad user name or password"),
    135: ("not-authorized", "not authorized: the broker refused this client"),
    136: ("unavailable", "the broker says it is unavailable"),
    137: ("unavailable", "the broker is busy"),
    138: ("not-authorized", "this client is banned by the broker"),
    140: ("credentials", "bad authentication method"),
    149: ("protocol", "packet too large for the broker"),
    151: ("unavailable", "the broker's quota is exceeded"),
    159: ("unavailable", "connection rate exceeded at the broker"),
}


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and its causes/contexts (aiomqtt raises `MqttError(...) from None`; __context__ remains)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen) and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first(chain: list[BaseException], kind: type[_E]) -> _E | None:
    for e in chain:
        if isinstance(e, kind):
            return e
    return None


@dataclass(slots=True, frozen=True)
class ConnectFailure:
    """Why a connect failed: a stable `reason` (for logs and metrics) and words for an operator."""

    reason: Reason
    url: str
    cause: str
    hint: str

    def __str__(self) -> str:
        return f"cannot connect to {self.url}: {self.cause} (hint: {self.hint})"


def classify_connect_error(exc: BaseException, *, url: str) -> ConnectFailure:
    """Map an exception from connecting (aiomqtt, ssl, socket) to a `ConnectFailure`. Never raises.

    The most specific evidence wins: a CONNACK code, then certificate verification, then a TLS
    alert, then socket-level errors, then timeouts and resets.
    """
    chain = _chain(exc)
    for explain in _EXPLAINERS:
        found = explain(chain)
        if found is not None:
            reason, cause, hint = found
            return ConnectFailure(reason, url, cause, hint)
    detail = str(exc) or type(exc).__name__
    return ConnectFailure("other", url, f"connection failed: {detail}",
                          "see the broker's log for its side of the story")


_Found = tuple[Reason, str, str] | None

_CONNACK_HINTS: dict[Reason, str] = {
    "not-authorized": "the broker's access rules refuse this client: check its ACL or auth plugin and, "
    "with client certificates, that it maps ours to an allowed identity",
    "credentials": "check the user name and password the broker expects",
    "client-id": "check the broker's rules for client identifiers",
    "protocol": "check which MQTT versions the broker speaks (uplink-v1 allows 3.1.1 and 5)",
    "unavailable": "the broker is up but not serving; it is retried, and its log says why",
}


def _connack(chain: list[BaseException]) -> _Found:
    error = _first(chain, MqttConnectError)
    if error is None:
        return None
    code = error.rc if isinstance(error.rc, int) else getattr(error.rc, "value", -1)
    reason, words = _CONNACK.get(code, ("unspecified", "the broker refused the connection"))
    return reason, f"{words} (CONNACK code {code})", _CONNACK_HINTS.get(reason, "see the broker's log")


def _verify(chain: list[BaseException]) -> _Found:
    error = _first(chain, ssl.SSLCertVerificationError)
    if error is None:
        return None
    code, detail = error.verify_code, error.verify_message or str(error)
    if code in _V_HOSTNAME_MISMATCH:
        return ("hostname-mismatch", f"the broker's certificate is not valid for this host ({detail})",
                "put the name (or IP) the broker certificate was issued for in uplink.broker, or reissue "
                "the certificate with this name in its subjectAltName")
    if code == _V_EXPIRED:
        return ("server-cert-expired", f"the broker's certificate has expired ({detail})",
                "renew the broker certificate, or fix this device's clock if it is wrong")
    if code == _V_NOT_YET_VALID:
        return ("server-cert-not-yet-valid", f"the broker's certificate is not valid yet ({detail})",
                "this device's clock is probably wrong (no RTC and no NTP yet?)")
    if code in _V_UNKNOWN_ISSUER:
        return ("server-untrusted", f"the broker's certificate is not trusted: unknown CA ({detail})",
                "uplink.tls.ca_file must contain the CA that signed the broker's certificate")
    return ("server-untrusted", f"the broker's certificate failed verification ({detail})",
            "check uplink.tls.ca_file and the broker certificate")


_FIXED_ALERTS: dict[str, tuple[Reason, str, str]] = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "client-cert-missing",
        "the broker rejected the connection: it requires a client certificate and we sent none "
        "(TLS alert certificate_required)",
        "set uplink.tls.cert_file and uplink.tls.key_file to this device's certificate and key",
    ),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "client-cert-missing",
        "the broker aborted the TLS handshake (alert handshake_failure): it most likely requires a "
        "client certificate and we sent none",
        "set uplink.tls.cert_file and key_file; if they are set, compare TLS versions and ciphers with "
        "the broker's",
    ),
}


def _tls_alert(chain: list[BaseException]) -> _Found:
    error = next((e for e in chain if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError)),
                 None)
    if error is None:
        return None
    code = error.reason or ""
    if code in _FIXED_ALERTS:
        return _FIXED_ALERTS[code]
    if code in _CLIENT_CERT_ALERTS:
        alert = code.removeprefix("SSLV3_ALERT_").removeprefix("TLSV1_ALERT_").lower()
        return ("client-cert-rejected", f"the broker rejected our client certificate (TLS alert {alert})",
                "the broker must trust the CA that signed uplink.tls.cert_file; check the certificate is "
                "this device's, not expired, and issued by the CA the broker is configured with")
    if code in _NOT_TLS:
        return ("not-tls", f"the broker port does not speak TLS ({code.lower()})",
                "use mqtt:// for a plain listener, or the broker's TLS port with mqtts://")
    if code in _VERSION:
        return ("tls-version", f"no common TLS version with the broker ({code.lower()})",
                "store-edge needs TLS 1.2 or newer; upgrade the broker's TLS settings")
    return "tls", f"TLS error: {error}", "check uplink.tls settings and the broker's log"


def _socket(chain: list[BaseException]) -> _Found:
    if _first(chain, ConnectionRefusedError) is not None:
        return ("refused", "connection refused: nothing is listening there (broker down or wrong port)",
                "check the broker is running and the host and port in uplink.broker")
    gai = _first(chain, socket.gaierror)
    if gai is not None:
        return ("dns", f"cannot resolve the broker's host name ({gai.strerror or gai})",
                "check the host name in uplink.broker and this device's DNS settings")
    unreachable = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN)
    error = next((e for e in chain if isinstance(e, OSError) and e.errno in unreachable), None)
    if error is not None:
        return ("unreachable", f"no route to the broker ({error.strerror})",
                "check this device's network link and routes")
    return None


def _timeout_or_reset(chain: list[BaseException]) -> _Found:
    if _first(chain, TimeoutError) is not None or any("timed out" in str(e).lower() for e in chain):
        return ("timeout", "no answer from the broker in time",
                "check network and firewall; an mqtt:// URL pointing at a TLS port also times out, and "
                "under TLS 1.3 so does a rejected client certificate (diagnose_connect_error tells)")
    if _first(chain, ssl.SSLEOFError) is not None or _first(chain, ConnectionError) is not None:
        return ("reset", "the broker closed the connection while we were connecting",
                "check the scheme matches the port (mqtts:// for a TLS listener, mqtt:// for plain) and "
                "the broker's log (connection limits, access rules)")
    return None


_EXPLAINERS: tuple[Callable[[list[BaseException]], _Found], ...] = (
    _connack, _verify, _tls_alert, _socket, _timeout_or_reset,
)


def explain_connect_error(exc: BaseException, *, url: str) -> str:
    """One line for an operator naming the cause of a failed connect to `url`, with a hint."""
    return str(classify_connect_error(exc, url=url))


# -- TLS 1.3: asking the broker for its verdict on our certificate --------------------------------

ALERT_WAIT = 1.0  # seconds to wait after the handshake for the broker's verdict (one RTT is plenty)
_VAGUE: frozenset[Reason] = frozenset({"timeout", "reset", "other"})


async def probe_tls(params: ConnectParams, *, handshake_timeout: float = 3.0) -> BaseException | None:
    """Handshake with the broker, send nothing, and wait briefly for a TLS alert.

    Returns the error seen (handshake failure, or the alert by which a TLS 1.3 broker rejects our
    certificate after the handshake), or None when the broker accepted the TLS session and waits for
    an MQTT CONNECT. Sends no MQTT at all, so it never disturbs the device's session.
    """
    if params.tls_context is None:
        return None
    host, port = params.address.host, params.address.port
    try:
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=params.tls_context, server_hostname=host
            )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        return exc
    try:
        async with asyncio.timeout(ALERT_WAIT):
            data = await reader.read(1)
    except TimeoutError:
        return None  # silence: the broker accepted our certificate and waits for CONNECT
    except OSError as exc:
        return exc
    else:
        # data from a broker that talks first is odd, but TLS itself was accepted
        return None if data else ConnectionResetError(errno.ECONNRESET, "the broker closed the TLS session")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def diagnose_connect_error(
    exc: BaseException, params: ConnectParams, *, probe_timeout: float = 3.0
) -> ConnectFailure:
    """Like `classify_connect_error`, but for a vague TLS failure (timeout, reset) ask the broker.

    Costs one extra TLS handshake, so call it when reporting a failure, not on every retry.
    """
    failure = classify_connect_error(exc, url=params.url)
    if failure.reason not in _VAGUE or params.tls_context is None:
        return failure
    probed = await probe_tls(params, handshake_timeout=probe_timeout)
    if probed is None:
        return failure
    refined = classify_connect_error(probed, url=params.url)
    return refined if refined.reason not in _VAGUE else failure
