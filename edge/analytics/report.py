"""The published shapes: the `analytics.interval` event's data and the web page's snapshot.

Package-internal: reads `StoreAnalytics`' interval accumulators; every count goes through
`Cells` (k suppression, optional noise), so nothing leaves here below k. Groups of cells
that sum to a published total get complementary suppression (`_complement`), so no
suppressed cell can be recovered by subtraction. The snapshot is computed from published
interval rows only (sums and maxima of their cells), so it reveals nothing the events do
not. Field reference and what is and is not protected: docs/analytics.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.analytics.engine import BASKET_LABELS, DWELL_LABELS
from edge.analytics.publish import Cells

if TYPE_CHECKING:
    from edge.analytics.engine import StoreAnalytics, _Acc


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def dwell_min_n(k: int) -> int:
    """Dwell mean/p50/p90 are published only for at least this many visits: 2k, and at least
    10 so that the nearest-rank p90 is never the largest dwell (one person's)."""
    return max(2 * k, 10)


def _complement(
    c: Cells, total: int | None, parts: dict[str, int | None], keys: dict[str, str]
) -> tuple[int | None, dict[str, int | None]]:
    """Complementary suppression of `parts` (cells whose true values sum to `total`'s).

    When some parts are suppressed and the total is published, total - sum(published parts)
    is the sum of the suppressed ones: that residual must be >= k, else more parts are
    suppressed (the smallest published non-zero first) and, when none is left, the total.
    The residual is judged on the cells' noised values (`Cells.shown`), not the true counts.
    """
    if total is None or all(v is not None for v in parts.values()):
        return total, parts
    out = dict(parts)
    residual = sum(c.shown(keys[lab]) for lab, v in out.items() if v is None)
    while residual < c.k:
        left = sorted((v, lab) for lab, v in out.items() if v)
        if not left:
            c.hide()
            return None, out
        v, lab = left[0]
        out[lab] = None
        c.hide()
        residual += v
    return total, out


def _dwell(c: Cells, a: StoreAnalytics, values: list[float], visits: int | None) -> dict[str, float | None]:
    """mean/p50/p90 of the interval's dwell: only when `visits` (published) >= dwell_min_n(k);
    with epsilon, each noised by Laplace(clip / (n * epsilon)), clip = staff_after (no visit
    dwells longer: it becomes staff), and clamped to [0, clip]."""
    if visits is None or visits < dwell_min_n(c.k) or not values:
        return {"mean_s": None, "p50_s": None, "p90_s": None}
    clip = float(a.cfg.staff_after)
    s = sorted(min(v, clip) for v in values)
    eps = c.epsilon
    scale = clip / (visits * eps) if eps is not None else 0.0

    def out(x: float) -> float:
        return round(min(clip, max(0.0, x + c.laplace(scale))), 1) if scale else round(x, 1)

    return {"mean_s": out(sum(s) / len(s)), "p50_s": out(_pct(s, 0.5)), "p90_s": out(_pct(s, 0.9))}


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
    dkeys = {lab: f"dwell:{lab}" for lab in DWELL_LABELS}
    visits, buckets = _complement(c, visits, {lab: c.count(dkeys[lab], acc.buckets[i])
                                              for i, lab in enumerate(DWELL_LABELS)}, dkeys)
    dwell = _dwell(c, a, acc.dwell, visits)
    occupancy: dict[str, dict[str, float | int | None]] = {}
    n = len(acc.samples)
    for i, zone in enumerate(a.zones):
        col = [s[i] for s in acc.samples]
        peak = c.count(f"peak:{zone}", max(col, default=0))
        mean = c.level(f"mean:{zone}", sum(col) / n, peak) if n else None
        occupancy[zone] = {"mean": mean, "peak": peak if n else None}
    staff_col = [s[-1] for s in acc.samples]
    receipts = c.count("receipts", acc.receipts)
    bkeys = {lab: f"basket:{lab}" for lab in BASKET_LABELS}
    receipts, basket = _complement(c, receipts, {lab: c.count(bkeys[lab], acc.basket[i])
                                                 for i, lab in enumerate(BASKET_LABELS)}, bkeys)
    loyalty = c.count("receipts_loyalty", acc.loyalty)
    if receipts is not None and loyalty is not None and 0 < receipts - loyalty < c.k:
        loyalty = None  # receipts - loyalty (those without a card) would be a cell below k
        c.hide()
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
        "dwell_buckets": buckets,
        "occupancy": occupancy,
        "transitions": {k: c.count(f"tr:{k}", v) for k, v in sorted(acc.transitions.items())},
        "taps": {g: c.count(f"tap:{g}", v) for g, v in sorted(acc.taps.items())},
        "taps_other": c.count("taps_other", acc.taps_other),
        "receipts": receipts,
        "receipts_loyalty": loyalty,
        "basket": basket,
        "conversion": _conversion(receipts, footfall),
        "staff": c.count("staff", max(staff_col, default=0)),
        "staff_new": c.count("staff_new", acc.staff_new),
        "rotations": c.count("rotations", acc.rotations),
    }
    row["suppressed"] = c.suppressed - before
    return row


def _snapshot_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("start", "end", "footfall", "receipts", "conversion", "dwell", "occupancy")}


def _day_sum(accs: list[_Acc], key: str, value: Callable[[dict[str, Any]], int | None], k: int) -> int:
    """A day total from published interval cells: the published ones summed, plus the
    suppressed ones pooled and added only in whole multiples of k (their noised values,
    `Cells.shown`). Exact up to k-1 below; differencing it against the intervals, or one
    poll against a later one, shows at most that the pool crossed a multiple of k."""
    published, pool = 0, 0
    for acc in accs:
        v = value(acc.row or {})
        if v is not None:
            published += v
        elif acc.cells is not None:
            pool += acc.cells.shown(key)
    return published + pool // k * k


def snapshot(a: StoreAnalytics) -> dict[str, Any]:
    """The web page's view of today (contract in docs/analytics.md).

    Only today's closed (published) intervals: the open one is not shown, so two polls never
    differ by a live change. Totals and the histogram are built from the published interval
    cells (`_day_sum`) and `staff` is their maximum: post-processing of what the events
    publish, so they add no fresh noise draw to average and no exact small difference.
    """
    today = a._today()
    accs = sorted((acc for acc in a._closed if acc.day == today and acc.row is not None), key=lambda x: x.start)
    rows = [acc.row or {} for acc in accs]
    k = a.cfg.k
    footfall = max(0, _day_sum(accs, "footfall", lambda r: r["footfall"], k)
                   - _day_sum(accs, "staff_new", lambda r: r["staff_new"], k))
    receipts = _day_sum(accs, "receipts", lambda r: r["receipts"], k)
    staff = [r["staff"] for r in rows if r["staff"] is not None]

    def bucket(lab: str) -> Callable[[dict[str, Any]], int | None]:
        return lambda r: r["dwell_buckets"][lab]

    return {
        "interval_s": round(a.cfg.interval),
        "day": today.isoformat(),
        "k": k,
        "zones": list(a.zones),
        "intervals": [_snapshot_row(r) for r in rows],
        "dwell_histogram": [{"bucket": lab, "visits": _day_sum(accs, f"dwell:{lab}", bucket(lab), k)}
                            for lab in DWELL_LABELS],
        "totals": {
            "footfall": footfall,
            "receipts": receipts,
            "conversion": _conversion(receipts, footfall),
            "staff": max(staff, default=0),
        },
        "suppressed": a.suppressed_today,
    }
