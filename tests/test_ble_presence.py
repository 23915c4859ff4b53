"""Presence sessions, store beacons, routing and the watchdog ladder: the BLE driver's
processing path, driven with explicit times (no sleeping, no radio)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers.ble.config import Ble, Presence, Watchdog
from drivers.ble.presence import PresenceEngine
from drivers.ble.processor import BleProcessor
from drivers.ble.watchdog import ScanWatchdog
from edge.clock import FakeClock
from edge.config import Privacy
from edge.events import Ident, Reading
from edge.pipeline import NormalizeStage
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import CardScrubStage, PrivacyStage

T0 = 1000.0
WALL0 = 1_767_225_600_000
PHONE = "C6:0F:3B:5E:12:A9"
PHONE2 = "5A:11:22:33:44:55"
EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"
UUID = "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0"
IBEACON_1_2 = bytes.fromhex("0215" "E2C56DB5DFFB48D2B060D0F5A71096E0" "0001" "0002" "C5")
FOREIGN_IBEACON = bytes.fromhex("0215" "F7826DA64FA24E988024BC5B71E0893E" "0009" "0007" "BF")
UID = bytes.fromhex("00" "E7" "EDD1EBEAC04E5DEFA017" "000000000001")
TLM = bytes.fromhex("20" "00" "0BB8" "1780" "000003E8" "00002710")


def wall(t: float) -> int:
    return WALL0 + round((t - T0) * 1000)


def engine(**kw: Any) -> PresenceEngine:
    return PresenceEngine(Presence(**{"enter_rssi": -70, "hysteresis": 6, "smoothing": 1.0,
                                      "exit_after": 10, "occupancy_every": 60, **kw}), T0)


def test_a_device_enters_once_its_smoothed_rssi_reaches_the_threshold() -> None:
    e = engine(smoothing=0.5)
    assert e.observe(PHONE, -80, T0, wall(T0)) is None  # ema -80
    r = e.observe(PHONE, -60, T0 + 1, wall(T0 + 1))  # ema -70: enters
    assert r is not None
    assert (r.src, r.type, r.ts, dict(r.data)) == ("ble", "presence.enter", wall(T0 + 1), {"rssi": -70})
    assert r.ids == {"device": Ident("ble_address", PHONE)}
    assert e.observe(PHONE, -60, T0 + 2, wall(T0 + 2)) is None  # already present: no second enter
    assert (e.tracked, e.present) == (1, 1)


def test_hysteresis_keeps_a_wavering_device_and_exit_follows_silence() -> None:
    """Enter at -70, stay down to -76; exit `exit_after` after the last near sample, with
    dwell, RSSI min/mean/max over the visit and ts = when it was last near."""
    e = engine()
    e.observe(PHONE, -65, T0, wall(T0))
    for i, rssi in enumerate([-72, -75, -68, -74], start=1):  # below enter, above leave
        e.observe(PHONE, rssi, T0 + i, wall(T0 + i))
    assert e.tick(T0 + 13.9, wall(T0 + 13.9)) == []  # last near at T0+4: 9.9 s ago
    out = e.tick(T0 + 14, wall(T0 + 14))
    assert [r.type for r in out] == ["presence.exit"]
    assert dict(out[0].data) == {"dwell_ms": 4000, "rssi_min": -75, "rssi_mean": -71, "rssi_max": -65,
                                 "rssi_last": -74, "weak_ms": 0, "reason": "gone"}
    assert out[0].ts == wall(T0 + 4)
    assert out[0].ids == {"device": Ident("ble_address", PHONE)}
    assert (e.tracked, e.present) == (0, 0)  # the address is forgotten


def test_a_device_heard_only_weakly_exits_like_a_silent_one() -> None:
    e = engine()
    e.observe(PHONE, -60, T0, wall(T0))
    for i in range(1, 12):  # still heard every second, but below the leave threshold (-76)
        e.observe(PHONE, -85, T0 + i, wall(T0 + i))
    out = e.tick(T0 + 11, wall(T0 + 11))
    assert [r.type for r in out] == ["presence.exit"]
    assert out[0].data["dwell_ms"] == 0
    assert (out[0].data["weak_ms"], out[0].data["rssi_last"]) == (11000, -85)  # faded: no rotation


def test_zone_events_name_each_zone_change_of_a_present_device_only_when_asked() -> None:
    """With zone_events a present device moving between RSSI bands yields presence.zone
    {zone, from} with its address as an identifier; without, nothing is emitted."""
    zones = [{"name": "till", "min_rssi": -60}, {"name": "floor", "min_rssi": -75}]
    for flag in (True, False):
        e = engine(zones=zones, zone_events=flag)
        assert e.observe(PHONE, -70, T0, wall(T0)) is not None  # enters on the floor
        r = e.observe(PHONE, -55, T0 + 1, wall(T0 + 1))
        if flag:
            assert r is not None
            assert (r.type, dict(r.data), r.ts) == ("presence.zone", {"zone": "till", "from": "floor"}, wall(T0 + 1))
            assert r.ids == {"device": Ident("ble_address", PHONE)}
        else:
            assert r is None
        out = e.tick(T0 + 11, wall(T0 + 11))
        assert (out[0].data["zone"], out[0].data["zone_last"]) == ("floor", "till")


def test_devices_that_never_enter_are_forgotten_after_the_silence() -> None:
    e = engine()
    e.observe(PHONE, -95, T0, wall(T0))
    assert e.tracked == 1
    assert e.tick(T0 + 9, wall(T0 + 9)) == []
    assert e.tracked == 1
    assert e.tick(T0 + 10, wall(T0 + 10)) == []  # no event for a device that never entered
    assert e.tracked == 0


def test_address_rotation_is_a_new_device_never_linked_to_the_old_one() -> None:
    """A phone that rotates its private address mid-visit: the old address exits after the
    silence, the new one enters on its own; nothing ties the two together."""
    e = engine()
    enter1 = e.observe(PHONE, -60, T0, wall(T0))
    enter2 = e.observe(PHONE2, -60, T0 + 5, wall(T0 + 5))  # same phone, new address
    assert enter1 is not None
    assert enter2 is not None
    assert enter1.ids["device"] != enter2.ids["device"]
    e.observe(PHONE2, -60, T0 + 10, wall(T0 + 10))
    out = e.tick(T0 + 10, wall(T0 + 10))
    assert [(r.type, r.ids["device"].raw) for r in out] == [("presence.exit", PHONE)]
    assert e.present == 1


def test_zones_are_rssi_bands_with_hysteresis_and_exit_names_the_longest_zone() -> None:
    e = engine(enter_rssi=-80, zones=[{"name": "floor", "min_rssi": -80}, {"name": "till", "min_rssi": -60}])
    r = e.observe(PHONE, -55, T0, wall(T0))
    assert r is not None
    assert r.data == {"rssi": -55, "zone": "till"}
    e.observe(PHONE, -64, T0 + 1, wall(T0 + 1))  # within the hysteresis of till (-66): stays
    e.observe(PHONE, -70, T0 + 2, wall(T0 + 2))  # floor
    e.observe(PHONE, -70, T0 + 9, wall(T0 + 9))
    out = e.tick(T0 + 19, wall(T0 + 19))
    assert [(x.type, x.data["zone"]) for x in out] == [("presence.exit", "floor")]  # 7 s floor vs 2 s till


def test_occupancy_per_zone_and_interval_with_count_and_peak() -> None:
    e = engine(enter_rssi=-80, occupancy_every=60,
               zones=[{"name": "till", "min_rssi": -60}, {"name": "floor", "min_rssi": -80}])
    e.observe(PHONE, -50, T0, wall(T0))
    e.observe(PHONE2, -75, T0 + 1, wall(T0 + 1))
    e.observe("11:22:33:44:55:66", -75, T0 + 2, wall(T0 + 2))
    e.tick(T0 + 12, wall(T0 + 12))  # the two floor devices and the till one exit (silent 10 s)
    e.observe(PHONE2, -75, T0 + 55, wall(T0 + 55))  # back (an enter again)
    out = e.tick(T0 + 60, wall(T0 + 60))
    occupancy = [dict(r.data) for r in out if r.type == "presence.occupancy"]
    assert occupancy == [
        {"zone": "till", "count": 0, "peak": 1, "interval_ms": 60000},
        {"zone": "floor", "count": 1, "peak": 2, "interval_ms": 60000},
    ]
    assert all(not r.ids for r in out if r.type == "presence.occupancy")
    assert e.tick(T0 + 61, wall(T0 + 61)) == []  # the next interval ends at T0+120


def test_without_zones_occupancy_has_no_zone_field() -> None:
    e = engine(occupancy_every=30)
    e.observe(PHONE, -50, T0, wall(T0))
    out = e.tick(T0 + 30, wall(T0 + 30))
    assert [dict(r.data) for r in out if r.type == "presence.occupancy"] == [
        {"count": 0, "peak": 1, "interval_ms": 30000}]


def test_max_devices_bounds_memory_and_counts_what_it_ignores() -> None:
    e = engine(max_devices=10)
    for i in range(12):
        e.observe(f"5A:00:00:00:00:{i:02X}", -60, T0, wall(T0))
    assert (e.tracked, e.over_limit) == (10, 2)


def test_a_full_table_evicts_the_least_recently_seen_absent_device_so_spam_cannot_blind_presence() -> None:
    """With the table full of weak (never entered) random addresses, a real phone is still
    tracked and enters: the least recently seen absent entry makes room. Present devices are
    never evicted; only when every tracked device is present is a new address refused."""
    e = engine(max_devices=10)
    e.observe(PHONE2, -60, T0, wall(T0))  # present
    for i in range(30):  # a spammer: random addresses, too weak to enter
        t = T0 + 0.1 * i
        e.observe(f"5A:00:00:00:00:{i:02X}", -95, t, wall(t))
    assert (e.tracked, e.over_limit, e.evicted) == (10, 0, 21)
    e.observe("5A:00:00:00:00:1D", -95, T0 + 3.1, wall(T0 + 3.1))  # refreshed: now the most recent
    r = e.observe(PHONE, -60, T0 + 3.2, wall(T0 + 3.2))
    assert r is not None
    assert r.type == "presence.enter"
    assert (e.present, e.tracked) == (2, 10)
    # the oldest weak one (0x15) was evicted, not the refreshed 0x1D; 0x16 is next to go
    assert e.observe("5A:00:00:00:00:15", -95, T0 + 3.3, wall(T0 + 3.3)) is None
    assert e.evicted == 23
    e.observe("5A:00:00:00:00:1D", -95, T0 + 3.4, wall(T0 + 3.4))  # still tracked: no eviction
    assert e.evicted == 23
    out = e.flush(T0 + 4, wall(T0 + 4))
    assert sorted(r.ids["device"].raw for r in out) == sorted([PHONE, PHONE2])


def test_a_full_table_of_present_devices_refuses_new_addresses() -> None:
    e = engine(max_devices=10)
    for i in range(10):
        e.observe(f"5A:00:00:00:00:{i:02X}", -60, T0, wall(T0))
    assert e.observe(PHONE, -50, T0 + 1, wall(T0 + 1)) is None
    assert (e.tracked, e.present, e.over_limit, e.evicted) == (10, 10, 1, 0)


def test_flush_closes_open_sessions_with_reason_stop_and_forgets_everyone() -> None:
    e = engine()
    e.observe(PHONE, -60, T0, wall(T0))
    e.observe(PHONE2, -95, T0, wall(T0))
    out = e.flush(T0 + 3, wall(T0 + 3))
    assert [(r.type, r.data["reason"]) for r in out] == [("presence.exit", "stop")]
    assert (e.tracked, e.present) == (0, 0)


# --- store beacons and routing -------------------------------------------------------------------


def processor(**kw: Any) -> BleProcessor:
    cfg = Ble.model_validate({
        "presence": {"enter_rssi": -80, "smoothing": 1.0, "exit_after": 10, "occupancy_every": 3600,
                     **kw.pop("presence", {})},
        "beacons": {"known": [
            {"name": "door", "ibeacon": {"uuid": UUID.lower(), "major": 1, "minor": 2}},
            {"name": "shelf-1", "eddystone": {"namespace": "EDD1EBEAC04E5DEFA017", "instance": "000000000001"}},
        ], "seen_every": 60, "telemetry_every": 600, "missing_after": 300, **kw.pop("beacons", {})},
        **kw,
    })
    return BleProcessor(cfg, T0)


def advert(p: BleProcessor, address: str, rssi: int, t: float, mfr: dict[int, bytes] | None = None, *,
           svc: dict[str, bytes] | None = None) -> list[Reading]:
    return list(p.advert(address, rssi, mfr or {}, svc or {}, t, wall(t)))


def test_store_beacon_seen_is_throttled_and_summarizes_the_samples_in_between() -> None:
    p = processor()
    first = advert(p, "0C:00:00:00:00:01", -70, T0, {0x004C: IBEACON_1_2})
    assert [(r.type, dict(r.data), dict(r.ids)) for r in first] == [("beacon.seen", {
        "beacon": "door", "frame": "ibeacon", "uuid": UUID, "major": 1, "minor": 2,
        "rssi": -70, "rssi_mean": -70, "samples": 1, "tx_power": -59}, {})]
    for i in range(1, 60):
        assert advert(p, "0C:00:00:00:00:01", -80, T0 + i, {0x004C: IBEACON_1_2}) == []
    nxt = advert(p, "0C:00:00:00:00:01", -60, T0 + 60, {0x004C: IBEACON_1_2})
    assert [(r.data["samples"], r.data["rssi_mean"], r.data["rssi"]) for r in nxt] == [(60, -80, -60)]
    assert p.presence.tracked == 0  # infrastructure never becomes presence


def test_tlm_telemetry_is_attributed_by_address_and_throttled() -> None:
    p = processor()
    beacon = "0C:00:00:00:00:02"
    assert advert(p, beacon, -70, T0, svc={EDDYSTONE: TLM}) == []  # no UID frame yet from this address
    assert p.beacons.unattributed_tlm == 1
    seen = advert(p, beacon, -70, T0 + 1, svc={EDDYSTONE: UID})
    assert [(r.type, r.data["beacon"], r.data["frame"]) for r in seen] == [("beacon.seen", "shelf-1", "eddystone_uid")]
    tlm = advert(p, beacon, -70, T0 + 2, svc={EDDYSTONE: TLM})
    assert [(r.type, dict(r.data)) for r in tlm] == [("beacon.telemetry", {
        "beacon": "shelf-1", "battery_mv": 3000, "temperature_c": 23.5, "adv_count": 1000, "uptime_s": 1000.0})]
    assert advert(p, beacon, -70, T0 + 300, svc={EDDYSTONE: TLM}) == []  # within telemetry_every
    assert [r.type for r in advert(p, beacon, -70, T0 + 602, svc={EDDYSTONE: TLM})] == ["beacon.telemetry"]
    assert p.presence.tracked == 0


def test_a_silent_beacon_is_reported_missing_once_and_recovered_when_heard() -> None:
    p = processor()
    advert(p, "0C:00:00:00:00:01", -70, T0, {0x004C: IBEACON_1_2})
    advert(p, "0C:00:00:00:00:02", -70, T0 + 100, svc={EDDYSTONE: UID})
    assert p.tick(T0 + 299, wall(T0 + 299)) == []
    out = p.tick(T0 + 300, wall(T0 + 300))
    assert [dict(r.data) for r in out if r.type == "beacon.missing"] == [
        {"beacon": "door", "last_seen_ts": wall(T0), "silent_ms": 300_000}]
    assert [r for r in p.tick(T0 + 301, wall(T0 + 301)) if r.type == "beacon.missing"] == []  # once
    back = advert(p, "0C:00:00:00:00:01", -70, T0 + 302, {0x004C: IBEACON_1_2})
    assert [(r.type, r.data.get("recovered")) for r in back] == [("beacon.seen", True)]


def test_missing_is_not_reported_while_the_scanner_is_in_doubt_nor_for_time_it_did_not_listen() -> None:
    p = processor()
    advert(p, "0C:00:00:00:00:01", -70, T0, {0x004C: IBEACON_1_2})
    advert(p, "0C:00:00:00:00:02", -70, T0, svc={EDDYSTONE: UID})
    assert p.tick(T0 + 400, wall(T0 + 400), scanner_ok=False) == []
    p.resume(T0 + 400)  # the scanner restarted: silence counts from now
    assert [r for r in p.tick(T0 + 600, wall(T0 + 600)) if r.type == "beacon.missing"] == []
    assert len([r for r in p.tick(T0 + 700, wall(T0 + 700)) if r.type == "beacon.missing"]) == 2


def test_a_beacon_never_heard_since_start_is_missing_with_null_last_seen() -> None:
    p = processor()
    out = [r for r in p.tick(T0 + 300, wall(T0 + 300)) if r.type == "beacon.missing"]
    assert [(r.data["beacon"], r.data["last_seen_ts"]) for r in out] == [("door", None), ("shelf-1", None)]


def test_foreign_beacons_are_ignored_unless_configured_otherwise() -> None:
    p = processor()
    assert advert(p, "0C:00:00:00:00:09", -50, T0, {0x004C: FOREIGN_IBEACON}) == []
    assert (p.presence.tracked, p.foreign_beacon_adverts) == (0, 1)
    p = processor(presence={"ignore_foreign_beacons": False})
    assert [r.type for r in advert(p, "0C:00:00:00:00:09", -50, T0, {0x004C: FOREIGN_IBEACON})] == [
        "presence.enter"]


def test_phones_with_garbage_manufacturer_data_still_count_as_presence_and_garbage_is_counted() -> None:
    p = processor()
    out = advert(p, PHONE, -60, T0, {0x004C: IBEACON_1_2[:10], 0x0075: b"\x01"}, svc={EDDYSTONE: b"\x77"})
    assert [r.type for r in out] == ["presence.enter"]
    assert dict(p.malformed) == {"ibeacon_length": 1, "eddystone_frame": 1}
    assert p.stats()["malformed"] == 2


def test_presence_readings_carry_the_address_only_as_an_identifier() -> None:
    p = processor()
    out = advert(p, PHONE, -60, T0, {0x004C: bytes.fromhex("1005011820A1B2")})
    assert out[0].ids == {"device": Ident("ble_address", PHONE)}
    assert PHONE not in repr(out[0])
    assert PHONE not in repr(dict(out[0].data))
    assert PHONE not in repr(p.stats())


def test_through_the_pipeline_stages_a_session_carries_one_pseudonym_and_no_address(tmp_path: Path) -> None:
    """enter and exit of one visit, through card scrub, normalize and privacy: both carry
    the same `ble:e<epoch>:` pseudonym under `device`, and no spelling of the address."""
    clock = FakeClock()
    keys = KeyStore(tmp_path / "keys", clock)
    keys.init()
    stages = (CardScrubStage(), NormalizeStage(clock))
    privacy = PrivacyStage(Pseudonymizer(Privacy(), keys, None))
    p = processor()
    readings = advert(p, PHONE, -60, T0) + p.tick(T0 + 20, wall(T0 + 20))
    events = []
    for reading in readings:
        r = reading
        for stage in stages:
            r = stage(r)
        events.append(privacy(r))
    sessions = [e for e in events if e.type in ("presence.enter", "presence.exit")]
    assert [e.type for e in sessions] == ["presence.enter", "presence.exit"]
    assert sessions[0].data["device"] == sessions[1].data["device"]
    assert str(sessions[0].data["device"]).startswith("ble:e")
    text = repr([dict(e.data) for e in events])
    assert not any(s in text for s in (PHONE, PHONE.replace(":", ""), PHONE.lower(), PHONE.replace(":", "").lower()))


# --- the watchdog ladder ---------------------------------------------------------------------------


def test_watchdog_escalates_restart_power_cycle_give_up_and_an_advert_resets_it() -> None:
    w = ScanWatchdog(Watchdog(quiet=30, restarts=2, power_cycles=1), expect_always=True)
    w.started(T0)
    assert w.due(T0 + 29) is None
    steps = [w.due(T0 + 30 * k) for k in range(1, 6)]
    assert steps == ["restart", "restart", "power_cycle", "give_up", "give_up"]
    assert w.exhausted
    assert w.advert(T0 + 151) == 4  # the level it ends
    assert (w.level, w.exhausted) == (0, False)
    assert w.due(T0 + 180) is None  # quiet counts from the last advertisement
    assert w.due(T0 + 181) == "restart"


def test_watchdog_waits_for_traffic_unless_beacons_are_expected_and_can_be_disabled() -> None:
    w = ScanWatchdog(Watchdog(quiet=30), expect_always=False)
    w.started(T0)
    assert w.due(T0 + 1000) is None  # an empty store at night: nothing was ever heard
    w.advert(T0 + 1000)
    assert w.due(T0 + 1030) == "restart"
    off = ScanWatchdog(Watchdog(enabled=False), expect_always=True)
    assert off.due(T0 + 10_000) is None
