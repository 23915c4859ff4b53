"""The BLE driver's own D-Bus link to BlueZ, for what bleak does not do: watch the adapter
object (removed, added, powered on/off, bluetoothd gone) and power it off and on.

It uses the system bus like bleak (`DBUS_SYSTEM_BUS_ADDRESS` overrides it, as the tests
do) and dbus-fast, which bleak already depends on. Events are handed to `on_event(kind,
value)` on the event loop: ("removed", False), ("added", True), ("powered", bool),
("bluez_lost", False), ("bus_lost", False).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
_OM = "org.freedesktop.DBus.ObjectManager"
_PROPS = "org.freedesktop.DBus.Properties"
_DBUS = "org.freedesktop.DBus"

OnEvent = Callable[[str, bool], None]


class BluezCallError(Exception):
    """A BlueZ call failed; `name` is the D-Bus error name (never the text: it may quote a device)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class BluezAdapter:
    def __init__(self, adapter: str, on_event: OnEvent, *, call_timeout: float = 10.0) -> None:
        self.adapter = adapter
        self.path = f"/org/bluez/{adapter}"
        self._on_event = on_event
        self._timeout = call_timeout
        self._bus: MessageBus | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def connect(self) -> None:
        """Connect and subscribe; raises OSError (no bus) or BluezCallError."""
        bus = MessageBus(bus_type=BusType.SYSTEM)
        try:
            async with asyncio.timeout(self._timeout):
                await bus.connect()
            bus.add_message_handler(self._handle)
            for rule in (
                f"type='signal',interface='{_OM}',member='InterfacesAdded',arg0path='{self.path}'",
                f"type='signal',interface='{_OM}',member='InterfacesRemoved',arg0path='{self.path}'",
                f"type='signal',interface='{_PROPS}',member='PropertiesChanged',path='{self.path}'",
                f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',arg0='{BLUEZ}'",
            ):
                await self._call(bus, Message(destination=_DBUS, path="/org/freedesktop/DBus", interface=_DBUS,
                                              member="AddMatch", signature="s", body=[rule]))
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        self._watch = asyncio.create_task(self._watch_bus(bus), name=f"ble-{self.adapter}-dbus")

    async def _watch_bus(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast leaves it unannotated
        if self._bus is bus:  # not our own close()
            self._on_event("bus_lost", False)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        watch, self._watch = self._watch, None
        if bus is not None:
            bus.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # see above
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)  # a cancel of close() itself still propagates

    async def _call(self, bus: MessageBus, msg: Message) -> Message:
        async with asyncio.timeout(self._timeout):
            reply = await bus.call(msg)
        if reply is None:
            raise BluezCallError("org.freedesktop.DBus.Error.NoReply")
        if reply.message_type == MessageType.ERROR:
            raise BluezCallError(reply.error_name or "org.freedesktop.DBus.Error.Failed")
        return reply

    def _require(self) -> MessageBus:
        if self._bus is None or not self._bus.connected:
            raise BluezCallError("org.freedesktop.DBus.Error.Disconnected")
        return self._bus

    async def state(self) -> dict[str, Any] | None:
        """The adapter's Adapter1 properties (plain values), or None when there is no such adapter."""
        bus = self._require()
        reply = await self._call(bus, Message(destination=BLUEZ, path="/", interface=_OM, member="GetManagedObjects"))
        interfaces = reply.body[0].get(self.path)
        if not interfaces or ADAPTER_IFACE not in interfaces:
            return None
        return {k: v.value for k, v in interfaces[ADAPTER_IFACE].items()}

    async def powered(self) -> bool:
        bus = self._require()
        reply = await self._call(bus, Message(destination=BLUEZ, path=self.path, interface=_PROPS, member="Get",
                                              signature="ss", body=[ADAPTER_IFACE, "Powered"]))
        return bool(reply.body[0].value)

    async def set_powered(self, on: bool) -> None:
        bus = self._require()
        await self._call(bus, Message(destination=BLUEZ, path=self.path, interface=_PROPS, member="Set",
                                      signature="ssv", body=[ADAPTER_IFACE, "Powered", Variant("b", on)]))

    async def power(self, on: bool, wait_s: float) -> bool:
        """Set Powered and wait (polling) until the adapter reports it; False on timeout."""
        await self.set_powered(on)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if await self.powered() == on:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    def _handle(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or not msg.body:
            return
        member = msg.member
        if member == "InterfacesRemoved" and msg.body[0] == self.path and ADAPTER_IFACE in msg.body[1]:
            self._on_event("removed", False)
        elif member == "InterfacesAdded" and msg.body[0] == self.path and ADAPTER_IFACE in msg.body[1]:
            self._on_event("added", True)
        elif member == "PropertiesChanged" and msg.path == self.path and msg.body[0] == ADAPTER_IFACE:
            powered = msg.body[1].get("Powered")
            if powered is not None:
                self._on_event("powered", bool(powered.value))
        elif member == "NameOwnerChanged" and msg.body[0] == BLUEZ and not msg.body[2]:
            self._on_event("bluez_lost", False)
