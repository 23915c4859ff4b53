"""A mock BlueZ on a private D-Bus, for bleak's real BlueZ backend (tests, benchmark soak, rig).

    with DbusDaemon() as bus:                       # a private dbus-daemon (apt package `dbus`)
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address   # bleak talks to the "system" bus
        async with MockBluez(bus.address) as bluez:
            bluez.add_adapter("hci0")
            ... start the scanner under test ...
            bluez.advertise("C6:0F:3B:5E:12:A9", rssi=-60, manufacturer_data={0x004C: b"..."})

What it implements is what bleak 3.x's BlueZ backend calls and what bluetoothd does in
return (bluez `doc/org.bluez.Adapter.rst`, `org.bluez.Device.rst`,
`org.bluez.AdvertisementMonitorManager.rst`):

- `org.freedesktop.DBus.ObjectManager.GetManagedObjects` at `/`; `InterfacesAdded` /
  `InterfacesRemoved` for adapters and devices; `PropertiesChanged` for `Powered`,
  `Discovering`, and a device's `RSSI`, `ManufacturerData` (a{qv}, ay values), `ServiceData`;
- `org.bluez.Adapter1` at `/org/bluez/hciN`: `SetDiscoveryFilter`, `StartDiscovery`
  (`org.bluez.Error.InProgress` when the caller already has a session, `NotReady` when
  powered off), `StopDiscovery` (`NotReady` when off, `Failed` without a session), `Powered`
  settable through `org.freedesktop.DBus.Properties.Set` (power off ends every discovery
  session, like bluetoothd's adapter_stop); a client leaving the bus loses its sessions;
- `org.bluez.AdvertisementMonitorManager1` (`RegisterMonitor` / `UnregisterMonitor`) unless
  the adapter is added with `passive=False`, in which case the call fails with
  `org.freedesktop.DBus.Error.UnknownMethod` like a bluetoothd without `--experimental`.

The radio is modelled only as far as the driver can observe it: `advertise()` reaches
clients only while the adapter is powered, somebody scans (a discovery session or a monitor)
and the adapter is not stalled (`stall()`, a controller that silently stops reporting).
Faults are injected with `fail_next()`, `remove_adapter()`, `set_rfkill()`. `calls` records
the method calls (member, adapter) so a test can see what the driver did to the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BLUEZ = "org.bluez"
OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"
ADAPTER = "org.bluez.Adapter1"
MONITOR_MANAGER = "org.bluez.AdvertisementMonitorManager1"
DEVICE = "org.bluez.Device1"
_STD = ["org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable"]
START_TIMEOUT = 5.0

StallClears = Literal["restart", "power_cycle", "never"]

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_replies_per_connection">50000</limit>
</busconfig>
"""


class DbusDaemonError(RuntimeError):
    pass


def find_dbus_daemon() -> Path | None:
    found = shutil.which("dbus-daemon")
    return Path(found) if found else None


class DbusDaemon:
    """A private `dbus-daemon` in a temporary directory (short path: unix sockets have a
    108-byte limit). `address` is what `DBUS_SYSTEM_BUS_ADDRESS` should be set to."""

    def __init__(self) -> None:
        binary = find_dbus_daemon()
        if binary is None:
            raise DbusDaemonError("dbus-daemon not found (apt-get install dbus, or scripts/bootstrap.sh)")
        self.binary = binary
        self.address = ""
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="bz", dir="/tmp")  # short path: unix sockets have a 108-byte limit
        config = Path(self._dir) / "bus.conf"
        config.write_text(_BUS_CONFIG.format(dir=self._dir))
        self._proc = subprocess.Popen(
            [str(self.binary), f"--config-file={config}", "--nofork", "--print-address=1", "--nopidfile"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        os.set_blocking(self._proc.stdout.fileno(), False)
        while not line.endswith(b"\n"):
            chunk = self._proc.stdout.read() or b""
            line += chunk
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read() if self._proc.stderr else b""
                self.stop()
                raise DbusDaemonError(f"dbus-daemon did not start: {err.decode(errors='replace')[-500:]}")
            if not chunk:
                time.sleep(0.005)
        self.address = line.decode().strip()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(slots=True)
class _Adapter:
    name: str
    path: str
    props: dict[str, Variant]
    passive: bool
    sessions: set[str] = field(default_factory=set)  # unique bus names with a discovery session
    monitors: set[tuple[str, str]] = field(default_factory=set)  # (sender, monitor path)
    stalled: StallClears | None = None
    rfkill: bool = False


@dataclass(slots=True)
class _Device:
    path: str
    adapter: str
    props: dict[str, Variant]
    last_adv: float = 0.0


def device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


def _mfr_variant(data: Mapping[int, bytes]) -> Variant:
    return Variant("a{qv}", {int(k): Variant("ay", bytes(v)) for k, v in data.items()})


def _svc_variant(data: Mapping[str, bytes]) -> Variant:
    return Variant("a{sv}", {str(k): Variant("ay", bytes(v)) for k, v in data.items()})


class MockBluez:
    """bluetoothd, as far as bleak's BlueZ backend can tell. Use as an async context manager
    (connects, owns `org.bluez`); every other method is synchronous (messages are queued)."""

    def __init__(self, bus_address: str, *, temporary_timeout: float | None = None) -> None:
        self.bus_address = bus_address
        self.temporary_timeout = temporary_timeout  # remove devices silent this long (bluetoothd: 30 s)
        self.adapters: dict[str, _Adapter] = {}
        self.devices: dict[str, _Device] = {}
        self.calls: list[tuple[str, str]] = []
        self.counts: Counter[str] = Counter()  # adverts delivered / dropped (by why)
        self._fail: dict[str, deque[str]] = {}
        self._garble: Counter[str] = Counter()
        self._bus: MessageBus | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        bus = await MessageBus(bus_address=self.bus_address).connect()
        bus.add_message_handler(self._handle)
        await bus.request_name(BLUEZ)
        rule = "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        self._bus = bus
        if self.temporary_timeout is not None:
            self._sweeper = asyncio.create_task(self._sweep(), name="mock-bluez-sweep")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._bus is not None:
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast: unannotated
            self._bus = None

    async def drain(self) -> None:
        """Wait until every queued message is written to the bus (a round trip to the daemon)."""
        if self._bus is not None:
            await self._bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                         interface="org.freedesktop.DBus.Peer", member="Ping"))

    # -- adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str = "hci0", *, powered: bool = True, passive: bool = True,
                    address: str = "00:1A:7D:DA:71:13") -> None:
        path = f"/org/bluez/{name}"
        props = {
            "Address": Variant("s", address),
            "AddressType": Variant("s", "public"),
            "Name": Variant("s", "store-edge-mock"),
            "Alias": Variant("s", "store-edge-mock"),
            "Class": Variant("u", 0),
            "Powered": Variant("b", powered),
            "PowerState": Variant("s", "on" if powered else "off"),
            "Discoverable": Variant("b", False),
            "DiscoverableTimeout": Variant("u", 180),
            "Pairable": Variant("b", False),
            "PairableTimeout": Variant("u", 0),
            "Discovering": Variant("b", False),
            "UUIDs": Variant("as", []),
            "Modalias": Variant("s", "usb:v1D6Bp0246d0540"),
            "Roles": Variant("as", ["central", "peripheral"]),
            "ExperimentalFeatures": Variant("as", []),
        }
        adapter = _Adapter(name, path, props, passive)
        self.adapters[name] = adapter
        self._signal("/", OM, "InterfacesAdded", "oa{sa{sv}}", [path, self._interfaces(adapter)])

    def remove_adapter(self, name: str = "hci0") -> None:
        """The USB dongle is pulled: its devices go, then the adapter (as bluetoothd does)."""
        adapter = self.adapters.pop(name)
        for path in [p for p, d in self.devices.items() if d.adapter == name]:
            self._remove_device_path(path)
        self._signal("/", OM, "InterfacesRemoved", "oas", [adapter.path, list(self._interfaces(adapter))])

    def set_powered(self, name: str, powered: bool) -> None:
        """Power the adapter on/off from outside (bluetoothctl, rfkill)."""
        self._power(self.adapters[name], powered)

    def set_rfkill(self, name: str, blocked: bool) -> None:
        """rfkill-block the adapter: it powers off and refuses to power on."""
        adapter = self.adapters[name]
        adapter.rfkill = blocked
        if blocked:
            self._power(adapter, False)

    def stall(self, name: str, clears_on: StallClears | None) -> None:
        """The controller stops reporting advertisements (everything looks fine on D-Bus) until
        a scanner restart, a power cycle, or never; None ends the stall."""
        self.adapters[name].stalled = clears_on

    def fail_next(self, member: str, error: str, times: int = 1) -> None:
        """The next `times` calls of `member` (e.g. StartDiscovery) fail with D-Bus error `error`."""
        self._fail.setdefault(member, deque()).extend([error] * times)

    def garble_next(self, member: str, times: int = 1) -> None:
        """The next `times` calls of `member` get a success reply with a body BlueZ never
        sends (a string where a variant belongs): the client fails in an unexpected way."""
        self._garble[member] += times

    def is_scanning(self, name: str = "hci0") -> bool:
        a = self.adapters.get(name)
        return a is not None and bool(a.props["Powered"].value) and bool(a.sessions or a.monitors)

    def powered(self, name: str = "hci0") -> bool:
        a = self.adapters.get(name)
        return a is not None and bool(a.props["Powered"].value)

    # -- devices -------------------------------------------------------------------------------

    def advertise(
        self,
        address: str,
        *,
        rssi: int,
        manufacturer_data: Mapping[int, bytes] | None = None,
        service_data: Mapping[str, bytes] | None = None,
        tx_power: int | None = None,
        adapter: str = "hci0",
        address_type: str = "random",
    ) -> bool:
        """One advertisement heard by `adapter`; False when nobody could hear it."""
        a = self.adapters.get(adapter)
        if a is None or not self.is_scanning(adapter):
            self.counts["dropped_not_scanning"] += 1
            return False
        if a.stalled is not None:
            self.counts["dropped_stalled"] += 1
            return False
        self.counts["delivered"] += 1
        path = device_path(adapter, address)
        dev = self.devices.get(path)
        now = time.monotonic()
        if dev is None:
            props = {
                "Address": Variant("s", address.upper()),
                "AddressType": Variant("s", address_type),
                "Alias": Variant("s", address.upper().replace(":", "-")),
                "Paired": Variant("b", False),
                "Bonded": Variant("b", False),
                "Trusted": Variant("b", False),
                "Blocked": Variant("b", False),
                "LegacyPairing": Variant("b", False),
                "Connected": Variant("b", False),
                "UUIDs": Variant("as", []),
                "Adapter": Variant("o", a.path),
                "ServicesResolved": Variant("b", False),
                "RSSI": Variant("n", rssi),
                "ManufacturerData": _mfr_variant(manufacturer_data or {}),
                "ServiceData": _svc_variant(service_data or {}),
            }
            if tx_power is not None:
                props["TxPower"] = Variant("n", tx_power)
            self.devices[path] = _Device(path, adapter, props, now)
            self._signal("/", OM, "InterfacesAdded", "oa{sa{sv}}", [path, {DEVICE: props}])
            return True
        dev.last_adv = now
        changed: dict[str, Variant] = {"RSSI": Variant("n", rssi)}
        if manufacturer_data is not None:
            changed["ManufacturerData"] = _mfr_variant(manufacturer_data)
        if service_data is not None:
            changed["ServiceData"] = _svc_variant(service_data)
        if tx_power is not None:
            changed["TxPower"] = Variant("n", tx_power)
        dev.props.update(changed)
        self._signal(path, PROPS, "PropertiesChanged", "sa{sv}as", [DEVICE, changed, []])
        return True

    def remove_device(self, address: str, adapter: str = "hci0") -> None:
        """bluetoothd forgets the device (temporary device timeout, or RemoveDevice)."""
        self._remove_device_path(device_path(adapter, address))

    def _remove_device_path(self, path: str) -> None:
        if self.devices.pop(path, None) is not None:
            self._signal("/", OM, "InterfacesRemoved", "oas", [path, [*_STD, DEVICE]])

    async def _sweep(self) -> None:
        assert self.temporary_timeout is not None
        while True:
            await asyncio.sleep(min(1.0, self.temporary_timeout / 4))
            cutoff = time.monotonic() - self.temporary_timeout
            for path in [p for p, d in self.devices.items() if d.last_adv < cutoff]:
                self._remove_device_path(path)

    # -- D-Bus plumbing --------------------------------------------------------------------------

    def _interfaces(self, adapter: _Adapter) -> dict[str, dict[str, Variant]]:
        out = {ADAPTER: adapter.props}
        if adapter.passive:
            out[MONITOR_MANAGER] = {
                "SupportedMonitorTypes": Variant("as", ["or_patterns"]),
                "SupportedFeatures": Variant("as", []),
            }
        return out

    def _signal(self, path: str, interface: str, member: str, signature: str, body: list[Any]) -> None:
        if self._bus is not None and self._bus.connected:
            self._bus.send(Message.new_signal(path, interface, member, signature, body))

    def _set_adapter_prop(self, adapter: _Adapter, name: str, value: Variant) -> None:
        if adapter.props[name].value == value.value:
            return
        adapter.props[name] = value
        self._signal(adapter.path, PROPS, "PropertiesChanged", "sa{sv}as", [ADAPTER, {name: value}, []])

    def _update_discovering(self, adapter: _Adapter) -> None:
        on = bool(adapter.props["Powered"].value) and bool(adapter.sessions)
        self._set_adapter_prop(adapter, "Discovering", Variant("b", on))

    def _power(self, adapter: _Adapter, powered: bool) -> None:
        was = bool(adapter.props["Powered"].value)
        if was == powered:
            return
        if not powered:
            adapter.sessions.clear()  # bluetoothd's adapter_stop frees the discovery list
            self._update_discovering(adapter)
        elif adapter.stalled == "power_cycle":
            adapter.stalled = None
        self._set_adapter_prop(adapter, "Powered", Variant("b", powered))
        self._set_adapter_prop(adapter, "PowerState", Variant("s", "on" if powered else "off"))

    def _handle(self, msg: Message) -> Message | bool | None:  # noqa: PLR0911 - one reply per D-Bus method
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.body and msg.body[2] == "":
                self._client_left(msg.body[0])
            return None
        if msg.message_type != MessageType.METHOD_CALL or msg.member is None:
            return None
        path = msg.path or ""
        adapter = next((a for a in self.adapters.values() if a.path == path), None)
        self.calls.append((msg.member, adapter.name if adapter else path))
        failing = self._fail.get(msg.member)
        if failing:
            return Message.new_error(msg, failing.popleft(), "injected by the mock")
        if self._garble[msg.member] > 0:
            self._garble[msg.member] -= 1
            return Message.new_method_return(msg, "s", ["garbage"])
        if msg.interface == OM and msg.member == "GetManagedObjects" and path == "/":
            objects: dict[str, dict[str, dict[str, Variant]]] = {a.path: self._interfaces(a)
                                                                  for a in self.adapters.values()}
            objects.update({d.path: {DEVICE: d.props} for d in self.devices.values()})
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [objects])
        if msg.interface == PROPS:
            return self._properties(msg, adapter)
        if adapter is None:
            return None  # dbus-fast answers UnknownMethod
        if msg.interface == ADAPTER:
            return self._adapter_method(msg, adapter)
        if msg.interface == MONITOR_MANAGER and adapter.passive:
            return self._monitor_method(msg, adapter)
        return None

    def _properties(self, msg: Message, adapter: _Adapter | None) -> Message | None:  # noqa: PLR0911 - see _handle
        path = msg.path or ""
        dev = self.devices.get(path)
        props = adapter.props if adapter is not None else dev.props if dev is not None else None
        if props is None:
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownObject", "no such object")
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [props])
        if msg.member == "Get":
            value = props.get(msg.body[1])
            if value is None:
                return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "no such property")
            return Message.new_method_return(msg, "v", [value])
        if msg.member == "Set" and adapter is not None and msg.body[1] == "Powered":
            want = bool(msg.body[2].value)
            if want and adapter.rfkill:
                return Message.new_error(msg, "org.bluez.Error.Failed", "Blocked through rfkill")
            self._power(adapter, want)
            return Message.new_method_return(msg)
        return Message.new_error(msg, "org.freedesktop.DBus.Error.PropertyReadOnly", "read-only")

    def _adapter_method(self, msg: Message, adapter: _Adapter) -> Message | None:  # noqa: PLR0911 - see _handle
        sender = msg.sender or ""
        powered = bool(adapter.props["Powered"].value)
        if msg.member == "SetDiscoveryFilter":
            return Message.new_method_return(msg)
        if msg.member == "StartDiscovery":
            if not powered:
                return Message.new_error(msg, "org.bluez.Error.NotReady", "Resource Not Ready")
            if sender in adapter.sessions:
                return Message.new_error(msg, "org.bluez.Error.InProgress", "Operation already in progress")
            adapter.sessions.add(sender)
            if adapter.stalled == "restart":
                adapter.stalled = None
            self._update_discovering(adapter)
            return Message.new_method_return(msg)
        if msg.member == "StopDiscovery":
            if not powered:
                return Message.new_error(msg, "org.bluez.Error.NotReady", "Resource Not Ready")
            if sender not in adapter.sessions:
                return Message.new_error(msg, "org.bluez.Error.Failed", "No discovery started")
            adapter.sessions.discard(sender)
            self._update_discovering(adapter)
            return Message.new_method_return(msg)
        if msg.member == "RemoveDevice":
            self._remove_device_path(str(msg.body[0]))
            return Message.new_method_return(msg)
        return None

    def _monitor_method(self, msg: Message, adapter: _Adapter) -> Message | None:
        key = (msg.sender or "", str(msg.body[0]) if msg.body else "")
        if msg.member == "RegisterMonitor":
            if key in adapter.monitors:
                return Message.new_error(msg, "org.bluez.Error.AlreadyExists", "Already Exists")
            adapter.monitors.add(key)
            if adapter.stalled == "restart":
                adapter.stalled = None
            return Message.new_method_return(msg)
        if msg.member == "UnregisterMonitor":
            if key not in adapter.monitors:
                return Message.new_error(msg, "org.bluez.Error.DoesNotExist", "Does Not Exist")
            adapter.monitors.discard(key)
            return Message.new_method_return(msg)
        return None

    def _client_left(self, name: str) -> None:
        for adapter in self.adapters.values():
            adapter.sessions.discard(name)
            adapter.monitors = {m for m in adapter.monitors if m[0] != name}
            self._update_discovering(adapter)
