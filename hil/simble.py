"""The BLE kind's simulated peer: a mock BlueZ on a private D-Bus (hil.peers.bluez)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from typing import Any

from hil.peer import APPLIED, Ledger, Outcome, PeerMode
from hil.scenario import Beacon, BleBack, BleQuiet, Kind, PhoneAppear, PhoneLeave, PhoneMove, Scenario, Step, Traffic
from hil.simpeers import TrafficPlayer

BEACON_UUID = "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0"
EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"
RADIO_EVERY = 0.5  # every present phone advertises this often
ENTER_RSSI = -76  # a few dB above the driver's enter_rssi (-80): the radio adds +/- 2 dB
BG_BEACONS = ("bg-aisle", "bg-till", "bg-door")


def _beacon_key(label: str) -> int:
    return sum(label.encode()) * 131 % 65000 + 1


class BluezBlePeer:
    """A mock BlueZ on a private D-Bus (hil.peers.bluez); the daemon's `bleak` backend.

    Phones are random static addresses advertising every `RADIO_EVERY` s while present (a
    radio task), at the RSSI the scenario gives them; `phone.leave` stops them. Beacons are
    the store's (configured in the daemon by name): each `beacon` step sends the beacon's
    iBeacon (or Eddystone-UID) frame and an Eddystone-TLM frame with its battery. `ble.quiet`
    stalls the controller (D-Bus looks fine, no advertisement arrives), `ble.back` ends it.
    Counts over a radio are lower bounds (a power cut re-enters present phones): the ledger
    is not exact, its counts are minimums.
    """

    kind: Kind = "ble"
    mode: PeerMode = "peer"

    def __init__(self, scenario: Scenario) -> None:
        self.description = "mock BlueZ on a private D-Bus (hil.peers.bluez); backend bleak"
        self._sc = scenario
        self._bus: Any = None
        self._bluez: Any = None
        self._phones: dict[str, tuple[str, int]] = {}  # label -> (address, rssi)
        self._beacon_addr: dict[str, str] = {}
        self._ledger = Ledger(exact=False)
        self._rng = random.Random(0xB1E)
        self._traffic = TrafficPlayer(scenario, 0xB1F)
        self._radio: asyncio.Task[None] | None = None
        self._stalled = False
        self._unheard: set[str] = set()
        labels: dict[str, str] = {st.beacon: st.frame for st in scenario.of_kind("ble") if isinstance(st, Beacon)}
        if any(isinstance(st, Traffic) for st in scenario.of_kind("ble")):
            labels.update(dict.fromkeys(BG_BEACONS, "ibeacon"))
        self._beacons: dict[str, str] = labels

    def unavailable(self) -> str | None:
        from hil.peers.bluez import find_dbus_daemon

        return None if find_dbus_daemon() is not None else "dbus-daemon not installed (apt-get install dbus)"

    def driver_config(self) -> Any:
        known = []
        for label, frame in sorted(self._beacons.items()):
            k = _beacon_key(label)
            if frame == "ibeacon":
                known.append({"name": label, "ibeacon": {"uuid": BEACON_UUID, "major": 100, "minor": k}})
            else:
                known.append({"name": label, "eddystone": {"namespace": "edd1e5ca1ab1e0000001",
                                                           "instance": f"{k:012x}"}})  # fmt: skip
        return {"enabled": True, "backend": "bleak", "adapter": "hci0",
                "presence": {"exit_after": "3s", "occupancy_every": "10s"},
                "beacons": {"known": known, "seen_every": "1s", "telemetry_every": 0, "missing_after": "60s"},
                "watchdog": {"quiet": "2s", "restarts": 1, "power_cycles": 1, "settle": "200ms"}}  # fmt: skip

    def daemon_env(self) -> Mapping[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self._bus.address} if self._bus is not None else {}

    async def start(self) -> None:
        from hil.peers.bluez import DbusDaemon, MockBluez

        self._bus = DbusDaemon()
        self._bus.start()
        self._bluez = MockBluez(self._bus.address)
        await self._bluez.__aenter__()
        self._bluez.add_adapter("hci0")
        self._radio = asyncio.create_task(self._air(), name="hil:ble-radio")

    async def _air(self) -> None:
        while True:
            for label, (address, rssi) in list(self._phones.items()):
                heard = self._bluez.advertise(address, rssi=rssi + self._rng.randint(-2, 2),
                                              manufacturer_data={0x0075: b"\x42\x04\x01"})  # fmt: skip
                if heard and label in self._unheard:  # the scanner heard it: the daemon must see it enter
                    self._unheard.discard(label)
                    if rssi >= ENTER_RSSI:
                        self._ledger.emit("presence.enter")
            await asyncio.sleep(RADIO_EVERY)

    async def apply(self, step: Step) -> Outcome:  # noqa: PLR0911 - one branch per kind of step
        b = self._bluez
        if isinstance(step, Traffic):
            self._traffic.start(step, self._make, self.apply)
            return Outcome("applied", f"{step.rate:g} radio events/s (phones coming and going, beacons)")
        if isinstance(step, PhoneAppear):
            top = 0xC0 | self._rng.randrange(64)  # random static address: top bits 0b11
            address = ":".join(f"{x:02X}" for x in bytes([top]) + self._rng.randbytes(5))
            self._phones[step.phone] = (address, step.rssi)
            self._unheard.add(step.phone)
            self._ledger.identifiers.append(("ble_address", address))
            return APPLIED
        if isinstance(step, PhoneMove):
            if step.phone not in self._phones:
                return Outcome("unsupported", f"no phone {step.phone} present")
            self._phones[step.phone] = (self._phones[step.phone][0], step.rssi)
            return APPLIED
        if isinstance(step, PhoneLeave):
            self._unheard.discard(step.phone)
            gone = self._phones.pop(step.phone, None)
            if gone is None:
                return Outcome("unsupported", f"no phone {step.phone} present")
            return APPLIED
        if isinstance(step, Beacon):
            self._beacon(step)
            return APPLIED
        if isinstance(step, BleQuiet | BleBack):
            self._stalled = isinstance(step, BleQuiet)
            b.stall("hci0", "never" if self._stalled else None)
            return APPLIED
        return Outcome("unsupported", f"{step.do} has no BLE meaning")

    def _beacon(self, step: Beacon) -> None:
        label = step.beacon
        address = self._beacon_addr.setdefault(label, "D0:" + ":".join(f"{x:02X}" for x in self._rng.randbytes(5)))
        k = _beacon_key(label)
        if self._beacons.get(label, step.frame) == "ibeacon":
            payload = bytes.fromhex("0215" + BEACON_UUID.replace("-", "")) + (100).to_bytes(2, "big") + k.to_bytes(
                2, "big") + b"\xc5"
            self._bluez.advertise(address, rssi=-65, manufacturer_data={0x004C: payload})
        else:
            uid = b"\x00\xee" + bytes.fromhex("edd1e5ca1ab1e0000001") + k.to_bytes(6, "big") + b"\x00\x00"
            self._bluez.advertise(address, rssi=-65, service_data={EDDYSTONE: uid})
        mv = 2000 + 12 * step.battery_pct
        tlm = b"\x20\x00" + mv.to_bytes(2, "big") + b"\x16\x00" + (1000).to_bytes(4, "big") + (600).to_bytes(4, "big")
        self._bluez.advertise(address, rssi=-65, service_data={EDDYSTONE: tlm})
        if not self._stalled:
            self._ledger.emit("beacon.telemetry")

    def _make(self, rng: random.Random) -> Step:
        r = rng.random()
        bg = [p for p in self._phones if p.startswith("bg")]
        if r < 0.3 and len(bg) < 15:
            return PhoneAppear(at=0, do="phone.appear", phone=f"bg{rng.randrange(10**6)}", rssi=rng.randint(-74, -50))
        if r < 0.5 and bg:
            return PhoneLeave(at=0, do="phone.leave", phone=rng.choice(bg))
        if r < 0.8 and bg:
            return PhoneMove(at=0, do="phone.move", phone=rng.choice(bg), rssi=rng.randint(-74, -50))
        return Beacon(at=0, do="beacon", beacon=rng.choice(BG_BEACONS), battery_pct=rng.randint(20, 100))

    async def quiesce(self) -> None:
        await self._traffic.stop()

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        return self._ledger

    async def stop(self) -> None:
        await self._traffic.stop()
        if self._radio is not None:
            self._radio.cancel()
            await asyncio.gather(self._radio, return_exceptions=True)
            self._radio = None
        if self._bluez is not None:
            with contextlib.suppress(Exception):
                await self._bluez.__aexit__(None, None, None)
            self._bluez = None
        if self._bus is not None:
            self._bus.stop()
            self._bus = None


