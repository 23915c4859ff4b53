"""Zeroconf announcement of the device, so technicians and the HIL rig find it on the store LAN.

Service type `_store-edge._tcp.local.`, instance `<device>._store-edge._tcp.local.` (zeroconf
renames it on a conflict), port = the health/metrics port, TXT:

    device=<identity.device>  store=<identity.store>  tenant=<identity.tenant>
    version=<store-edge version>  metrics_port=<port, 0 when health is disabled>
    metrics=local|lan  (local: bound to loopback, reach it through an SSH tunnel)

Nothing personal is announced: ids are configuration. Registration runs in the background
and a failure (no multicast, no interface) is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

import ifaddr
import structlog
from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from edge import __version__
from edge.config import Config

if TYPE_CHECKING:
    from edge.supervisor import Runtime

log = structlog.get_logger("edge.advertise")

SERVICE_TYPE = "_store-edge._tcp.local."


def announced_addresses(interfaces: list[str] | None = None) -> list[str]:
    """IPv4 addresses to announce: those of `interfaces` (names or addresses), else every
    non-loopback one, else loopback (a box with no network yet still answers locally)."""
    if interfaces:
        from edge.uplink.discovery import interface_addresses

        return interface_addresses(interfaces)
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return list(dict.fromkeys(found)) or ["127.0.0.1"]


def service_info(
    cfg: Config, addresses: list[str], hostname: str | None = None, *, port: int | None = None
) -> ServiceInfo:
    """The ServiceInfo announced for `cfg` (pure: no network); `port`: the bound metrics port."""
    host, configured = cfg.health.address()
    metrics_port = (configured if port is None else port) if cfg.health.enabled else 0
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    ident = cfg.identity
    server = f"{(hostname or socket.gethostname()).split('.')[0]}.local."
    return ServiceInfo(
        SERVICE_TYPE,
        f"{ident.device}.{SERVICE_TYPE}",
        port=metrics_port,
        properties={
            "device": ident.device,
            "store": ident.store,
            "tenant": ident.tenant,
            "version": __version__,
            "metrics_port": str(metrics_port),
            "metrics": "local" if local else "lan",
        },
        server=server,
        addresses=[socket.inet_aton(a) for a in addresses],
    )


class Advertiser:
    """The `advertise` component: registers the service at start, unregisters at stop."""

    name = "advertise"

    def __init__(self, cfg: Config, *, interfaces: list[str] | None = None, port: int | None = None) -> None:
        self._cfg = cfg
        self._interfaces = interfaces
        self._port = port
        self._azc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self.state = "starting"
        self.error: str | None = None
        self.instance: str | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._register(), name="advertise")

    async def _register(self) -> None:
        try:
            addresses = announced_addresses(self._interfaces)
            info = service_info(self._cfg, addresses, port=self._port)
            choice: Any = addresses if self._interfaces else InterfaceChoice.All
            self._azc = AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
            await (await self._azc.async_register_service(info, allow_name_change=True))
        except (OSError, NonUniqueNameException, ValueError, RuntimeError) as exc:
            self.state, self.error = "failed", str(exc) or type(exc).__name__
            log.warning("advertise_failed", error=self.error, hint="multicast blocked? set health.advertise: false")
            return
        self._info = info
        self.instance = info.name
        self.state = "announced"
        log.info("advertised", service=info.name, port=info.port)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])  # not `await task`: a cancel of stop() itself must not be swallowed
        if self._azc is not None:
            with contextlib.suppress(Exception):  # best effort: the goodbye packet may not go out
                if self._info is not None:
                    await self._azc.async_unregister_service(self._info)
                await self._azc.async_close()
            self._azc = None
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "service": self.instance, "error": self.error}


def advertise_component(rt: Runtime) -> Advertiser:
    """Supervisor component factory; announces the health server's bound port when known."""
    port = None
    for comp in rt.components:
        if comp.name == "health":
            listen = comp.status().get("listen")
            if isinstance(listen, str):
                port = int(listen.rpartition(":")[2])
    return Advertiser(rt.cfg, port=port)
