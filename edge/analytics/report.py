"""The published shapes: the `analytics.interval` event's data and the web page's snapshot.

Package-internal: reads `StoreAnalytics`' interval accumulators; every count goes through
`Cells` (k suppression, optional noise), so nothing leaves here below k. Field reference:
docs/analytics.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edge.analytics.engine import BASKET_LABELS, DWELL_LABELS
from edge.analytics.publish import Cells

if TYPE_CHECKING:
    from edge.analytics.engine import StoreAnalytics, _Acc


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _conversion(receipts: int | None, footfall: int | None) -> float | None:
    if receipts is None or footfall is None or footfall <= 0:
        return None
    return round(receipts / footfall, 4)


def interval_row(a: StoreAnalytics, acc: _Acc, *, partial: bool) -> dict[str, Any]:
    """The data of one `analytics.interval` event (also the source of the snapshot rows)."""
    c = acc.cells if acc.cells is not None else Cells(a.cfg.k, a.cfg.epsilon, a._rng)
    before = c.suppressed
    footfall = c.count("footfall", max(0, acc.footfall))
    visits = c.count("visits", len(acc.dwell))
    dwell: dict[str, float | None] = {"mean_s": None, "p50_s": None, "p90_s": None}
    if visits and acc.dwell:  # published only when the visits behind them are (>= k)
        s = sorted(acc.dwell)
        dwell = {"mean_s": round(sum(s) / len(s), 1), "p50_s": round(_pct(s, 0.5), 1),
                 "p90_s": round(_pct(s, 0.9), 1)}
    occupancy: dict[str, dict[str, float | int | None]] = {}
    n = len(acc.samples)
    for i, zone in enumerate(a.zones):
        col = [s[i] for s in acc.samples]
        peak = c.count(f"peak:{zone}", max(col, default=0))
        mean = c.level(f"mean:{zone}", sum(col) / n, peak) if n else None
        occupancy[zone] = {"mean": mean, "peak": peak if n else None}
    staff_col = [s[-1] for s in acc.samples]
    receipts = c.count("receipts", acc.receipts)
    row: dict[str, Any] = {
        "start": acc.start,
        "end": acc.end,
        "interval_s": round(a.cfg.interval),
        "k": a.cfg.k,
        "epsilon": a.cfg.epsilon,
        "partial": partial,
        "footfall": footfall,
        "visits": visits,
        "dwell": dwell,
        "dwell_buckets": {lab: c.count(f"dwell:{lab}", acc.buckets[i]) for i, lab in enumerate(DWELL_LABELS)},
        "occupancy": occupancy,
        "transitions": {k: c.count(f"tr:{k}", v) for k, v in sorted(acc.transitions.items())},
        "taps": {g: c.count(f"tap:{g}", v) for g, v in sorted(acc.taps.items())},
        "taps_other": c.count("taps_other", acc.taps_other),
        "receipts": receipts,
        "receipts_loyalty": c.count("receipts_loyalty", acc.loyalty),
        "basket": {lab: c.count(f"basket:{lab}", acc.basket[i]) for i, lab in enumerate(BASKET_LABELS)},
        "conversion": _conversion(receipts, footfall),
        "staff": c.count("staff", max(staff_col, default=0)),
        "staff_new": c.count("staff_new", acc.staff_new),
        "rotations": c.count("rotations", acc.rotations),
    }
    row["suppressed"] = c.suppressed - before
    return row


def _snapshot_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("start", "end", "footfall", "receipts", "conversion", "dwell", "occupancy")}


def snapshot(a: StoreAnalytics) -> dict[str, Any]:
    """The web page's view of today (contract in docs/analytics.md)."""
    today = a._today()
    closed = [acc for acc in a._closed if acc.day == today and acc.row is not None]
    live = [acc for acc in a._open.values() if acc.day == today]
    rows = []
    suppressed = a.suppressed_today
    for acc in closed:
        rows.append(_snapshot_row(acc.row or {}))
    for acc in live:
        row = interval_row(a, acc, partial=True)
        suppressed += row["suppressed"]
        rows.append(_snapshot_row(row))
    rows.sort(key=lambda r: r["start"])
    every = closed + live
    day = a._day_cells()
    before = day.suppressed
    buckets = [sum(acc.buckets[i] for acc in every) for i in range(len(DWELL_LABELS))]
    footfall = day.count("footfall", max(0, sum(acc.footfall - acc.staff_new for acc in every)))
    receipts = day.count("receipts", sum(acc.receipts for acc in every))
    doc = {
        "interval_s": round(a.cfg.interval),
        "day": today.isoformat(),
        "k": a.cfg.k,
        "zones": list(a.zones),
        "intervals": rows,
        "dwell_histogram": [{"bucket": lab, "visits": day.count(f"dwell:{lab}", buckets[i])}
                            for i, lab in enumerate(DWELL_LABELS)],
        "totals": {
            "footfall": footfall,
            "receipts": receipts,
            "conversion": _conversion(receipts, footfall),
            "staff": day.count("staff", a._staff_peak_today),
        },
    }
    doc["suppressed"] = suppressed + day.suppressed - before
    day.suppressed = before
    return doc
