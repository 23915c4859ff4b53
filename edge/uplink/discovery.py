"""Find the store's MQTT broker by mDNS/DNS-SD (`uplink.broker: auto`).

Anyone on the store's LAN can announce a broker, so only `_secure-mqtt._tcp.local.` adverts are
accepted by default, and the uplink then trusts nothing but `uplink.tls.ca_file` (the store's own
CA, never the system store: edge/uplink/connect.py) for the certificate of the name announced.
`_mqtt._tcp.local.` (plain MQTT, where a rogue broker is as good as the real one) is browsed only
with `allow_plain=True` (`uplink.discovery.allow_plain`, lab only).

Browses with zeroconf and returns a URL:
- `mqtts://<server name>:<port>` for a TLS broker: the announced host name (e.g. `broker.local`),
  not its address, because the broker's certificate is issued for a name and the TLS hostname check
  needs it. The device must resolve `.local` names (Raspberry Pi OS does, via avahi + nss-mdns).
- `mqtt://<IPv4>:<port>` for a plain broker: the announced address, no name resolution needed.

With `secure_first` (the default) a TLS broker wins when both kinds answer; when the other kind
answers first, discovery waits `PREFERENCE_GRACE` seconds more for the preferred one.

`interfaces` are network interface names (`eth0`, `wlan0`) or IPv4 addresses; empty means all.
Names become their IPv4 addresses through `ifaddr` (a zeroconf dependency), which is what zeroconf's
`interfaces=` expects. Discovery is IPv4 only.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import ifaddr
import structlog
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edge.errors import EdgeError

log = structlog.get_logger()

SECURE_SERVICE = "_secure-mqtt._tcp.local."
PLAIN_SERVICE = "_mqtt._tcp.local."
PREFERENCE_GRACE = 1.0  # seconds to wait for the preferred kind after the other kind answered
RESOLVE_TIMEOUT = 3.0  # seconds to resolve one announced service to host and port


class DiscoveryError(EdgeError):
    """Broker discovery cannot run as configured (e.g. an unknown interface)."""


class BrokerNotFoundError(DiscoveryError, TimeoutError):
    """No MQTT broker answered within the discovery timeout."""


@dataclass(slots=True, frozen=True)
class _Found:
    secure: bool
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.secure else 'mqtt'}://{host}:{self.port}"


def interface_addresses(interfaces: Sequence[str]) -> list[str]:
    """IPv4 addresses for interface names or literal IPv4 addresses, in order, without repeats."""
    adapters = ifaddr.get_adapters()
    out: list[str] = []
    for item in interfaces:
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            matches = [a for a in adapters if item in (a.name, a.nice_name)]
            if not matches:
                known = ", ".join(sorted({a.nice_name for a in adapters})) or "none"
                raise DiscoveryError(f"unknown network interface {item!r}",
                                     hint=f"interfaces on this device: {known}") from None
            found = [ip.ip for a in matches for ip in a.ips if isinstance(ip.ip, str)]
            if not found:
                raise DiscoveryError(f"network interface {item!r} has no IPv4 address",
                                     hint="is it up and configured? discovery uses IPv4 only") from None
            out.extend(found)
        else:
            if address.version != 4:
                raise DiscoveryError(f"{item!r} is not an IPv4 address",
                                     hint="discovery uses IPv4 only; give an interface name or IPv4 address")
            out.append(str(address))
    return list(dict.fromkeys(out))


async def discover_broker(
    interfaces: list[str],
    timeout: float,  # noqa: ASYNC109  # discovery's own budget (uplink.discovery.timeout), part of its contract
    *,
    secure_first: bool = True,
    allow_plain: bool = False,
) -> str:
    """The URL of an MQTT broker announced on the local network; `BrokerNotFoundError` after `timeout`.

    Only `_secure-mqtt._tcp` adverts count unless `allow_plain`.
    """
    services = [SECURE_SERVICE, PLAIN_SERVICE] if allow_plain else [SECURE_SERVICE]
    addresses = interface_addresses(interfaces)
    loop = asyncio.get_running_loop()
    announced: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed and service_type in services:
            loop.call_soon_threadsafe(announced.put_nowait, (service_type, name))

    azc = AsyncZeroconf(interfaces=addresses or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    try:
        browser = AsyncServiceBrowser(azc.zeroconf, services, handlers=[on_change])
        try:
            found = await _choose(azc, announced, loop.time() + timeout, secure_first=secure_first or not allow_plain)
        finally:
            await browser.async_cancel()
    finally:
        await azc.async_close()
    where = ", ".join(interfaces) if interfaces else "all interfaces"
    if found is None:
        kinds = " or ".join(services)
        plain = "" if allow_plain else f" ({PLAIN_SERVICE} adverts are ignored without uplink.discovery.allow_plain)"
        raise BrokerNotFoundError(
            f"no MQTT broker announced itself ({kinds}) on {where} within {timeout:g} s{plain}",
            hint="check the broker is announced (e.g. an avahi service file), multicast is allowed on "
            "this network, uplink.discovery.interfaces; or set uplink.broker to its URL",
        )
    log.info("broker_discovered", url=found.url, interfaces=where)
    return found.url


async def _choose(
    azc: AsyncZeroconf, announced: asyncio.Queue[tuple[str, str]], deadline: float, *, secure_first: bool
) -> _Found | None:
    loop = asyncio.get_running_loop()
    fallback: _Found | None = None
    fallback_until = deadline
    while (remaining := min(deadline, fallback_until) - loop.time()) > 0:
        try:
            async with asyncio.timeout(remaining):
                service_type, name = await announced.get()
        except TimeoutError:
            break
        found = await _resolve(azc, service_type, name, min(RESOLVE_TIMEOUT, max(remaining, 0.1)))
        if found is None:
            continue
        if found.secure == secure_first:
            return found
        if fallback is None:
            fallback = found
            fallback_until = loop.time() + PREFERENCE_GRACE
    return fallback


async def _resolve(azc: AsyncZeroconf, service_type: str, name: str, wait: float) -> _Found | None:
    """Host and port of one announced service, asking for at most `wait` seconds."""
    info = AsyncServiceInfo(service_type, name)
    if not await info.async_request(azc.zeroconf, int(wait * 1000)) or not info.port:
        log.debug("broker_announcement_unresolved", service=name)
        return None
    secure = service_type == SECURE_SERVICE
    server = (info.server or "").rstrip(".")
    v4 = info.parsed_addresses(IPVersion.V4Only)
    host = server if secure and server else (v4[0] if v4 else server)
    if not host:
        return None
    return _Found(secure, host, info.port)
