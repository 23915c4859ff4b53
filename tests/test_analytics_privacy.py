"""What the published analytics must not give away, driven with a fake clock: no suppressed
cell can be recovered by subtracting published cells from a published total (complementary
suppression), dwell statistics only for enough visits and noised with epsilon, a snapshot
that is stable while the open interval changes and adds nothing to the published rows; and
the failure containment of the sink and the ticker (an event is never lost to an analytics
error, a failing ticker retries and shows in /healthz)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC
from typing import Any

import pytest
from structlog.testing import capture_logs

from edge.analytics.config import Analytics
from edge.analytics.engine import StoreAnalytics
from edge.analytics.publish import Cells
from edge.analytics.report import _complement
from edge.analytics.sink import AnalyticsSink, run_ticker
from edge.clock import FakeClock
from edge.events import Pending
from edge.health import Snapshot, health_doc

DAY0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
H9 = DAY0 + 9 * 3600_000  # 09:00, an interval boundary
ZONES = ["entrance", "floor", "till"]
DWELL = ("0-5m", "5-15m", "15-30m", "30-60m", "60m+")
BASKET = ("0", "1", "2-3", "4-6", "7-10", "11+")


def at(t: int) -> FakeClock:
    return FakeClock(wall=t)


def enter(a: StoreAnalytics, pid: str, ts: int, zone: str = "floor", rssi: int = -65) -> None:
    a.observe(Pending(ts, "ble", "presence.enter", {"rssi": rssi, "zone": zone, "device": pid}))


def exit_(a: StoreAnalytics, pid: str, ts: int, *, entered: int, rssi: int = -65, weak_ms: int = 0) -> None:
    a.observe(Pending(ts, "ble", "presence.exit", {
        "dwell_ms": ts - entered, "rssi_min": rssi - 5, "rssi_mean": rssi, "rssi_max": rssi + 5,
        "rssi_last": rssi, "weak_ms": weak_ms, "reason": "gone", "zone": "floor", "zone_last": "floor",
        "device": pid}))


def run_to(a: StoreAnalytics, clock: FakeClock, wall: int) -> list[Pending]:
    out = []
    while clock.wall < wall:
        clock.advance(1.0)
        out += a.tick()
    return out


def first_interval(events: list[Pending]) -> dict[str, Any]:
    assert events, "no interval was published"
    return dict(events[0].data)


class _Buffer:
    def __init__(self) -> None:
        self.got: list[Pending] = []

    def put_nowait(self, p: Pending) -> bool:
        self.got.append(p)
        return True

    async def put(self, p: Pending) -> None:
        self.got.append(p)


def engine(clock: FakeClock, **kw: Any) -> StoreAnalytics:
    cfg = Analytics.model_validate({"enabled": True, "k": 5, **kw})
    return StoreAnalytics(cfg, ZONES, clock, exit_after=60.0, tz=UTC, rng=random.Random(7))


def visits_with_dwell(a: StoreAnalytics, dwells_s: list[int], end: int, tag: str = "p") -> None:
    """Visits that all end at `end`, with the given dwell times."""
    for i, d in enumerate(dwells_s):
        enter(a, f"ble:e1:{tag}{i}", end - d * 1000)
    for i, d in enumerate(dwells_s):
        exit_(a, f"ble:e1:{tag}{i}", end, entered=end - d * 1000, weak_ms=9000)


def receipts(a: StoreAnalytics, ts: int, sizes: list[int], loyalty: int = 0) -> None:
    for i, n in enumerate(sizes):
        a.observe(Pending(ts, "pos", "pos.receipt", {"items": [{"qty": 1}] * n,
                                                     "loyalty": f"loy:e1:{i}" if i < loyalty else None}))


def closed_row(a: StoreAnalytics, clock: FakeClock) -> dict[str, Any]:
    clock.wall = max(clock.wall, H9 + 880_000)
    return first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))


def assert_no_recovery(total: int | None, parts: dict[str, int | None], k: int) -> None:
    """total - sum(published parts) is what an analyst learns of the suppressed ones: it
    must be 0 (none suppressed) or at least k, never one small cell."""
    if total is None:
        return
    residual = total - sum(v for v in parts.values() if v is not None)
    assert residual == 0 or residual >= k, (total, parts)
    assert residual == 0 or sum(v is None for v in parts.values()) >= 2, (total, parts)


def test_one_suppressed_dwell_bucket_cannot_be_recovered_from_visits() -> None:
    """The reviewer's case: 6 visits, 5 under 5 min and 1 of 5-15 min, k = 5. Publishing
    visits=6 with 0-5m=5 would reveal the one; a second bucket is suppressed instead."""
    clock = at(H9 + 800_000)
    a = engine(clock)
    visits_with_dwell(a, [60, 70, 80, 90, 100, 400], H9 + 800_000)
    row = closed_row(a, clock)
    assert row["visits"] == 6
    assert row["dwell_buckets"] == {"0-5m": None, "5-15m": None, "15-30m": 0, "30-60m": 0, "60m+": 0}
    assert row["suppressed"] >= 2
    assert_no_recovery(row["visits"], row["dwell_buckets"], 5)


def test_one_suppressed_basket_bucket_cannot_be_recovered_from_receipts() -> None:
    clock = at(H9 + 800_000)
    a = engine(clock)
    receipts(a, H9 + 800_000, [1] * 7 + [3])
    row = closed_row(a, clock)
    assert row["receipts"] == 8
    assert row["basket"] == {"0": 0, "1": None, "2-3": None, "4-6": 0, "7-10": 0, "11+": 0}
    assert_no_recovery(row["receipts"], row["basket"], 5)


def test_suppressed_cells_together_below_k_take_in_more_cells_or_the_total() -> None:
    """Three buckets of 2 (each suppressed, together 6 >= k): the total stays. When the
    suppressed residual stays below k and no published non-zero cell is left (noise can
    make the total exceed its parts), the total itself is suppressed."""
    clock = at(H9 + 800_000)
    a = engine(clock)
    visits_with_dwell(a, [400, 410, 1000, 1100, 2000, 2100], H9 + 800_000)
    row = closed_row(a, clock)
    assert row["dwell_buckets"] == {"0-5m": 0, "5-15m": None, "15-30m": None, "30-60m": None, "60m+": 0}
    assert row["visits"] == 6
    c = Cells(5, None, random.Random(1))
    total = c.count("t", 7)
    parts = {"a": c.count("a", 1), "b": c.count("b", 0)}
    assert _complement(c, total, parts, {"a": "a", "b": "b"}) == (None, {"a": None, "b": 0})
    assert c.suppressed == 2


def test_receipts_without_a_loyalty_card_are_not_a_small_cell_by_difference() -> None:
    """receipts - receipts_loyalty counts the receipts without a card: 8 - 7 = 1 would be one."""
    clock = at(H9 + 800_000)
    a = engine(clock)
    receipts(a, H9 + 800_000, [1] * 8, loyalty=7)
    row = closed_row(a, clock)
    assert (row["receipts"], row["receipts_loyalty"]) == (8, None)


@pytest.mark.parametrize("epsilon", [None, 1.0])
def test_no_published_group_reveals_a_single_suppressed_cell(epsilon: float | None) -> None:
    """Random intervals: in every published row, visits vs dwell buckets and receipts vs
    basket leave a residual of 0 or >= k (checked on the published values)."""
    rng = random.Random(11)
    for _ in range(40):
        clock = at(H9 + 800_000)
        a = engine(clock, epsilon=epsilon)
        visits_with_dwell(a, [rng.choice([30, 400, 1000, 2000, 4000]) for _ in range(rng.randint(0, 30))],
                          H9 + 800_000)
        receipts(a, H9 + 800_000, [rng.choice([0, 1, 2, 5, 8, 12]) for _ in range(rng.randint(0, 30))])
        row = closed_row(a, clock)
        if epsilon is None:
            assert_no_recovery(row["visits"], row["dwell_buckets"], 5)
            assert_no_recovery(row["receipts"], row["basket"], 5)
        else:  # noised cells need not add up; a lone suppressed cell beside a total never happens
            for total, parts in ((row["visits"], row["dwell_buckets"]), (row["receipts"], row["basket"])):
                assert total is None or sum(v is None for v in parts.values()) != 1


def test_dwell_statistics_need_two_k_and_at_least_ten_visits() -> None:
    """9 visits with k = 1: nearest-rank p90 would be the longest visit, one person's exact
    dwell; not published. 10 visits with k = 5: published (and p90 is not the maximum)."""
    for k, n, published in ((1, 9, False), (5, 9, False), (5, 10, True), (8, 15, False), (8, 16, True)):
        clock = at(H9 + 800_000)
        a = engine(clock, k=k)
        dwells = [60 * (i + 1) for i in range(n)]
        visits_with_dwell(a, dwells, H9 + 800_000)
        d = closed_row(a, clock)["dwell"]
        if published:
            assert d["p90_s"] is not None
            assert d["p90_s"] < max(dwells)
        else:
            assert d == {"mean_s": None, "p50_s": None, "p90_s": None}, (k, n)


def test_with_epsilon_dwell_statistics_are_noised_within_the_clip() -> None:
    """With epsilon, mean/p50/p90 get Laplace noise of scale staff_after / (n * epsilon):
    not the exact figures, never negative, never above staff_after."""
    exact, noised = [], []
    for seed in range(20):
        clock = at(H9 + 800_000)
        cfg = Analytics.model_validate({"enabled": True, "k": 5, "epsilon": 0.5, "staff_after": "1h"})
        a = StoreAnalytics(cfg, ZONES, clock, exit_after=60.0, tz=UTC, rng=random.Random(seed))
        dwells = [100 + 30 * i for i in range(20)]
        visits_with_dwell(a, dwells, H9 + 800_000)
        d = closed_row(a, clock)["dwell"]
        if d["mean_s"] is None:  # the noised visits count fell below 2k
            continue
        exact.append(round(sum(dwells) / 20, 1))
        noised.append(d["mean_s"])
        assert all(0.0 <= d[f] <= 3600.0 for f in ("mean_s", "p50_s", "p90_s"))
    assert len(noised) >= 10
    assert noised != exact


def test_the_snapshot_shows_only_published_intervals_and_polls_do_not_move() -> None:
    """While the open interval fills up, two polls are identical (nothing to difference);
    once it is published it appears, and totals are the sums of the published cells."""
    clock = at(H9)
    a = engine(clock)
    for i in range(12):
        enter(a, f"ble:e1:a{i}", H9 + 1000 * i)
    receipts(a, H9 + 20_000, [1] * 6)
    run_to(a, clock, H9 + 900_000 + a.settle_ms)  # 09:00 published
    before = a.snapshot()
    enter(a, "ble:e1:late", clock.wall)  # the open 09:15 interval changes by one visitor
    receipts(a, clock.wall, [2])
    run_to(a, clock, clock.wall + 30_000)
    assert a.snapshot() == before
    assert [r["start"] for r in before["intervals"]] == [H9]
    ev = run_to(a, clock, H9 + 1_800_000 + a.settle_ms)
    after = a.snapshot()
    rows = [dict(e.data) for e in ev]
    assert [r["start"] for r in after["intervals"]] == [H9, H9 + 900_000]
    published_ff = 12 + sum(r["footfall"] or 0 for r in rows)
    assert after["totals"]["footfall"] == published_ff
    assert after["totals"]["receipts"] == 6 + sum(r["receipts"] or 0 for r in rows)


def test_day_totals_add_suppressed_cells_only_in_whole_multiples_of_k() -> None:
    """Intervals with 3, 3, 3 and 12 visitors (k = 5): the three small ones are null; the
    day's footfall is 12 + 5 (their 9 pooled, added in whole multiples of k), so the total
    minus the published intervals says only "at least 5 in the suppressed ones"."""
    clock = at(H9)
    a = engine(clock)
    snaps = []
    ev: list[Pending] = []
    for j, n in enumerate((3, 3, 3, 12)):
        run_to(a, clock, H9 + j * 900_000 + 1000)
        for i in range(n):
            enter(a, f"ble:e1:{j}-{i}", clock.wall)
        ev += run_to(a, clock, H9 + (j + 1) * 900_000 + a.settle_ms)
        snaps.append(a.snapshot()["totals"]["footfall"])
    assert [e.data["footfall"] for e in ev] == [None, None, None, 12]
    assert snaps == [0, 5, 5, 17]  # one suppressed interval never moves a total by less than k


def test_a_rotation_found_after_its_interval_closed_does_not_take_footfall_from_another() -> None:
    """The new session entered at 09:14:59; the old session's exit arrives only after 09:00
    was published (held back): the link is counted, and no other interval loses a visitor."""
    clock = at(H9 + 880_000)
    a = engine(clock, k=1)
    enter(a, "ble:e1:old", H9 + 100_000, rssi=-60)
    enter(a, "ble:e1:new", H9 + 899_000, rssi=-61)
    run_to(a, clock, H9 + 900_500)
    enter(a, "ble:e1:b1", H9 + 901_000)
    enter(a, "ble:e1:b2", H9 + 902_000)
    first = first_interval(run_to(a, clock, H9 + 900_000 + a.settle_ms))
    assert first["footfall"] == 2
    exit_(a, "ble:e1:old", H9 + 898_000, entered=H9 + 100_000, rssi=-60)  # late: 09:00 is closed
    assert a.counters["rotations_after_close"] == 1
    row = first_interval(run_to(a, clock, H9 + 1_800_000 + a.settle_ms))
    assert (row["start"], row["footfall"], row["rotations"]) == (H9 + 900_000, 2, 0)


class _Boom(Exception):
    pass


def test_an_observe_error_still_stores_the_event_and_is_counted_without_identifiers() -> None:
    clock = at(H9)
    a = engine(clock)

    def broken(p: Pending) -> None:
        raise _Boom(f"bad {p.data.get('device')}")

    a.observe = broken  # type: ignore[method-assign]
    buf = _Buffer()
    sink = AnalyticsSink(buf, a, "events")
    p = Pending(H9, "ble", "presence.enter", {"rssi": -60, "device": "ble:e1:secret"})
    with capture_logs() as logs:
        assert sink.put_nowait(p)
        assert sink.put_nowait(p)
    assert buf.got == [p, p]
    assert a.counters["observe_errors"] == 2
    assert len(logs) == 1  # the first, then every 1000th
    assert logs[0]["event"] == "analytics_observe_failed"
    assert "ble:e1:secret" not in repr(logs)


async def test_a_failing_tick_is_retried_with_backoff_and_shows_in_healthz() -> None:
    clock = FakeClock(wall=DAY0 + 9 * 3600_000)
    a = engine(clock)
    real_tick, fails = a.tick, [3]

    def flaky() -> list[Pending]:
        if fails[0] > 0:
            fails[0] -= 1
            raise _Boom("tick")
        return real_tick()

    a.tick = flaky  # type: ignore[method-assign]
    buf = _Buffer()
    with capture_logs() as logs:
        task = asyncio.create_task(run_ticker(a, buf, every=0.01, backoff_min=0.01))
        try:
            for _ in range(500):
                if a.last_tick_ms is not None:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert a.counters["tick_errors"] == 3
    assert a.last_tick_ms is not None
    assert [entry["event"] for entry in logs] == ["analytics_tick_failed"] * 3
    assert a.health_reason() is None
    clock.advance(20)  # no tick for 20 s (a dead or failing ticker)
    reason = a.health_reason()
    assert reason is not None
    assert reason.startswith("analytics: not advanced for 20s")
    doc = health_doc(Snapshot(device="d1", tenant="t1", store="s1", wall_ms=clock.wall, synchronized=True,
                              stats=None, stats_fresh=True, pipeline={}, drivers=[], components={},
                              reason=None, lag_s=0.0, analytics_reason=reason))
    assert (doc["status"], doc["reasons"]) == ("degraded", [reason])


def test_without_a_ticker_there_is_no_health_reason() -> None:
    clock = at(H9)
    a = engine(clock)
    clock.advance(3600)
    assert a.health_reason() is None
