"""The real BLE backend (drivers/ble/bleak.py) driving bleak's real BlueZ backend against
a mocked BlueZ on a private D-Bus (hil/peers/bluez.py): devices appear, move and leave;
store beacons with TLM; garbage manufacturer data; the adapter disappears and comes back,
is powered off, refuses to start; the scanner goes quiet and is restarted, the adapter
power-cycled, and a scanner that stays quiet degrades the driver without a crash loop.

Durations are configured small (sub-second) so the whole file runs in well under a minute;
assertions wait for conditions (generous timeouts), never for wall-clock timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from drivers.base import Backoff
from drivers.ble import BleDriver
from drivers.ble.bleak import BleakBackend
from drivers.ble.config import Ble
from edge.clock import SystemClock
from edge.events import Ident, Reading
from hil.peers.bluez import DbusDaemon, DbusDaemonError, MockBluez

DOOR = "0C:F3:EE:00:00:01"
SHELF = "0C:F3:EE:00:00:02"
PHONE_A = "C6:0F:3B:5E:12:A9"
PHONE_B = "5D:21:9C:40:7E:03"
PHONE_C = "7A:44:10:E2:9B:55"
PHONES = (PHONE_A, PHONE_B, PHONE_C)
EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"
IBEACON_DOOR = bytes.fromhex("0215" "E2C56DB5DFFB48D2B060D0F5A71096E0" "0001" "0002" "C5")
UID_SHELF = bytes.fromhex("00" "E7" "EDD1EBEAC04E5DEFA017" "000000000007" "0000")
TLM_SHELF = bytes.fromhex("20" "00" "0BB8" "1780" "000003E8" "00002710")  # 3000 mV, 23.5 C
NEARBY = bytes.fromhex("1005011820A1B2")  # Apple Nearby Info: a phone
IN_PROGRESS = "org.bluez.Error.InProgress"
NOT_READY = "org.bluez.Error.NotReady"
WAIT = 20.0


@pytest.fixture
def dbus(monkeypatch: pytest.MonkeyPatch) -> Iterator[DbusDaemon]:
    """A private dbus-daemon; bleak and the driver find it as the system bus."""
    try:
        daemon = DbusDaemon()
    except DbusDaemonError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {exc}")
        pytest.skip(str(exc))
    with daemon:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", daemon.address)
        yield daemon


@pytest.fixture
async def bluez(dbus: DbusDaemon) -> AsyncIterator[MockBluez]:
    async with MockBluez(dbus.address) as bz:
        yield bz


def config(**over: Any) -> Ble:
    base: dict[str, Any] = {
        "backend": "bleak",
        "scan_mode": "active",
        "presence": {"enter_rssi": -80, "smoothing": 1.0, "exit_after": 0.8, "occupancy_every": 3600},
        "beacons": {"known": [
            {"name": "door", "ibeacon": {"uuid": "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", "major": 1, "minor": 2}},
            {"name": "shelf-7", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000007"}},
        ], "seen_every": 0.3, "telemetry_every": 0, "missing_after": 1.5},
        "watchdog": {"quiet": 1.5, "restarts": 1, "power_cycles": 1, "settle": 0},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Ble.model_validate(base)


@dataclass
class Radio:
    """Advertises every 50 ms for each emitter (address -> list of advertise() kwargs, cycled)."""

    bz: MockBluez
    emitters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _n: int = 0

    async def run(self) -> None:
        while True:
            self._n += 1
            for address, frames in list(self.emitters.items()):
                self.bz.advertise(address, **frames[self._n % len(frames)])
            await asyncio.sleep(0.05)


@dataclass
class Run:
    driver: BleDriver
    readings: list[Reading]
    radio: Radio
    states: list[str] = field(default_factory=list)

    def of(self, type_: str, **data: Any) -> list[Reading]:
        return [r for r in self.readings if r.type == type_ and all(r.data.get(k) == v for k, v in data.items())]

    def ble(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.driver.status()["ble"]
        return stats

    async def until(self, what: str, cond: Callable[[], bool], within: float = WAIT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not cond():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status {self.driver.status()}, "
                                     f"readings {[r.type for r in self.readings][-20:]}")
            await asyncio.sleep(0.02)
            self.states.append(self.driver.state)


@contextlib.asynccontextmanager
async def running(bz: MockBluez, cfg: Ble, *, beacons: bool = True) -> AsyncIterator[Run]:
    driver = BleDriver(cfg, SystemClock(), backoff=Backoff(initial=0.05, max=0.3, jitter=0.0))
    radio = Radio(bz)
    if beacons:
        radio.emitters[DOOR] = [{"rssi": -70, "manufacturer_data": {0x004C: IBEACON_DOOR}}]
    run = Run(driver, [], radio)

    async def pump() -> None:
        async for r in driver.readings():
            run.readings.append(r)

    tasks = [asyncio.create_task(pump(), name="pump"), asyncio.create_task(radio.run(), name="radio")]
    try:
        yield run
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await driver.aclose()


def phone(rssi: int, mfr: bytes = NEARBY) -> list[dict[str, Any]]:
    return [{"rssi": rssi, "manufacturer_data": {0x004C: mfr}}]


# --- devices and beacons ------------------------------------------------------------------------


async def test_phones_appear_move_and_leave_as_presence_sessions(bluez: MockBluez) -> None:
    """A phone near the box enters (its address only as an identifier), moves (RSSI changes)
    and leaves: presence.exit with dwell and RSSI statistics. A distant phone never enters.
    Both addresses are forgotten afterwards."""
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        run.radio.emitters[PHONE_A] = phone(-60)
        run.radio.emitters[PHONE_B] = phone(-95)
        await run.until("phone A enters", lambda: bool(run.of("presence.enter")))
        enter = run.of("presence.enter")[0]
        assert enter.ids == {"device": Ident("ble_address", PHONE_A)}
        assert enter.data == {"rssi": -60}
        run.radio.emitters[PHONE_A] = phone(-75)  # walks away a little: still present
        await asyncio.sleep(0.3)
        del run.radio.emitters[PHONE_A]
        bluez.remove_device(PHONE_A)  # bluetoothd forgets it (InterfacesRemoved)
        await run.until("phone A exits", lambda: bool(run.of("presence.exit")))
        ex = run.of("presence.exit")[0]
        assert ex.ids == {"device": Ident("ble_address", PHONE_A)}
        assert (ex.data["rssi_max"], ex.data["rssi_min"], ex.data["reason"]) == (-60, -75, "gone")
        assert ex.data["dwell_ms"] > 0
        del run.radio.emitters[PHONE_B]
        await run.until("both addresses forgotten", lambda: run.ble()["tracked"] == 0)
        assert [r.ids["device"].raw for r in run.of("presence.enter")] == [PHONE_A]
        assert run.driver.status()["errors"] == 0


async def test_store_beacons_report_seen_telemetry_missing_and_recovery(bluez: MockBluez) -> None:
    """The store's iBeacon and Eddystone beacon (UID + TLM from one address): throttled
    beacon.seen without identifiers, beacon.telemetry from TLM, beacon.missing when the
    Eddystone beacon falls silent, and beacon.seen with recovered=true when it is back."""
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        shelf = [{"rssi": -72, "service_data": {EDDYSTONE: UID_SHELF}},
                 {"rssi": -72, "service_data": {EDDYSTONE: TLM_SHELF}}]
        run.radio.emitters[SHELF] = shelf
        await run.until("telemetry", lambda: bool(run.of("beacon.telemetry")))
        await run.until("a throttled door sighting", lambda: any(
            r.data["samples"] > 1 for r in run.of("beacon.seen", beacon="door")))
        seen = run.of("beacon.seen", beacon="shelf-7")[0]
        assert (seen.data["frame"], seen.data["namespace"], seen.data["instance"], seen.ids) == (
            "eddystone_uid", "edd1ebeac04e5defa017", "000000000007", {})
        door = run.of("beacon.seen", beacon="door")[0]
        assert (door.data["uuid"], door.data["major"], door.data["minor"], door.data["tx_power"]) == (
            "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", 1, 2, -59)
        tlm = run.of("beacon.telemetry")[0].data
        assert (tlm["beacon"], tlm["battery_mv"], tlm["temperature_c"], tlm["adv_count"], tlm["uptime_s"]) == (
            "shelf-7", 3000, 23.5, 1000, 1000.0)
        del run.radio.emitters[SHELF]  # its battery died
        await run.until("shelf missing", lambda: bool(run.of("beacon.missing", beacon="shelf-7")))
        assert not run.of("beacon.missing", beacon="door")
        run.radio.emitters[SHELF] = shelf
        await run.until("shelf back", lambda: bool(run.of("beacon.seen", beacon="shelf-7", recovered=True)))
        assert run.ble()["tracked"] == 0  # beacons never become presence


async def test_garbage_manufacturer_data_is_counted_and_the_driver_keeps_running(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        run.radio.emitters[PHONE_C] = [
            {"rssi": -60, "manufacturer_data": {0x004C: IBEACON_DOOR[:9], 0xFFFF: bytes(range(200))}},
            {"rssi": -60, "service_data": {EDDYSTONE: b"\x77\x00\x01"}},
            {"rssi": -60, "manufacturer_data": {0x0118: b"\xbe\xac\x01"}},
        ]
        await run.until("garbage counted", lambda: {"ibeacon_length", "eddystone_frame", "altbeacon_length"}
                        <= set(run.ble()["malformed_by_reason"]))
        await run.until("the phone still enters", lambda: bool(run.of("presence.enter")))
        assert (run.driver.state, run.driver.status()["errors"]) == ("running", 0)


# --- adapter failures -----------------------------------------------------------------------------


async def test_adapter_removed_and_re_added_is_recovered(bluez: MockBluez) -> None:
    """Unplugging the adapter closes the open sessions (reason stop), the driver shows
    degraded with the cause, and it scans again by itself once the adapter is back."""
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        run.radio.emitters[PHONE_A] = phone(-60)
        await run.until("phone enters", lambda: bool(run.of("presence.enter")))
        bluez.remove_adapter("hci0")
        await run.until("degraded", lambda: run.driver.state == "degraded")
        assert run.driver.degraded_reason in ("adapter_removed", "adapter_missing")
        await run.until("sessions closed", lambda: bool(run.of("presence.exit", reason="stop")))
        before = len(run.readings)
        bluez.add_adapter("hci0")
        await run.until("running again", lambda: run.driver.state == "running" and len(run.readings) > before)
        await run.until("phone enters again", lambda: len(run.of("presence.enter")) == 2)
        assert bluez.is_scanning("hci0")


async def test_adapter_powered_off_from_outside_is_powered_on_again(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
        bluez.set_powered("hci0", False)
        await run.until("degraded", lambda: run.driver.status()["errors"] >= 1)
        await run.until("powered and scanning again",
                        lambda: bluez.is_scanning("hci0") and run.driver.state == "running")
        assert run.driver.degraded_reason is None


async def test_an_adapter_the_driver_may_not_power_on_degrades_with_a_hint(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0", powered=False)
    with structlog.testing.capture_logs() as logs:
        async with running(bluez, config(power_on=False)) as run:
            await run.until("degraded", lambda: run.driver.degraded_reason == "adapter_off")
            assert ("Set", "hci0") not in bluez.calls
            bluez.set_powered("hci0", True)  # the operator powers it on
            await run.until("running", lambda: run.driver.state == "running")
    hints = [e["hint"] for e in logs if e["event"] == "driver_degraded"]
    assert any("power_on" in h for h in hints)


async def test_an_rfkill_blocked_adapter_degrades_until_unblocked(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0")
    bluez.set_rfkill("hci0", True)
    with structlog.testing.capture_logs() as logs:
        async with running(bluez, config()) as run:
            await run.until("degraded", lambda: run.driver.degraded_reason == "adapter_off")
            bluez.set_rfkill("hci0", False)
            await run.until("running", lambda: run.driver.state == "running" and bluez.is_scanning("hci0"))
    assert any("rfkill" in e["hint"] for e in logs if e["event"] == "driver_degraded")


async def test_bluetoothd_restart_is_recovered(bluez: MockBluez, dbus: DbusDaemon) -> None:
    """bluetoothd goes away (its bus name is released) and a new one comes up."""
    bluez.add_adapter("hci0")
    async with running(bluez, config()) as run:
        await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
        await bluez.__aexit__(None, None, None)
        await run.until("degraded", lambda: run.driver.state == "degraded")
        assert run.driver.degraded_reason in ("bluez_lost", "bluez_unavailable", "adapter_missing")
        async with MockBluez(dbus.address) as again:
            again.add_adapter("hci0")
            run.radio.bz = again
            before = len(run.of("beacon.seen"))
            await run.until("running again", lambda: run.driver.state == "running"
                            and len(run.of("beacon.seen")) > before)


# --- BlueZ errors on start ---------------------------------------------------------------------


async def test_in_progress_and_not_ready_on_start_are_retried(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0")
    bluez.fail_next("StartDiscovery", IN_PROGRESS)
    bluez.fail_next("StartDiscovery", NOT_READY)  # queued behind: the second attempt
    async with running(bluez, config()) as run:
        await run.until("running", lambda: run.driver.state == "running" and bool(run.of("beacon.seen")))
        assert run.ble()["start_retries"] == 2
        assert run.driver.status()["errors"] == 0


async def test_persistent_in_progress_power_cycles_once_then_degrades_then_recovers(bluez: MockBluez) -> None:
    """bluetoothd keeps answering InProgress: a few paced retries, one power cycle (which
    ends bluetoothd's stale discovery sessions), more retries, then degraded bluez_busy;
    the facade's retry succeeds once BlueZ accepts again."""
    bluez.add_adapter("hci0")
    bluez.fail_next("StartDiscovery", IN_PROGRESS, times=6)
    async with running(bluez, config()) as run:
        await run.until("bluez_busy", lambda: run.driver.degraded_reason == "bluez_busy")
        assert run.ble()["power_cycles"] == 1
        await run.until("running", lambda: run.driver.state == "running")


async def test_passive_scanning_where_supported_else_active(bluez: MockBluez) -> None:
    bluez.add_adapter("hci0", passive=True)
    async with running(bluez, config(scan_mode="auto")) as run:
        await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
        assert run.ble()["scan_mode"] == "passive"
        assert ("RegisterMonitor", "hci0") in bluez.calls
        assert ("StartDiscovery", "hci0") not in bluez.calls
    bluez.remove_adapter("hci0")
    bluez.add_adapter("hci0", passive=False)  # bluetoothd without --experimental
    with structlog.testing.capture_logs() as logs:
        async with running(bluez, config(scan_mode="auto")) as run:
            await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
            assert run.ble()["scan_mode"] == "active"
    assert [e["fallback"] for e in logs if e["event"] == "ble_passive_unavailable"] == ["active"]
    async with running(bluez, config(scan_mode="passive")) as run:
        await run.until("degraded", lambda: run.driver.degraded_reason == "passive_unsupported")


async def test_an_unexpected_failure_mid_power_cycle_closes_sessions_and_degrades(bluez: MockBluez) -> None:
    """A failure that is neither a D-Bus error nor a timeout (here: BlueZ answers the
    Powered query with a body of the wrong type) during the watchdog's power cycle still
    closes the open sessions (presence.exit reason stop) and degrades the driver with
    reason bluez_error (not backend_bug); it then recovers by itself."""
    bluez.add_adapter("hci0")
    cfg = config(presence={"exit_after": 30}, watchdog={"quiet": 0.4})
    with structlog.testing.capture_logs() as logs:
        async with running(bluez, cfg) as run:
            run.radio.emitters[PHONE_A] = phone(-60)
            await run.until("phone enters", lambda: bool(run.of("presence.enter")))
            bluez.garble_next("Get")
            bluez.stall("hci0", "power_cycle")
            await run.until("sessions closed", lambda: bool(run.of("presence.exit", reason="stop")))
            await run.until("running again", lambda: run.ble()["power_cycles"] >= 1 and run.driver.state == "running"
                            and len(run.of("presence.enter")) == 2)
    degraded = [e["reason"] for e in logs if e["event"] == "driver_degraded"]
    assert set(degraded) == {"bluez_error"}  # at least one, and only this reason
    assert not run.of("presence.exit", reason="gone")


# --- the watchdog ---------------------------------------------------------------------------------


async def test_a_quiet_scanner_is_restarted_then_the_adapter_power_cycled(bluez: MockBluez) -> None:
    """The controller stops reporting while everything looks fine on D-Bus: the watchdog
    restarts the scanner (enough for the first stall), then powers the adapter off and on
    through BlueZ (needed for the second); the driver never reports degraded."""
    bluez.add_adapter("hci0")
    async with running(bluez, config(watchdog={"quiet": 0.5})) as run:
        await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
        bluez.stall("hci0", "restart")
        await run.until("restarted and hearing again", lambda: run.ble()["scanner_restarts"] >= 1
                        and run.ble()["watchdog_level"] == 0)
        assert run.ble()["power_cycles"] == 0
        calls = len(bluez.calls)
        bluez.stall("hci0", "power_cycle")
        await run.until("power cycled and hearing again", lambda: run.ble()["power_cycles"] == 1
                        and run.ble()["watchdog_level"] == 0)
        assert bluez.calls[calls:].count(("Set", "hci0")) == 2  # Powered off, then on
        assert run.driver.status()["errors"] == 0
        assert "degraded" not in run.states


async def test_a_scanner_that_stays_quiet_degrades_without_a_power_cycle_loop(bluez: MockBluez) -> None:
    """After the ladder is exhausted the driver is degraded (scanner_stalled) and stays so
    across the facade's retries (each only restarts the scanner and waits), without more
    power cycles; once advertisements flow it is running again."""
    bluez.add_adapter("hci0")
    async with running(bluez, config(watchdog={"quiet": 0.4})) as run:
        await run.until("a beacon", lambda: bool(run.of("beacon.seen")))
        bluez.stall("hci0", "never")
        await run.until("degraded", lambda: run.driver.degraded_reason == "scanner_stalled")
        cycles, restarts = run.ble()["power_cycles"], run.driver.counters.restarts
        run.states.clear()
        await run.until("three more retries", lambda: run.driver.counters.restarts >= restarts + 3)
        assert run.ble()["power_cycles"] == cycles == 1
        assert set(run.states) == {"degraded"}
        bluez.stall("hci0", None)
        await run.until("running", lambda: run.driver.state == "running")


# --- privacy ----------------------------------------------------------------------------------------


def _spellings(address: str) -> list[str]:
    hexes = address.replace(":", "")
    out = [address, address.replace(":", "_"), address.replace(":", "-"), hexes]
    return out + [s.lower() for s in out]


async def test_no_raw_address_leaves_the_driver_except_as_an_identifier(bluez: MockBluez) -> None:
    """Through appearances, garbage, exits, adapter removal and restarts: logs, DriverError
    messages and hints, status and event data never contain a phone's address in any
    spelling; it appears only as `Ident("ble_address", ...)` in Reading.ids."""
    bluez.add_adapter("hci0")
    with structlog.testing.capture_logs() as logs:
        async with running(bluez, config(watchdog={"quiet": 0.5})) as run:
            run.radio.emitters[PHONE_A] = phone(-60)
            run.radio.emitters[PHONE_C] = [{"rssi": -65, "manufacturer_data": {0x004C: IBEACON_DOOR[:9]}}]
            await run.until("entries", lambda: len(run.of("presence.enter")) == 2)
            bluez.remove_adapter("hci0")
            await run.until("degraded", lambda: run.driver.state == "degraded")
            bluez.add_adapter("hci0")
            await run.until("back", lambda: run.driver.state == "running")
            bluez.stall("hci0", "restart")
            await run.until("restarted", lambda: run.ble()["scanner_restarts"] >= 1)
            status = json.dumps(run.driver.status())
    text = "\n".join([json.dumps(logs, default=repr), status]
                     + [json.dumps(dict(r.data), default=repr) + repr(r) for r in run.readings])
    leaked = [s for a in PHONES for s in _spellings(a) if s in text]
    assert leaked == []
    assert {r.ids["device"].raw for r in run.readings if r.ids} <= set(PHONES)


def test_bleak_and_dbus_fast_debug_logs_are_kept_quiet() -> None:
    """Their DEBUG lines carry D-Bus device paths (the address), names and advertisement
    data: building the backend raises them to INFO even with the root logger at DEBUG,
    and leaves a stricter level alone."""
    names = ("bleak", "dbus_fast")
    saved = {n: logging.getLogger(n).level for n in (*names, "")}
    try:
        logging.getLogger().setLevel(logging.DEBUG)
        logging.getLogger("bleak").setLevel(logging.NOTSET)
        logging.getLogger("dbus_fast").setLevel(logging.ERROR)
        assert logging.getLogger("bleak").getEffectiveLevel() == logging.DEBUG
        BleakBackend(config(), SystemClock())
        assert logging.getLogger("bleak").getEffectiveLevel() >= logging.INFO
        assert logging.getLogger("bleak.backends.bluezdbus.manager").getEffectiveLevel() >= logging.INFO
        assert logging.getLogger("dbus_fast").getEffectiveLevel() == logging.ERROR
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
