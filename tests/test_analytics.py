"""Store analytics from post-privacy events, driven with a fake clock: each KPI, address
rotation inference, the staff rule, k suppression, Laplace noise, the snapshot contract and
the sink that keeps per-person events on the device in aggregate mode."""

from __future__ import annotations

import json
import random
import statistics
from datetime import UTC
from typing import Any

import pytest

from edge.analytics.config import Analytics
from edge.analytics.engine import StoreAnalytics
from edge.analytics.publish import Cells, laplace
from edge.analytics.sink import AnalyticsSink
from edge.clock import FakeClock
from edge.events import Pending

DAY0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
H9 = DAY0 + 9 * 3600_000  # 09:00, an interval boundary
ZONES = ["entrance", "floor", "till"]


def engine(clock: FakeClock, **kw: Any) -> StoreAnalytics:
    cfg = Analytics.model_validate({"enabled": True, "k": 1, **kw})
    return StoreAnalytics(cfg, ZONES, clock, exit_after=60.0, tz=UTC, rng=random.Random(3))


def enter(a: StoreAnalytics, pid: str, ts: int, zone: str = "floor", rssi: int = -65) -> None:
    a.observe(Pending(ts, "ble", "presence.enter", {"rssi": rssi, "zone": zone, "device": pid}))


def exit_(a: StoreAnalytics, pid: str, ts: int, *, entered: int, zone: str = "floor", rssi: int = -65,
          weak_ms: int = 0, reason: str = "gone") -> None:
    a.observe(Pending(ts, "ble", "presence.exit", {
        "dwell_ms": ts - entered, "rssi_min": rssi - 5, "rssi_mean": rssi, "rssi_max": rssi + 5,
        "rssi_last": rssi, "weak_ms": weak_ms, "reason": reason, "zone": zone, "zone_last": zone,
        "device": pid}))


def run_to(a: StoreAnalytics, clock: FakeClock, wall: int) -> list[Pending]:
    """Tick once per second of fake time up to `wall`; the events published on the way."""
    out = []
    while clock.wall < wall:
        clock.advance(1.0)
        out += a.tick()
    return out


def first_interval(events: list[Pending]) -> dict[str, Any]:
    assert events, "no interval was published"
    assert (events[0].src, events[0].type) == ("edge", "analytics.interval")
    return dict(events[0].data)


def at(t: int) -> FakeClock:
    return FakeClock(wall=t)


def test_footfall_counts_visits_started_in_the_interval_and_it_is_published_after_settling() -> None:
    clock = at(H9)
    a = engine(clock)
    for i in range(3):
        enter(a, f"ble:e1:p{i}", H9 + 1000 * i)
    run_to(a, clock, H9 + 900_000 + 5)
    enter(a, "ble:e1:p9", H9 + 900_000 + 5)  # the next interval
    assert run_to(a, clock, H9 + 900_000 + 60_000) == []  # exits may still come: not settled
    ev = run_to(a, clock, H9 + 900_000 + a.settle_ms)
    row = first_interval(ev)
    assert (row["start"], row["end"], row["interval_s"], row["footfall"]) == (H9, H9 + 900_000, 900, 3)
    assert ev[0].ts == H9 + 900_000


def test_dwell_mean_percentiles_and_buckets_come_from_visits_that_ended() -> None:
    clock = at(H9)
    a = engine(clock)
    dwells = [60, 120, 240, 400, 700, 1000, 2000, 4000, 100, 200]  # seconds
    for i, d in enumerate(dwells):
        enter(a, f"ble:e1:p{i}", H9 - d * 1000 + 900_000 - 10_000)
    for i, d in enumerate(dwells):
        exit_(a, f"ble:e1:p{i}", H9 + 900_000 - 10_000, entered=H9 - d * 1000 + 900_000 - 10_000, weak_ms=9000)
    clock.wall = H9 + 900_000 - 10_000
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert row["visits"] == 10
    s = sorted(dwells)
    assert row["dwell"] == {"mean_s": round(sum(dwells) / 10, 1), "p50_s": float(s[4]), "p90_s": float(s[8])}
    assert row["dwell_buckets"] == {"0-5m": 5, "5-15m": 2, "15-30m": 1, "30-60m": 1, "60m+": 1}


def test_occupancy_mean_and_peak_per_zone_from_samples_corrected_when_the_exit_arrives_late() -> None:
    """Two devices on the floor for the whole interval, one at the till for its first half;
    the till device's exit is noticed 60 s after it was last near, and the samples taken in
    between are taken back."""
    clock = at(H9 - 1000)
    a = engine(clock)
    enter(a, "ble:e1:a", H9 - 1000)
    enter(a, "ble:e1:b", H9 - 1000)
    enter(a, "ble:e1:c", H9 - 1000, zone="till")
    run_to(a, clock, H9 + 450_000 + 60_000)
    exit_(a, "ble:e1:c", H9 + 450_000, entered=H9 - 1000, zone="till", weak_ms=5000)
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    occ = row["occupancy"]
    assert occ["floor"] == {"mean": 2.0, "peak": 2}
    assert occ["till"]["peak"] == 1
    assert occ["till"]["mean"] == pytest.approx(0.5, abs=0.02)
    assert occ["entrance"] == {"mean": 0.0, "peak": 0}


def test_zone_changes_move_occupancy_and_count_transitions() -> None:
    clock = at(H9)
    a = engine(clock)
    enter(a, "ble:e1:a", H9, zone="entrance")
    a.tick()  # the sample at 09:00:00
    clock.advance(5)
    a.observe(Pending(H9 + 5000, "ble", "presence.zone", {"zone": "floor", "from": "entrance", "device": "ble:e1:a"}))
    a.observe(Pending(H9 + 6000, "ble", "presence.zone", {"zone": "till", "from": "floor", "device": "ble:e1:a"}))
    a.observe(Pending(H9 + 7000, "ble", "presence.zone", {"zone": "till", "from": "till", "device": "ble:e1:a"}))
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert row["transitions"] == {"entrance>floor": 1, "floor>till": 1}
    assert row["occupancy"]["till"]["peak"] == 1
    assert row["occupancy"]["entrance"]["peak"] == 1  # the sample at 09:00:00


def test_product_taps_per_gtin_others_counted_apart_and_bounded() -> None:
    clock = at(H9)
    a = engine(clock, max_gtins=2)
    for gtin in ["04012345123456", "04012345123456", "09506000134352", "00012345600012"]:
        a.observe(Pending(H9, "nfc", "nfc.tap", {"kind": "product", "gtin": gtin, "card": "nfc:e1:x"}))
    a.observe(Pending(H9, "nfc", "nfc.tap", {"kind": "loyalty", "loyalty": "loy:e1:y"}))
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert row["taps"] == {"04012345123456": 2, "09506000134352": 1}
    assert row["taps_other"] == 2  # the third GTIN (over max_gtins) and the loyalty tap


def test_receipts_loyalty_basket_buckets_and_conversion() -> None:
    clock = at(H9)
    a = engine(clock)
    for i in range(8):
        enter(a, f"ble:e1:p{i}", H9 + i)
    baskets = [[], [{"qty": 1}], [{"qty": 2}, {"qty": 1}], [{"qty": 1.25}] * 5, [{"qty": 12}]]
    for i, items in enumerate(baskets):
        data: dict[str, Any] = {"register": "till-1", "items": items, "total_cents": 100}
        if i < 2:
            data["loyalty"] = f"loy:e1:l{i}"
        a.observe(Pending(H9 + 10, "pos", "pos.receipt", data))
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert (row["receipts"], row["receipts_loyalty"], row["footfall"]) == (5, 2, 8)
    assert row["basket"] == {"0": 1, "1": 1, "2-3": 1, "4-6": 1, "7-10": 0, "11+": 1}
    assert row["conversion"] == 0.625


def test_a_visit_spanning_an_address_rotation_counts_once_with_its_whole_dwell() -> None:
    """The old address falls silent while near; 2 s later a new one enters at a similar RSSI
    in the same zone: one visit, dwell from the first enter to the last exit, and the old
    pseudonym is gone from memory at that moment."""
    for rotation, footfall in ((True, 1), (False, 2)):
        clock = at(H9)
        a = engine(clock, rotation=rotation)
        enter(a, "ble:e1:old", H9, rssi=-66)
        run_to(a, clock, H9 + 300_000)
        enter(a, "ble:e1:new", H9 + 302_000, rssi=-63)
        run_to(a, clock, H9 + 360_000)
        exit_(a, "ble:e1:old", H9 + 300_000, entered=H9, rssi=-65)
        if rotation:
            assert "ble:e1:old" not in repr(a._visits) + repr(a._recent)
        run_to(a, clock, H9 + 600_000)
        exit_(a, "ble:e1:new", H9 + 540_000, entered=H9 + 302_000, weak_ms=8000)
        row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
        assert row["footfall"] == footfall
        assert row["visits"] == footfall
        if rotation:  # dwell statistics need 10 visits: the bucket shows the whole 540 s
            assert row["dwell_buckets"] == {"0-5m": 0, "5-15m": 1, "15-30m": 0, "30-60m": 0, "60m+": 0}
            assert row["rotations"] == 1


@pytest.mark.parametrize(("why", "new_at", "new_rssi", "new_zone", "weak_ms"), [
    ("the old one faded out (walked away)", 302_000, -63, "floor", 8000),
    ("too far apart in RSSI", 302_000, -50, "floor", 0),
    ("too long after the old one's last advert", 315_000, -63, "floor", 0),
    ("another zone at a different RSSI", 302_000, -60, "till", 0),
])
def test_no_rotation_is_inferred_when_the_new_address_does_not_look_like_the_old(
        why: str, new_at: int, new_rssi: int, new_zone: str, weak_ms: int) -> None:
    clock = at(H9)
    a = engine(clock, rotation_rssi=8)
    enter(a, "ble:e1:old", H9)
    run_to(a, clock, H9 + 300_000)
    enter(a, "ble:e1:new", H9 + new_at, rssi=new_rssi, zone=new_zone)
    run_to(a, clock, H9 + 370_000)
    exit_(a, "ble:e1:old", H9 + 300_000, entered=H9, rssi=-65, weak_ms=weak_ms)
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert row["footfall"] == 2, why


def test_a_rotation_is_claimed_once_by_the_closest_candidate() -> None:
    clock = at(H9)
    a = engine(clock)
    enter(a, "ble:e1:a", H9, rssi=-65)
    enter(a, "ble:e1:b", H9, rssi=-70)
    run_to(a, clock, H9 + 300_000)
    enter(a, "ble:e1:n", H9 + 301_000, rssi=-66)
    run_to(a, clock, H9 + 370_000)
    exit_(a, "ble:e1:a", H9 + 300_000, entered=H9, rssi=-65)
    exit_(a, "ble:e1:b", H9 + 300_500, entered=H9, rssi=-68)  # n is taken already
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert (row["footfall"], row["rotations"]) == (2, 1)


def test_devices_present_for_staff_after_are_staff_not_visitors() -> None:
    """A device present 3 h (across rotations) leaves occupancy and dwell, is taken back
    from the day's footfall, and is reported as staff; a shopper is not affected."""
    clock = at(H9)
    a = engine(clock, staff_after="3h", interval="1h")
    enter(a, "ble:e1:staff", H9, zone="till")
    enter(a, "ble:e1:shopper", H9 + 3 * 3600_000 - 600_000)
    run_to(a, clock, H9 + 3 * 3600_000 + 20_000)
    exit_(a, "ble:e1:staff", H9 + 3 * 3600_000 + 20_000, entered=H9, zone="till")
    ev = run_to(a, clock, H9 + 4 * 3600_000 + a.settle_ms)
    last = dict(ev[-1].data)
    assert last["staff_new"] == 1
    assert last["staff"] == 1
    assert last["occupancy"]["till"] == {"mean": 0.0, "peak": 0}
    snap = a.snapshot()
    assert snap["totals"]["staff"] == 1
    assert snap["totals"]["footfall"] == 1
    assert last["visits"] == 0  # the staff exit is no visitor's dwell


def test_count_cells_below_k_are_null_and_counted_zero_is_published() -> None:
    c = Cells(5, None, random.Random(1))
    assert [c.count("a", n) for n in (0, 1, 4, 5, 17)] == [0, None, None, 5, 17]
    assert c.suppressed == 2
    assert c.level("m", 2.34, None) is None
    assert c.level("m", 2.34, 7) == 2.3


def test_suppressed_cells_in_a_published_interval_are_null_and_counted() -> None:
    clock = at(H9)
    a = engine(clock, k=5)
    for i in range(3):
        enter(a, f"ble:e1:p{i}", H9 + i)
    a.observe(Pending(H9, "pos", "pos.receipt", {"items": []}))
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert (row["footfall"], row["receipts"], row["conversion"], row["k"]) == (None, None, None, 5)
    assert row["occupancy"]["floor"] == {"mean": None, "peak": None}
    assert row["suppressed"] >= 4  # footfall, receipts, basket "0", floor peak


def test_laplace_noise_has_the_configured_scale_and_is_fixed_per_cell() -> None:
    rng = random.Random(11)
    draws = [laplace(rng, 2.0) for _ in range(40_000)]
    assert statistics.fmean(draws) == pytest.approx(0.0, abs=0.06)
    assert statistics.fmean(abs(x) for x in draws) == pytest.approx(2.0, rel=0.03)  # E|X| = scale
    c = Cells(1, 0.5, random.Random(5))
    first = [c.count(f"cell{i}", 100) for i in range(200)]
    assert [c.count(f"cell{i}", 100) for i in range(200)] == first  # same cell: same noise
    assert len(set(first)) > 5
    assert statistics.fmean(x for x in first if x is not None) == pytest.approx(100, abs=0.6)


def test_noise_is_applied_to_published_counts_when_epsilon_is_set() -> None:
    rows = []
    for seed in range(6):
        clock = at(H9)
        cfg = Analytics.model_validate({"enabled": True, "k": 1, "epsilon": 0.5})
        a = StoreAnalytics(cfg, ZONES, clock, exit_after=60.0, tz=UTC, rng=random.Random(seed))
        for i in range(50):
            enter(a, f"ble:e1:p{i}", H9 + i)
        rows.append(first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms)))
    assert {r["epsilon"] for r in rows} == {0.5}
    assert len({r["footfall"] for r in rows}) > 1
    assert all(abs(r["footfall"] - 50) < 20 for r in rows)


def test_snapshot_has_the_contract_shape_and_no_pseudonym() -> None:
    clock = at(H9)
    a = engine(clock, k=5)
    for i in range(12):
        enter(a, f"ble:e1:p{i:02d}", H9 + i * 1000, zone=ZONES[i % 3])
    for i in range(6):
        exit_(a, f"ble:e1:p{i:02d}", H9 + 200_000, entered=H9 + i * 1000, zone=ZONES[i % 3], weak_ms=9000)
        a.observe(Pending(H9 + 200_000, "pos", "pos.receipt", {"items": [{"qty": 1}], "loyalty": f"loy:e1:{i}"}))
    run_to(a, clock, H9 + 900_000 + a.settle_ms + 1000)
    snap = a.snapshot()
    text = json.dumps(snap)
    assert "ble:" not in text
    assert "loy:" not in text
    assert set(snap) == {"interval_s", "day", "k", "zones", "intervals", "dwell_histogram", "totals", "suppressed"}
    assert (snap["interval_s"], snap["day"], snap["k"], snap["zones"]) == (900, "2026-01-01", 5, ZONES)
    assert [r["start"] for r in snap["intervals"]] == [H9]  # closed ones only: the open one is not shown
    for r in snap["intervals"]:
        assert set(r) == {"start", "end", "footfall", "receipts", "conversion", "dwell", "occupancy"}
        assert set(r["dwell"]) == {"mean_s", "p50_s", "p90_s"}
        assert set(r["occupancy"]) == set(ZONES)
        assert all(set(v) == {"mean", "peak"} for v in r["occupancy"].values())
    first = snap["intervals"][0]
    assert (first["footfall"], first["receipts"], first["conversion"]) == (12, 6, 0.5)
    assert first["dwell"] == {"mean_s": None, "p50_s": None, "p90_s": None}  # 6 visits < 10
    assert [b["bucket"] for b in snap["dwell_histogram"]] == ["0-5m", "5-15m", "15-30m", "30-60m", "60m+"]
    assert snap["dwell_histogram"][0]["visits"] == 6
    assert set(snap["totals"]) == {"footfall", "receipts", "conversion", "staff"}
    assert snap["totals"] == {"footfall": 12, "receipts": 6, "conversion": 0.5, "staff": 0}
    assert isinstance(snap["suppressed"], int)
    assert snap["suppressed"] > 0
    assert a.snapshot() == snap  # stable between calls


def test_an_exit_after_the_pseudonym_key_rotated_finds_its_visit_by_enter_time() -> None:
    clock = at(H9)
    a = engine(clock)
    enter(a, "ble:e1:old-epoch", H9 + 1234)
    run_to(a, clock, H9 + 100_000)
    exit_(a, "ble:e2:new-epoch", H9 + 40_000, entered=H9 + 1234, weak_ms=9000)
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert (row["footfall"], row["visits"]) == (1, 1)
    assert a.status()["visits"] == 0


def test_flush_publishes_the_open_intervals_as_partial_and_forgets_every_visit() -> None:
    clock = at(H9)
    a = engine(clock)
    enter(a, "ble:e1:p", H9 + 5)
    run_to(a, clock, H9 + 30_000)
    out = a.flush()
    assert [(e.type, e.data["partial"], e.data["footfall"]) for e in out] == [("analytics.interval", True, 1)]
    assert a.status()["visits"] == 0


class _Buffer:
    def __init__(self, room: bool = True) -> None:
        self.got: list[Pending] = []
        self.room = room

    def put_nowait(self, p: Pending) -> bool:
        if self.room:
            self.got.append(p)
        return self.room

    async def put(self, p: Pending) -> None:
        self.got.append(p)


def _person_events() -> list[Pending]:
    return [
        Pending(H9, "ble", "presence.enter", {"rssi": -60, "device": "ble:e1:a"}),
        Pending(H9, "ble", "presence.zone", {"zone": "till", "from": "floor", "device": "ble:e1:a"}),
        Pending(H9, "nfc", "nfc.tap", {"kind": "product", "gtin": "04012345123456", "card": "nfc:e1:b"}),
        Pending(H9, "pos", "pos.receipt", {"items": [], "loyalty": "loy:e1:c"}),
        Pending(H9, "ble", "presence.occupancy", {"count": 1, "peak": 1, "interval_ms": 60000}),
        Pending(H9, "edge", "analytics.interval", {"footfall": 12}),
        Pending(H9, "edge", "edge.clock", {"state": "synced"}),
    ]


def test_aggregate_mode_keeps_every_per_person_event_on_the_device() -> None:
    clock = at(H9)
    a = engine(clock)
    buf = _Buffer()
    sink = AnalyticsSink(buf, a, "aggregate")
    for p in _person_events():
        assert sink.put_nowait(p)
    assert [p.type for p in buf.got] == ["analytics.interval", "edge.clock"]
    assert sink.kept == 5
    assert a.status()["visits"] == 1  # analytics still saw them


def test_events_mode_passes_everything_but_the_internal_zone_changes() -> None:
    buf = _Buffer()
    sink = AnalyticsSink(buf, None, "events")
    for p in _person_events():
        sink.put_nowait(p)
    assert [p.type for p in buf.got] == ["presence.enter", "nfc.tap", "pos.receipt", "presence.occupancy",
                                         "analytics.interval", "edge.clock"]


async def test_a_full_buffer_does_not_make_analytics_see_an_event_twice() -> None:
    clock = at(H9)
    a = engine(clock)
    buf = _Buffer(room=False)
    sink = AnalyticsSink(buf, a, "events")
    p = Pending(H9, "pos", "pos.receipt", {"items": []})
    assert not sink.put_nowait(p)
    await sink.put(p)
    assert buf.got == [p]
    row = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert row["receipts"] == 1
