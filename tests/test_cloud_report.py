"""Cloud KPIs (migration 0002) and `edge-cloud report`, on a real PostgreSQL and in Debian's headless
Chromium.

Three stores' `analytics.interval` events over two days go in through the real storage path (sealed
batches, the ingest core, PgStore). What must hold:

- the hour and day views give the hand-computed figures: sums of published cells with the count of
  suppressed ones, visit-weighted dwell figures (partial rows left out), conversion over the
  intervals where receipts and footfall are both published, zone occupancy mean and peak;
- a cell the edge suppressed stays NULL (an all-suppressed footfall, a peak that cannot be known);
- malformed fields read as NULL and never break the views;
- the report renders every chart with data, makes no request beyond its own file, logs no console
  error, escapes user data, and shows no pseudonym or identifier;
- no data in the range is a clear page and exit 0; bad dates are exit 2 with a clear message.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.async_api import ConsoleMessage, Error, Request
from support.browser import chromium
from test_receiver import Device, cloud_key_file

from cloud.cli import main as cloud_main
from cloud.config import ReceiverConfig
from cloud.db.migrate import migrate
from cloud.db.pg_store import PgStore
from cloud.receiver import Receiver
from cloud.report import DWELL_COLUMNS, by_day, load
from cloud.transport import Inbound
from edge.clock import FakeClock

pytestmark = pytest.mark.cloud

DAY1 = 1_796_256_000_000  # 2026-12-03 00:00 UTC
DAY2 = DAY1 + 86_400_000  # 2026-12-04
HOUR, QUARTER = 3_600_000, 900_000
PSEUDONYM_TEXT = "ble:e1:mfrggzdfmztwq2lk"
PSEUDONYM = re.compile(r"\b(?:ble|nfc|loy|mail|tel):[es][0-9a-z]{1,8}:[a-z2-7]{6,}")
IDENTIFIER = re.compile(r"(?i)\b[0-9a-f]{2}(?::[0-9a-f]{2}){5}\b|\b[0-9a-f]{2}(?::[0-9a-f]{2}){6}\b")
EVIL_ZONE = '<img src="https://evil.example/x.png">'
BUCKETS = ("0-5m", "5-15m", "15-30m", "30-60m", "60m+")


def interval(start: int, *, footfall: int | None, visits: int | None = 0,
             dwell: tuple[float, float, float] | None = None, buckets: dict[str, int | None] | None = None,
             receipts: int | None = 0, occupancy: dict[str, tuple[float | None, int | None]] | None = None,
             staff_new: int | None = 0, suppressed: int = 0, partial: bool = False) -> dict[str, Any]:
    """The data of one analytics.interval event, shaped as docs/analytics.md documents it."""
    mean, p50, p90 = dwell or (None, None, None)
    return {
        "start": start, "end": start + QUARTER, "interval_s": 900, "k": 5, "epsilon": None, "partial": partial,
        "footfall": footfall, "visits": visits, "dwell": {"mean_s": mean, "p50_s": p50, "p90_s": p90},
        "dwell_buckets": {b: (buckets or {}).get(b, 0) for b in BUCKETS},
        "occupancy": {z: {"mean": m, "peak": p} for z, (m, p) in (occupancy or {}).items()},
        "transitions": {}, "taps": {}, "taps_other": 0, "receipts": receipts, "receipts_loyalty": 0,
        "basket": {}, "conversion": None if receipts is None or not footfall else round(receipts / footfall, 3),
        "staff": 0, "staff_new": staff_new, "rotations": 0, "suppressed": suppressed,
    }  # fmt: skip


def s001_day1() -> list[dict[str, Any]]:
    h9, h10 = DAY1 + 9 * HOUR, DAY1 + 10 * HOUR
    return [
        interval(h9, footfall=10, visits=10, dwell=(300, 240, 600), buckets={"0-5m": 5, "5-15m": 5}, receipts=5,
                 occupancy={"floor": (4.0, 6), "till": (None, None)}, suppressed=1),
        interval(h9 + QUARTER, footfall=20, visits=20, dwell=(600, 480, 1200),
                 buckets={"0-5m": 5, "5-15m": 10, "15-30m": 5}, receipts=6,
                 occupancy={"floor": (8.0, 12), "till": (5.5, 7)}),
        interval(h9 + 2 * QUARTER, footfall=None, visits=None, buckets={"0-5m": None}, receipts=None,
                 occupancy={"floor": (None, None), "till": (None, None)}, suppressed=6),
        interval(h9 + 3 * QUARTER, footfall=12, visits=0, receipts=7, occupancy={"floor": (2.0, 5), "till": (0, 0)}),
        *(interval(h10 + q * QUARTER, footfall=10, visits=10, dwell=(600, 600, 900), buckets={"5-15m": 10},
                   receipts=2, occupancy={"floor": (3.0, 5), "till": (1.0, 5)}, staff_new=5 if q == 0 else 0)
          for q in range(4)),
    ]  # fmt: skip


def s001_day2() -> list[dict[str, Any]]:
    h9 = DAY2 + 9 * HOUR
    return [interval(h9 + q * QUARTER, footfall=15, visits=10, dwell=(420, 360, 800), buckets={"5-15m": 10},
                     receipts=5, occupancy={"floor": (5.0, 8), "till": (2.0, 5)}) for q in range(4)]


def s002() -> list[dict[str, Any]]:
    """Two days; a restart cut one interval short (partial row: counts kept, dwell left out);
    a zone name that is HTML."""
    rows = []
    for day in (DAY1, DAY2):
        h = day + 11 * HOUR
        rows += [interval(h + q * QUARTER, footfall=30, visits=20, dwell=(900, 840, 1500),
                          buckets={"5-15m": 10, "15-30m": 10}, receipts=9,
                          occupancy={"floor": (6.0, 9), EVIL_ZONE: (3.0, 5)}) for q in range(4)]
    rows.append(interval(DAY2 + 12 * HOUR, footfall=8, visits=10, dwell=(60, 60, 60), buckets={"0-5m": 10},
                         receipts=0, occupancy={"floor": (2.0, 5)}, partial=True))
    return rows


def s003() -> list[dict[str, Any]]:
    """A quiet store: every footfall cell suppressed, a zone whose peak cannot be known."""
    h = DAY2 + 8 * HOUR
    return [interval(h + q * QUARTER, footfall=None, visits=0, receipts=0,
                     occupancy={"floor": (None, None) if q else (0, 0)}, suppressed=2) for q in range(2)]


def malformed() -> list[dict[str, Any]]:
    bad = interval(DAY2 + 9 * HOUR, footfall=5)
    bad.update({"footfall": "12", "receipts": -3, "visits": 1e300, "occupancy": {"floor": [1, 2]}})
    return [bad, {"start": "yesterday", "interval_s": 900}, {"interval_s": 900}]


def store_all(tmp_path: Path, dsn: str) -> None:
    """Seal each store's events into batches and ingest them through the receiver into PgStore."""
    keys = tmp_path / "keys"
    keys.mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=keys, db=tmp_path / "unused.db",
                         out=tmp_path / "unused.jsonl", cloud_key=cloud_key_file(tmp_path))
    receiver = Receiver(cfg, clock=FakeClock(), store=PgStore(dsn))
    inbound: list[Inbound] = []
    for store, rows in (("s001", s001_day1() + s001_day2() + malformed()), ("s002", s002()), ("s003", s003())):
        dev = Device()
        dev.ids = ("acme", store, "edge-01")
        dev.register(keys)
        for data in rows:
            ts = int(data.get("end") or DAY2 + 10 * HOUR)
            _, _, payload = dev.seal(1, extra={"ts": ts, "src": "edge", "type": "analytics.interval", "data": data})
            inbound.append(Inbound(dev.topic, payload))
        # a per-person event beside them (events mode): it must never reach a report
        _, _, payload = dev.seal(1, extra={"ts": DAY2 + 9 * HOUR, "src": "ble", "type": "presence.enter",
                                           "data": {"session": PSEUDONYM_TEXT, "zone": "floor"}})
        inbound.append(Inbound(dev.topic, payload))
    receiver.open()
    try:
        result = receiver.process(inbound)
    finally:
        receiver.close()
    assert len(result.acks) == len(inbound)


@pytest.fixture
def kpi_db(tmp_path: Path, pg_dsn: str) -> str:
    migrate(pg_dsn)
    store_all(tmp_path, pg_dsn)
    return pg_dsn


def rows(dsn: str, sql: str) -> list[dict[str, Any]]:
    # the session's time zone is the server's default: pin it, so dates read back are UTC dates
    with psycopg.connect(dsn, options="-c TimeZone=UTC") as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(sql.encode()).fetchall()


def test_hour_and_day_views_give_the_hand_computed_figures(kpi_db: str) -> None:
    (h9,) = rows(kpi_db, "SELECT * FROM kpi_store_hour WHERE store = 's001'"
                         " AND period_start = '2026-12-03 09:00+00'")
    assert (h9["intervals"], h9["footfall"], h9["footfall_suppressed"]) == (4, 42, 1)
    assert (h9["visits"], h9["visits_suppressed"]) == (30, 1)
    assert [h9[c] for c in ("dwell_0_5m", "dwell_5_15m", "dwell_15_30m", "dwell_30_60m", "dwell_60m_plus")] \
        == [10, 15, 5, 0, 0]
    assert h9["dwell_buckets_suppressed"] == 1
    # visit-weighted: (300*10 + 600*20) / 30, (240*10 + 480*20) / 30, (600*10 + 1200*20) / 30
    assert (h9["dwell_mean_s"], h9["dwell_p50_s"], h9["dwell_p90_s"], h9["dwell_stats_visits"]) == (500, 400, 1000, 30)
    assert (h9["receipts"], h9["receipts_suppressed"]) == (18, 1)
    assert h9["conversion"] == pytest.approx(18 / 42)  # the suppressed interval out of both sides
    assert (h9["suppressed"], h9["partial_rows"], h9["devices"]) == (7, 0, 1)

    (d1,) = rows(kpi_db, "SELECT * FROM kpi_store_day WHERE store = 's001' AND period_start = '2026-12-03 00:00+00'")
    assert (d1["intervals"], d1["footfall"], d1["staff_new"], d1["visits"], d1["receipts"]) == (8, 82, 5, 70, 26)
    assert d1["dwell_mean_s"] == pytest.approx((300 * 10 + 600 * 20 + 600 * 40) / 70)
    assert d1["dwell_p50_s"] == pytest.approx((240 * 10 + 480 * 20 + 600 * 40) / 70)
    assert d1["conversion"] == pytest.approx(26 / 82)
    assert (d1["conv_receipts"], d1["conv_footfall"]) == (26, 82)

    zones = {r["zone"]: r for r in rows(kpi_db, "SELECT * FROM kpi_zone_hour WHERE store = 's001'"
                                                " AND period_start = '2026-12-03 09:00+00'")}
    assert zones["floor"]["occupancy_mean"] == pytest.approx((4 + 8 + 2) / 3)
    assert (zones["floor"]["occupancy_peak"], zones["floor"]["suppressed_intervals"]) == (12, 1)
    assert zones["till"]["occupancy_mean"] == pytest.approx((5.5 + 0) / 2)
    assert (zones["till"]["occupancy_peak"], zones["till"]["suppressed_intervals"]) == (7, 2)


def test_the_reports_days_from_hours_equal_the_day_view(kpi_db: str) -> None:
    """The report reads hour rows only and combines them; that must be the day rollup, exactly."""
    with psycopg.connect(kpi_db) as conn:
        rep = load(conn, tenant="acme", store=None, day_from=dt.date(2026, 12, 3), day_to=dt.date(2026, 12, 4),
                   tz="UTC")
    views = {(r["store"], r["period_start"].date()): r for r in rows(kpi_db, "SELECT * FROM kpi_store_day")}
    compared = 0
    for sd in rep.stores:
        for day, t in by_day(sd.hours, "UTC"):
            v = views[(sd.store, day)]
            assert t["footfall"] == v["footfall"]
            assert t["visitors"] == (None if v["footfall"] is None else v["footfall"] - (v["staff_new"] or 0))
            assert t["receipts"] == v["receipts"]
            assert t["conversion"] == pytest.approx(v["conversion"]) if v["conversion"] is not None \
                else t["conversion"] is None
            for col in ("dwell_mean_s", "dwell_p50_s", "dwell_p90_s"):
                assert t[col] == pytest.approx(v[col]) if v[col] is not None else t[col] is None
            assert t["buckets"] == [(b, v[c]) for b, c in DWELL_COLUMNS]
            assert t["suppressed"] == (v["suppressed"] or 0)
            compared += 1
    assert compared == len(views) == 5


def test_hours_and_days_follow_the_time_zone_asked_for(kpi_db: str) -> None:
    """India is UTC+5:30: its hours start at :30 UTC, so 09:00-09:30 UTC is the 14:00 hour there;
    at UTC+14 (Kiritimati) s002's 11:00 UTC intervals fall on the next local day."""
    ist = rows(kpi_db, "SELECT period_start, footfall, intervals FROM edge_kpi_store('hour', 'Asia/Kolkata')"
                       " WHERE store = 's001' AND period_start < '2026-12-04 00:00+00' ORDER BY 1")
    assert [(r["period_start"].astimezone(dt.UTC).isoformat(), r["footfall"], r["intervals"]) for r in ist] == [
        ("2026-12-03T08:30:00+00:00", 30, 2), ("2026-12-03T09:30:00+00:00", 32, 4),
        ("2026-12-03T10:30:00+00:00", 20, 2)]
    kir = rows(kpi_db, "SELECT period_start AT TIME ZONE 'Pacific/Kiritimati' AS local, footfall"
                       " FROM edge_kpi_store('day', 'Pacific/Kiritimati') WHERE store = 's002' ORDER BY 1")
    assert [(r["local"].isoformat(), r["footfall"]) for r in kir] == [
        ("2026-12-04T00:00:00", 120), ("2026-12-05T00:00:00", 128)]


def test_partial_rows_count_but_their_dwell_is_left_out(kpi_db: str) -> None:
    (d2,) = rows(kpi_db, "SELECT * FROM kpi_store_day WHERE store = 's002' AND period_start = '2026-12-04 00:00+00'")
    assert (d2["intervals"], d2["partial_rows"], d2["footfall"], d2["visits"]) == (5, 1, 128, 90)
    assert (d2["dwell_p50_s"], d2["dwell_stats_visits"]) == (840, 80)
    assert d2["dwell_0_5m"] == 10
    assert d2["conversion"] == pytest.approx(36 / 128)


def test_suppressed_cells_stay_null_and_malformed_fields_read_as_null(kpi_db: str) -> None:
    (quiet,) = rows(kpi_db, "SELECT * FROM kpi_store_day WHERE store = 's003'")
    assert (quiet["footfall"], quiet["footfall_suppressed"], quiet["conversion"]) == (None, 2, None)
    assert (quiet["dwell_p50_s"], quiet["suppressed"]) == (None, 4)
    (zone,) = rows(kpi_db, "SELECT * FROM kpi_zone_day WHERE store = 's003'")
    # peaks 0 and suppressed: the true peak is 1..k-1, unknown; it is not reported as 0
    assert (zone["occupancy_peak"], zone["occupancy_mean"], zone["suppressed_intervals"]) == (None, 0, 1)
    (bad,) = rows(kpi_db, "SELECT * FROM kpi_intervals WHERE store = 's001' AND ts = '2026-12-04 09:15+00'"
                          " AND footfall IS NULL")
    assert (bad["receipts"], bad["visits"], bad["occupancy"]) == (None, None, {"floor": [1, 2]})
    assert rows(kpi_db, "SELECT count(*) AS n FROM kpi_intervals WHERE store = 's001'")[0]["n"] == 13
    assert rows(kpi_db, "SELECT count(*) AS n FROM kpi_zone_hour WHERE store = 's001'"
                        " AND period_start = '2026-12-04 09:00+00'")[0]["n"] == 2  # the list is skipped


def test_retention_drops_day_partitions_under_the_views(kpi_db: str) -> None:
    """The views read the partitioned parent: dropping old days (retention) is not blocked by
    them, and the dropped days simply leave the rollups."""
    with psycopg.connect(kpi_db, autocommit=True) as conn:
        assert conn.execute("SELECT edge_drop_event_partitions('2026-12-04')").fetchone() == (1,)
    days = rows(kpi_db, "SELECT DISTINCT period_start::date AS d FROM kpi_store_day ORDER BY 1")
    assert [r["d"].isoformat() for r in days] == ["2026-12-04"]


def test_bad_arguments_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["report", "--dsn", "postgresql://nowhere/x", "--tenant", "acme", "--out", str(tmp_path / "r.html")]
    for extra, message in (
        (["--from", "2026-13-01", "--to", "2026-12-04"], "--from '2026-13-01': expected a date YYYY-MM-DD"),
        (["--from", "04.12.2026", "--to", "2026-12-04"], "expected a date YYYY-MM-DD"),
        (["--from", "2026-12-05", "--to", "2026-12-04"], "--to 2026-12-04 is before --from 2026-12-05"),
        (["--from", "2020-01-01", "--to", "2026-12-04"], "at most 366"),
        (["--from", "2026-12-04", "--to", "2026-12-04", "--tz", "Mars/Olympus"], "unknown time zone"),
        (["--from", "2026-12-04", "--to", "2026-12-04", "--store", "S<1>"], "not an id"),
    ):
        assert cloud_main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    day = ["--from", "2026-12-04", "--to", "2026-12-04"]
    assert cloud_main([*base[:-1], str(tmp_path), *day]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cloud_main([*base[:-1], str(tmp_path / "no" / "r.html"), *day]) == 2
    assert "its folder does not exist" in capsys.readouterr().err


def test_an_empty_range_is_a_page_saying_so(tmp_path: Path, kpi_db: str) -> None:
    out = tmp_path / "empty.html"
    assert cloud_main(["report", "--dsn", kpi_db, "--tenant", "acme", "--from", "2026-11-01",
                       "--to", "2026-11-02", "--out", str(out)]) == 0
    page = out.read_text()
    assert 'id="nodata"' in page
    assert "No analytics data for tenant acme, all stores, 2026-11-01 to 2026-11-02." in page


async def test_the_report_renders_every_chart_in_chromium_self_contained_and_clean(
    tmp_path: Path, kpi_db: str,
) -> None:
    out = tmp_path / "report.html"
    assert cloud_main(["report", "--dsn", kpi_db, "--tenant", "acme", "--from", "2026-12-03",
                       "--to", "2026-12-04", "--out", str(out)]) == 0
    html = out.read_text()
    assert PSEUDONYM.search(PSEUDONYM_TEXT)  # the scan would see it
    assert PSEUDONYM.search(html) is None
    assert IDENTIFIER.search(html) is None
    assert "<script" not in html
    assert "&lt;img src=&quot;https://evil.example/x.png&quot;&gt;" in html  # escaped, as text
    async with chromium(tmp_path) as ctx:
        page = await ctx.new_page()
        problems: list[str] = []
        requests: list[str] = []

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type in ("error", "warning"):
                problems.append(f"console {msg.type}: {msg.text}")

        def on_error(err: Error) -> None:
            problems.append(f"page error: {err}")

        def on_request(req: Request) -> None:
            requests.append(req.url)

        page.on("console", on_console)
        page.on("pageerror", on_error)
        page.on("request", on_request)
        await page.goto(out.as_uri())
        await page.wait_for_load_state("load")
        assert requests == [out.as_uri()]  # nothing but the file itself
        stores = await page.locator("section.store h2").all_inner_texts()
        assert stores == ["Store s001", "Store s002", "Store s003"]
        # every chart of a store with data has data; the quiet store's footfall is hatched, not zero
        for i in (0, 1):
            for chart in ("footfall-hour", "footfall-day", "conversion", "dwell", "zones"):
                assert await page.locator(f"#s{i}-{chart} [data-value]").count() > 0, (i, chart)
        assert await page.locator("#s0-footfall-hour rect.bar").count() == 3  # 3 hours with data
        assert await page.locator("#s0-footfall-day rect.bar").count() == 2
        assert await page.locator("#s0-dwell rect.bar").count() == 5
        assert await page.locator("#s0-zones rect.cell").count() == 2 * 2  # floor, till x 09h, 10h
        assert await page.locator("#s2-footfall-hour rect[data-suppressed]").count() == 1
        assert await page.locator("#s2-footfall-hour rect.bar").count() == 0
        assert await page.locator("#s2-zones rect.cell:not([data-suppressed])").count() == 1  # a published zero
        # the comparison: ranked by visitors (s002 248 > s001 77 + 60 > s003 suppressed)
        ranking = await page.locator("#comparison tbody tr").all_inner_texts()
        assert [r.split("\t")[:3] for r in ranking] == [["1", "s002", "248"], ["2", "s001", "137"], ["3", "s003", "—"]]
        for chart in ("cmp-visitors", "cmp-conversion", "cmp-dwell"):
            assert await page.locator(f"#{chart} rect[data-value]").count() == 2, chart
        assert await page.locator("#cmp-visitors rect[data-suppressed]").count() == 1
        assert await page.locator("#cmp-receipts rect[data-value]").count() == 3  # s003: a published 0
        # store x day: s001 and s002 on both days, s003 only on the 4th, and suppressed there
        assert await page.locator("#cmp-days rect.cell[data-value]").count() == 4
        assert await page.locator("#cmp-days rect.cell[data-suppressed]").count() == 2
        assert EVIL_ZONE[:14] in (await page.text_content("#s1-zones") or "")  # shown as text, truncated
        # the bound an unknown footfall leaves open: 2 NULL cells (one suppressed, one malformed) of
        # at most k-1 = 4 each, in each of s001 and s003
        assert "up to 8 more in suppressed intervals" in await page.inner_text("#store-0 .tiles")
        assert "up to 8 more in suppressed intervals" in await page.inner_text("#store-2 .tiles")
        text = await page.inner_text("body")
        assert PSEUDONYM.search(text) is None
        shot = os.environ.get("EDGE_REPORT_SCREENSHOT") or str(tmp_path / "report.png")
        await page.screenshot(path=shot, full_page=True)
        assert problems == []
