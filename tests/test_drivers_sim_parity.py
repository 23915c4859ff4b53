"""The simulated backends run the real backends' code: for the same synthetic device input
(advertisement bytes, NDEF bytes, serial bytes) the sim backend and the real backend (bleak
against a mocked BlueZ on a private D-Bus, nfcpy reading an emulated tag over its udp transport,
pyserial on a pty) produce the same events, identifiers pseudonymized alike; and no event
type or data key a simulation produces is one the real backends cannot produce (the
shapes below are written out from the drivers' documented events, independently of the code).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.ble.adverts import Advert
from drivers.ble.bleak import BleakBackend
from drivers.ble.config import Ble
from drivers.ble.sim import BleSim
from drivers.ble.simstore import RandomStore
from drivers.nfc import NfcDriver
from drivers.nfc.config import Nfc
from drivers.nfc.sim import DAMAGED_NDEF, NfcSim, loyalty_message, shelf_message
from drivers.nfc.tap import TagRead
from drivers.pos.config import PosLink
from drivers.pos.serial import PosSerial
from drivers.pos.sim import PosSim
from edge.clock import FakeClock, SystemClock
from edge.events import Reading
from edge.privacy.pseudonym import stable_pseudonym
from hil.peers.bluez import DbusDaemon, DbusDaemonError, MockBluez
from hil.peers.nfctag import EmulatedTag, TagImage, free_udp_port, ndef_area
from hil.peers.pos import PosPeer

# event type -> (data keys always present, data keys that may be present), per real backend
BLE_SHAPES: dict[str, tuple[set[str], set[str]]] = {
    "presence.enter": ({"rssi"}, {"zone"}),
    "presence.exit": ({"dwell_ms", "rssi_min", "rssi_mean", "rssi_max", "rssi_last", "weak_ms", "reason"},
                      {"zone", "zone_last"}),
    "presence.occupancy": ({"count", "peak", "interval_ms"}, {"zone"}),
    "beacon.seen": ({"beacon", "frame", "rssi", "rssi_mean", "samples", "tx_power"},
                    {"uuid", "major", "minor", "namespace", "instance", "recovered"}),
    "beacon.telemetry": ({"beacon", "battery_mv", "temperature_c", "adv_count", "uptime_s"}, set()),
    "beacon.missing": ({"beacon", "last_seen_ts", "silent_ms"}, set()),
}
BLE_IDS = {"presence.enter": {"device"}, "presence.exit": {"device"}}
NFC_SHAPES: dict[str, tuple[set[str], set[str]]] = {
    "nfc.tap": ({"kind", "tag_type", "ndef", "records"}, {"rule", "gtin", "batch", "serial", "gs1", "tag"}),
}
POS_SHAPES: dict[str, tuple[set[str], set[str]]] = {
    "pos.receipt_text": ({"register"}, set()),
    "pos.receipt": ({"register", "receipt_id", "total_cents", "currency", "items", "payment"}, set()),
}
BEACONS = {"known": [
    {"name": "door", "ibeacon": {"uuid": "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", "major": 1, "minor": 2}},
    {"name": "shelf-7", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000007"}},
]}


class FakeSleep:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await asyncio.sleep(0)


def conforms(r: Reading, shapes: dict[str, tuple[set[str], set[str]]]) -> str | None:
    """None when the reading has a shape a real backend produces, else what is wrong."""
    if r.type not in shapes:
        return f"type {r.type} is produced by no real backend"
    required, optional = shapes[r.type]
    keys = set(r.data)
    if not required <= keys:
        return f"{r.type} lacks {sorted(required - keys)}"
    if keys - required - optional:
        return f"{r.type} has sim-only keys {sorted(keys - required - optional)}"
    return None


# -- no sim-only event types or keys ------------------------------------------------------


async def test_every_ble_sim_event_is_one_the_bleak_backend_produces() -> None:
    clock = FakeClock()
    cfg = Ble.model_validate({"sim": {"rate": 5, "seed": 3}, "beacons": BEACONS,
                              "presence": {"zones": [{"name": "till", "min_rssi": -60},
                                                     {"name": "floor", "min_rssi": -85}]}})
    got = [r async for r in BleSim(cfg, clock, limit=3000, sleep=FakeSleep(clock)).readings()]
    assert [p for r in got if (p := conforms(r, BLE_SHAPES))] == []
    assert all(set(r.ids) == BLE_IDS.get(r.type, set()) for r in got)
    assert {r.type for r in got} >= {"presence.enter", "presence.exit", "presence.occupancy", "beacon.seen",
                                     "beacon.telemetry"}


async def test_every_nfc_sim_event_is_one_the_nfcpy_backend_produces() -> None:
    clock = FakeClock()
    cfg = Nfc.model_validate({"sim": {"rate": 0.5, "seed": 4}, "store_tags": {"04A1B2C3D4E5F6": "shelf-a1"},
                              "rules": [{"name": "gs1", "kind": "product", "gs1_digital_link": True},
                                        {"name": "club", "kind": "loyalty", "mime_type": "application/x-club"}]})
    got = [r async for r in NfcSim(cfg, clock, limit=800, sleep=FakeSleep(clock)).readings()]
    assert [p for r in got if (p := conforms(r, NFC_SHAPES))] == []
    assert all(set(r.ids) <= {"card", "loyalty"} for r in got)
    assert {r.data["kind"] for r in got} == {"product", "loyalty", "unknown"}
    assert {r.data["ndef"] for r in got} >= {"ok", "none", "unreadable", "invalid"}


@pytest.mark.parametrize("framing", ["lines", "stx_etx", "escpos", "jsonl"])
async def test_every_pos_sim_event_is_one_the_serial_backend_produces(framing: str) -> None:
    clock = FakeClock()
    link = PosLink(name="till-1", framing=framing, ack=framing == "stx_etx")  # type: ignore[arg-type]
    sim = PosSim(link, clock, limit=60, sleep=FakeSleep(clock))
    got = [r async for r in sim.readings()]
    assert len(got) == 60
    assert [p for r in got if (p := conforms(r, POS_SHAPES))] == []
    assert all(set(r.text) == {"receipt"} and "\nTOTAL EUR" in r.text["receipt"] for r in got)
    assert sim.status()["problems"] == {}


# -- the same input through both paths -------------------------------------------------------


@pytest.fixture
def dbus(monkeypatch: pytest.MonkeyPatch) -> Iterator[DbusDaemon]:
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


async def recorded(cfg: Ble, n: int) -> list[Advert]:
    clock = FakeClock()
    out: list[Advert] = []
    async for a in RandomStore(cfg, clock, sleep=FakeSleep(clock)):
        out.append(a)
        if len(out) == n:
            return out
    raise AssertionError("the store ended")


async def test_the_same_advertisements_make_the_same_events_in_the_sim_and_through_bleak(
    bluez: MockBluez,
) -> None:
    """Advertisements from the random store, heard by bleak from a mocked BlueZ and fed
    to the sim backend as its source: the same phones enter, in the same order, with the
    same smoothed RSSI, and the store's beacons are seen with the same fields."""
    cfg = Ble.model_validate({"backend": "bleak", "scan_mode": "active", "sim": {"rate": 50, "seed": 9},
                              "beacons": {**BEACONS, "seen_every": 3600}, "watchdog": {"enabled": False}})
    adverts = await recorded(cfg, 150)

    async def source() -> AsyncIterator[Advert]:
        for a in adverts:
            yield a

    sim_clock = FakeClock()
    sim = [r async for r in BleSim(cfg, sim_clock, source=source()).readings()]

    bluez.add_adapter("hci0")
    backend = BleakBackend(cfg, SystemClock())
    real: list[Reading] = []

    async def pump() -> None:
        async for r in backend.readings():
            real.append(r)

    task = asyncio.create_task(pump())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not bluez.is_scanning("hci0"):
            assert loop.time() < deadline, "bleak never started scanning"
            await asyncio.sleep(0.02)
        for a in adverts:
            bluez.advertise(a.address, rssi=a.rssi, manufacturer_data=dict(a.manufacturer_data),
                            service_data=dict(a.service_data))
            await asyncio.sleep(0.003)
        want = [r for r in sim if r.type == "presence.enter"]
        while len([r for r in real if r.type == "presence.enter"]) < len(want):
            assert loop.time() < deadline + 20, "bleak did not see every phone enter"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()

    def enters(rs: list[Reading]) -> list[tuple[str, dict[str, Any]]]:
        return [(r.ids["device"].raw, dict(r.data)) for r in rs if r.type == "presence.enter"]

    def seen(rs: list[Reading]) -> dict[str, dict[str, Any]]:
        keep = ("beacon", "frame", "uuid", "major", "minor", "namespace", "instance", "tx_power")
        return {r.data["beacon"]: {k: r.data[k] for k in keep if k in r.data} for r in rs if r.type == "beacon.seen"}

    assert len(enters(sim)) > 10
    assert enters(real) == enters(sim)
    assert seen(real) == seen(sim) != {}
    assert [p for r in real if (p := conforms(r, BLE_SHAPES))] == []


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[PosPeer]:
    with PosPeer(tmp_path / "serial" / "by-id") as p:
        yield p


@pytest.mark.parametrize("framing", ["lines", "stx_etx", "escpos", "jsonl"])
async def test_the_same_serial_bytes_make_the_same_readings_in_the_sim_and_through_pyserial(
    peer: PosPeer, framing: str
) -> None:
    """A sim's receipts as bytes on a pty, read by the serial backend, equal the readings
    the sim made of the same bytes (type, data, text)."""
    link = PosLink(name="till-1", framing=framing, sim={"seed": 21})  # type: ignore[arg-type]

    async def no_sleep(_: float) -> None:  # the clock stands still: every receipt printed at one time
        await asyncio.sleep(0)

    clock = FakeClock()
    sim = [r async for r in PosSim(link, clock, limit=5, sleep=no_sleep).readings()]
    maker = PosSim(link, FakeClock(), limit=5)
    wire = b"".join(maker.wire(clock.wall_ms()) for _ in range(5))
    serial_link = PosLink(name="till-1", backend="serial", port=str(peer.path), framing=framing,  # type: ignore[arg-type]
                          receipt_gap=0)
    backend = PosSerial(serial_link, FakeClock())
    real: list[Reading] = []

    async def pump() -> None:
        async for r in backend.readings():
            real.append(r)

    task = asyncio.create_task(pump())
    try:
        await asyncio.sleep(0.1)
        await peer.send(wire, chunk=97)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(real) < 5:
            assert loop.time() < deadline, f"only {len(real)} receipts came through pyserial"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()

    def shape(rs: list[Reading]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
        return [(r.type, dict(r.data), dict(r.text)) for r in rs]

    assert shape(real) == shape(sim)


async def test_the_same_ndef_bytes_make_the_same_taps_in_the_sim_and_through_nfcpy() -> None:
    """NDEF messages as the sim writes them (loyalty cards with the number in a URI, in a
    Text record and in a MIME record; GS1 shelf tags plain, as a Smart Poster with a lot, and one
    configured as a store tag; a blank sticker; the sim's damaged tag) on an emulated Type 3 tag
    read by nfcpy, and fed to the sim backend as its source with the same UIDs: the same taps
    (kind, rule, records, GTIN, lot, ndef state), and the same identifiers, which pseudonymize to
    the same values under one tenant key."""
    rules = [{"name": "gs1", "kind": "product", "gs1_digital_link": True},
             {"name": "club", "kind": "loyalty", "uri_prefix": "https://club.acme-retail.example/card/"},
             {"name": "member", "kind": "loyalty", "number_prefix": "40", "number_length": [10, 10]},
             {"name": "app", "kind": "loyalty", "mime_type": "application/x-club"}]  # fmt: skip
    port = free_udp_port()
    cfg = Nfc.model_validate({"backend": "nfcpy", "device": f"udp:127.0.0.1:{port}", "targets": ["212F"],
                              "poll_interval": 0.05, "debounce": 0.3, "rules": rules,
                              "store_tags": {"03FE000000000016": "shelf-b2"}, "sim": {"seed": 5}})  # fmt: skip
    club, member, app = cfg.rules[1:]
    messages = [
        loyalty_message("987654321098", club),
        loyalty_message("4012345678", member),
        loyalty_message("12345678", app),
        shelf_message("09506000134352"),
        shelf_message("09506000134352", lot="L00042", title="Oat Drink 1 L"),
        shelf_message("04012345000016"),
        b"",
        DAMAGED_NDEF,
    ]
    uids = [bytes.fromhex(f"03FE0000000000{i:02X}") for i in range(0x11, 0x11 + len(messages))]
    clock = FakeClock()
    sim_tags = [TagRead("Type3Tag", uid, m) for uid, m in zip(uids, messages, strict=True)]
    sim = [r async for r in NfcSim(cfg, clock, sleep=FakeSleep(clock), tags=sim_tags).readings()]

    driver = NfcDriver(cfg, SystemClock())
    real: list[Reading] = []

    async def pump() -> None:
        async for r in driver.readings():
            real.append(r)

    task = asyncio.create_task(pump())
    tag = EmulatedTag(TagImage(uids[0], ndef_area(messages[0])), port)
    try:
        loop = asyncio.get_running_loop()
        for n, (uid, message) in enumerate(zip(uids, messages, strict=True), 1):
            await asyncio.to_thread(tag.place, TagImage(uid, ndef_area(message)))
            deadline = loop.time() + 60
            while len(real) < n:
                assert loop.time() < deadline, f"nfcpy did not read tag {n}"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(tag.lift)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await driver.aclose()

    key = bytes(range(32))

    def taps(rs: list[Reading]) -> list[tuple[str, str, dict[str, Any], dict[str, str | None]]]:
        return [(r.src, r.type, dict(r.data), {k: stable_pseudonym(v, "t1", key) for k, v in r.ids.items()})
                for r in rs]  # fmt: skip

    assert taps(real) == taps(sim)
    assert [(r.data["kind"], r.data.get("rule"), r.data["ndef"]) for r in sim] == [
        ("loyalty", "club", "ok"), ("loyalty", "member", "ok"), ("loyalty", "app", "ok"), ("product", "gs1", "ok"),
        ("product", "gs1", "ok"), ("product", "gs1", "ok"), ("unknown", None, "empty"),
        ("unknown", None, "invalid")]  # fmt: skip
    assert sim[4].data["batch"] == "L00042"
    assert sim[5].data["tag"] == "shelf-b2"
    assert "card" not in sim[5].ids
    assert {k: v.cls for k, v in sim[0].ids.items()} == {"card": "nfc_uid", "loyalty": "loyalty_id"}
    assert [p for r in real if (p := conforms(r, NFC_SHAPES))] == []
