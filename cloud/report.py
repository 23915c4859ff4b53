"""`edge-cloud report`: one self-contained HTML page of store KPIs over a date range.

The figures come from the KPI rollups of migration 0002 (`edge_kpi_store`, `edge_kpi_zone`: the
functions behind the kpi_* views, here with the report's time zone so days are the stores'
local days). Only hour rows are read (one scan for the stores, one for the zones); a day's and
the range's figures combine them with the rules the rollups use for intervals (sums of
published cells, visit-weighted dwell figures, conversion over the intervals where receipts
and footfall were both published), which is exact: a day of hours equals the day rollup.
Nothing suppressed at the edge is filled in: a NULL stays a hatched cell or a dash.

The page is one file: inline CSS (the store page's stylesheet, edge/web/static/style.css, plus
a few report rules), inline SVG drawn by cloud/report_svg.py, no script, no external URL, and a
Content-Security-Policy that forbids loading anything. Every text from the database is escaped.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

from cloud.report_svg import bar_chart, esc, fmt_int, fmt_min, fmt_pct, hbar_chart, heatmap, line_chart

Row = dict[str, Any]
DWELL_COLUMNS = (("0-5m", "dwell_0_5m"), ("5-15m", "dwell_5_15m"), ("15-30m", "dwell_15_30m"),
                 ("30-60m", "dwell_30_60m"), ("60m+", "dwell_60m_plus"))
_STORE_SQL = ("SELECT * FROM edge_kpi_store(%s, %s, %s, %s) WHERE tenant = %s AND (%s::text IS NULL OR store = %s)"
              " ORDER BY store, period_start")
_ZONE_SQL = ("SELECT * FROM edge_kpi_zone('hour', %s, %s, %s) WHERE tenant = %s AND (%s::text IS NULL OR store = %s)"
             " ORDER BY store, zone, period_start")


@dataclass(slots=True)
class StoreData:
    store: str
    hours: list[Row] = field(default_factory=list)
    zone_hours: list[Row] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    tenant: str
    store: str | None
    day_from: dt.date
    day_to: dt.date
    tz: str
    stores: list[StoreData]
    generated: dt.datetime


def bounds(day_from: dt.date, day_to: dt.date, tz: str) -> tuple[dt.datetime, dt.datetime]:
    """[local midnight of day_from, local midnight after day_to) as aware datetimes."""
    z = ZoneInfo(tz)
    return (dt.datetime.combine(day_from, dt.time(), z),
            dt.datetime.combine(day_to + dt.timedelta(days=1), dt.time(), z))


def load(conn: psycopg.Connection[Any], *, tenant: str, store: str | None, day_from: dt.date,
         day_to: dt.date, tz: str) -> Report:
    lo, hi = bounds(day_from, day_to, tz)
    by: dict[str, StoreData] = {}

    def of(name: str) -> StoreData:
        return by.setdefault(name, StoreData(name))

    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(_STORE_SQL, ("hour", tz, lo, hi, tenant, store, store)).fetchall():
            of(row["store"]).hours.append(row)
        for row in cur.execute(_ZONE_SQL, (tz, lo, hi, tenant, store, store)).fetchall():
            of(row["store"]).zone_hours.append(row)
    return Report(tenant, store, day_from, day_to, tz, [by[k] for k in sorted(by)],
                  dt.datetime.now(dt.UTC))


# -- combining periods -----------------------------------------------------------------------

def _sum(rows: list[Row], col: str) -> int | None:
    vals = [int(r[col]) for r in rows if r[col] is not None]
    return sum(vals) if vals else None


def _weighted(rows: list[Row], col: str) -> float | None:
    pairs = [(float(r[col]), int(r["dwell_stats_visits"])) for r in rows
             if r[col] is not None and r["dwell_stats_visits"]]
    n = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / n if n else None


def totals(rows: list[Row]) -> dict[str, Any]:
    """The figures of a day or the range from its hour rows, combined like the rollups combine
    intervals (so a day's equal the day view's: tests/test_cloud_report.py checks it)."""
    footfall, staff_new = _sum(rows, "footfall"), _sum(rows, "staff_new")
    conv_r, conv_f = _sum(rows, "conv_receipts"), _sum(rows, "conv_footfall")
    return {
        "footfall": footfall,
        "visitors": None if footfall is None else max(0, footfall - (staff_new or 0)),
        "receipts": _sum(rows, "receipts"),
        "conversion": conv_r / conv_f if conv_r is not None and conv_f else None,
        "dwell_mean_s": _weighted(rows, "dwell_mean_s"),
        "dwell_p50_s": _weighted(rows, "dwell_p50_s"),
        "dwell_p90_s": _weighted(rows, "dwell_p90_s"),
        "buckets": [(lab, _sum(rows, col)) for lab, col in DWELL_COLUMNS],
        "suppressed": _sum(rows, "suppressed") or 0,
        # each suppressed footfall cell held 1..k-1 visits: how far above the sum the truth may be
        "footfall_hidden_max": sum(int(r["footfall_suppressed"]) * max(0, int(r["k"] or 1) - 1) for r in rows),
        "partial_rows": _sum(rows, "partial_rows") or 0,
    }


# -- the page --------------------------------------------------------------------------------

_EXTRA_CSS = """
.report-head { padding: 16px 24px; }
.store { margin-top: 28px; border-top: 2px solid var(--line); }
.store h2 { font-size: 20px; }
.tiles { grid-template-columns: repeat(5, minmax(0, 1fr)); }
.tile-value { font-size: 26px; }
.rank { font-weight: 650; }
.nodata { margin: 40px 24px; font-size: 18px; }
@media print { .card, .tile { break-inside: avoid; } }
"""
_HATCH = ('<svg class="defs" width="0" height="0" aria-hidden="true"><defs><pattern id="hatch" width="6" height="6"'
          ' patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#eef1f4"/>'
          '<line x1="0" y1="0" x2="0" y2="6" stroke="#c9d0d8" stroke-width="3"/></pattern></defs></svg>')
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def _css() -> str:
    base = resources.files("edge.web").joinpath("static/style.css").read_text(encoding="utf-8")
    return base + _EXTRA_CSS


def _figure(caption: str, svg: str, *, wide: bool = False) -> str:
    return f'<figure class="card{" card-wide" if wide else ""}"><figcaption>{esc(caption)}</figcaption>{svg}</figure>'


def _tile(label: str, value: str, note: str = "") -> str:
    n = f'<div class="tile-note">{esc(note)}</div>' if note else ""
    return (f'<div class="tile"><div class="tile-label">{esc(label)}</div>'
            f'<div class="tile-value">{esc(value)}</div>{n}</div>')


def by_day(hours: list[Row], tz: str) -> list[tuple[dt.date, dict[str, Any]]]:
    """Each local day's totals: hours nest in the local days they were truncated in."""
    z = ZoneInfo(tz)
    days: dict[dt.date, list[Row]] = defaultdict(list)
    for r in hours:
        days[r["period_start"].astimezone(z).date()].append(r)
    return [(d, totals(days[d])) for d in sorted(days)]


def _store_section(idx: int, sd: StoreData, rep: Report) -> str:
    z = ZoneInfo(rep.tz)
    t = totals(sd.hours)
    days = by_day(sd.hours, rep.tz)
    one_day = rep.day_from == rep.day_to

    def hour_label(r: Row) -> str:
        local: dt.datetime = r["period_start"].astimezone(z)
        return local.strftime("%H:00") if one_day else local.strftime("%d %H:00")

    hl = [hour_label(r) for r in sd.hours]
    dl = [d.strftime("%a %d %b") for d, _ in days]
    # heatmap: zone x hour of day, the mean of the hours' published means over the range
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    hours_of_day = sorted({r["period_start"].astimezone(z).hour for r in sd.hours})
    zones = sorted({r["zone"] for r in sd.zone_hours})
    for r in sd.zone_hours:
        if r["occupancy_mean"] is not None:
            acc[(r["zone"], r["period_start"].astimezone(z).hour)].append(float(r["occupancy_mean"]))
    cells = [[(sum(v) / len(v)) if (v := acc.get((zone, h))) else None for h in hours_of_day] for zone in zones]
    hist = t["buckets"]
    sid = f"s{idx}"
    charts = "".join([
        _figure("Visitors per hour", bar_chart(f"{sid}-footfall-hour", "visitors per hour", hl,
                                               [r["footfall"] for r in sd.hours], unit="visitors")),
        _figure("Visitors per day", bar_chart(f"{sid}-footfall-day", "visitors per day", dl,
                                              [t_day["visitors"] for _, t_day in days], unit="visitors",
                                              value_labels=True)),
        _figure("Conversion per hour (receipts ÷ visitors)",
                line_chart(f"{sid}-conversion", "conversion per hour", hl, [r["conversion"] for r in sd.hours])),
        _figure("Time spent in store", bar_chart(f"{sid}-dwell", "dwell time histogram", [b for b, _ in hist],
                                                 [v for _, v in hist], unit="visits", bar_class="bar-dwell",
                                                 value_labels=True)),
        _figure("People in each zone (average by hour of day)",
                heatmap(f"{sid}-zones", "occupancy per zone", [f"{h:02d}:00" for h in hours_of_day], zones, cells,
                        width=1200),
                wide=True),
    ])
    notes = [f"{fmt_int(t['suppressed'])} cells suppressed by the edge (fewer than k people) are left out"
             " (hatched); sums are of the published cells."]
    if t["partial_rows"]:
        notes.append(f"{t['partial_rows']} interval(s) were cut short by a device restart: footfall around a"
                     " restart counts the visitors present twice.")
    tiles = "".join([
        _tile("Visitors", fmt_int(t["visitors"]),
              f"staff excluded; up to {fmt_int(t['footfall_hidden_max'])} more in suppressed intervals"
              if t["footfall_hidden_max"] else "staff and fixed devices excluded"),
        _tile("Receipts", fmt_int(t["receipts"])),
        _tile("Conversion", fmt_pct(t["conversion"])),
        _tile("Median dwell", fmt_min(t["dwell_p50_s"]), "visit-weighted mean of interval medians"),
        _tile("Dwell p90", fmt_min(t["dwell_p90_s"])),
    ])
    return (f'<section class="store" id="store-{idx}" data-store-index="{idx}"><h2>Store {esc(sd.store)}</h2>'
            f'<div class="tiles">{tiles}</div><div class="charts">{charts}</div>'
            + "".join(f'<p class="note">{esc(n)}</p>' for n in notes) + "</section>")


def _comparison(rep: Report) -> str:
    rows = [(sd.store, totals(sd.hours)) for sd in rep.stores]
    ranked = sorted(rows, key=lambda x: (x[1]["visitors"] is None, -(x[1]["visitors"] or 0), x[0]))
    body = []
    for rank, (name, t) in enumerate(ranked, 1):
        body.append(f'<tr><td class="num rank">{rank}</td><td>{esc(name)}</td>'
                    f'<td class="num">{fmt_int(t["visitors"])}</td>'
                    f'<td class="num">{fmt_int(t["receipts"])}</td><td class="num">{fmt_pct(t["conversion"])}</td>'
                    f'<td class="num">{fmt_min(t["dwell_p50_s"])}</td><td class="num">{fmt_min(t["dwell_mean_s"])}</td>'
                    f'<td class="num">{fmt_int(t["suppressed"])}</td></tr>')
    names = [n for n, _ in ranked]
    table = ('<table id="comparison"><thead><tr><th class="num">Rank</th><th>Store</th><th class="num">Visitors</th>'
             '<th class="num">Receipts</th><th class="num">Conversion</th><th class="num">Median dwell</th>'
             '<th class="num">Mean dwell</th><th class="num">Suppressed cells</th></tr></thead><tbody>'
             + "".join(body) + "</tbody></table>")
    per_day = {sd.store: {d: t["visitors"] for d, t in by_day(sd.hours, rep.tz)} for sd in rep.stores}
    days = sorted({d for v in per_day.values() for d in v})
    grid = heatmap("cmp-days", "visitors per store and day", [d.strftime("%d %b") for d in days],
                   names, [[per_day[n].get(d) for d in days] for n in names], width=1200, row_height=22,
                   unit="visitors", noun="visitors", digits=0)
    charts = "".join([
        _figure("Visitors", hbar_chart("cmp-visitors", "visitors per store", names,
                                       [t["visitors"] for _, t in ranked], fmt=fmt_int)),
        _figure("Conversion", hbar_chart("cmp-conversion", "conversion per store", names,
                                         [t["conversion"] for _, t in ranked], fmt=fmt_pct)),
        _figure("Median dwell", hbar_chart("cmp-dwell", "median dwell per store", names,
                                           [t["dwell_p50_s"] for _, t in ranked], fmt=fmt_min, bar_class="bar-dwell")),
        _figure("Receipts", hbar_chart("cmp-receipts", "receipts per store", names,
                                       [t["receipts"] for _, t in ranked], fmt=fmt_int)),
        _figure("Visitors per day, by store (ranked as above)", grid, wide=True),
    ])
    return (f'<section id="compare"><h2>Stores compared</h2><div class="card">{table}</div>'
            f'<div class="charts">{charts}</div></section>')


def render(rep: Report) -> str:
    scope = f"store {rep.store}" if rep.store else "all stores"
    span = rep.day_from.isoformat() if rep.day_from == rep.day_to else f"{rep.day_from} to {rep.day_to}"
    title = f"Store KPIs · {rep.tenant} · {span}"
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="referrer" content="no-referrer">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_css()}</style></head><body>{_HATCH}")
    header = (f'<header><div class="title"><h1>Store KPIs</h1><span class="muted">tenant {esc(rep.tenant)} · '
              f'{esc(scope)} · {esc(span)} ({esc(rep.tz)})</span></div>'
              f'<div class="muted">generated {esc(rep.generated.strftime("%Y-%m-%d %H:%M UTC"))}</div></header>')
    if not rep.stores:
        main = (f'<p class="nodata" id="nodata">No analytics data for tenant {esc(rep.tenant)}, {esc(scope)},'
                f" {esc(span)}.</p>")
    else:
        main = "".join([_comparison(rep) if len(rep.stores) > 1 else "",
                        *(_store_section(i, sd, rep) for i, sd in enumerate(rep.stores))])
    foot = ('<footer class="muted">Only counts published by the stores are shown; any figure from fewer than k people'
            ' was suppressed at the store and stays hidden (hatched). store-edge</footer>')
    return f"{head}{header}<main>{main}</main>{foot}</body></html>\n"
