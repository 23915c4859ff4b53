"""Analytics accuracy against a simulated store's ground truth, and the BLE cost with analytics on.

    .venv/bin/python scripts/bench_analytics.py                   # a day: 1,200 shoppers, 6 staff, 10 fixed
    .venv/bin/python scripts/bench_analytics.py --shoppers 2000 --seed 2

A day of hil/store/sim.py (04:00-21:00, open 08:00-20:00) at a fast clock through the edge's
real code (hil/store/edge.py: BleProcessor -> card scrub -> normalize -> privacy ->
AnalyticsSink -> StoreAnalytics, aggregate mode), with rotation inference on and off over the
same events. Printed per KPI: the edge's published figure against the truth.

- footfall: the day's published total (visits started minus visits that became staff) vs
  the number of shoppers; with rotation correction on and off;
- dwell p50/p90: per interval, mean absolute error over intervals where the edge published
  them, against the truth of the shoppers whose visit ended in that interval;
- zone occupancy: mean per zone over opening hours, and per-interval mean absolute error;
- conversion: receipts / footfall, in points.

Then the BLE figure: adverts per CPU-second through the processing path with presence and
pseudonyms (the baseline, as scripts/bench_ble.py (b)) and the same with analytics and the
zone events on, over the same recorded adverts, in this run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.ble.config import Ble  # after the path set-up
from drivers.ble.processor import BleProcessor
from edge.config import Privacy
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from hil.store.edge import DAY0_MS, StoreEdge
from hil.store.sim import ZONES, StoreDay, Truth

TARGET_ADVERTS = 50_000.0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, int(-(-q * len(s) // 1)) - 1)]


def _dwell_errors(rows: list[dict[str, Any]], truth: Truth) -> tuple[float, float, int]:
    ends: dict[int, list[float]] = {}
    for s, e in truth.visits:
        ends.setdefault(int(e) // truth.interval_s, []).append(e - s)
    e50, e90 = [], []
    for r in rows:
        i = (r["start"] - DAY0_MS) // 1000 // truth.interval_s
        t = ends.get(i)
        if r["dwell"]["p50_s"] is None or not t or len(t) < 5:
            continue
        e50.append(abs(r["dwell"]["p50_s"] - _pct(t, 0.5)))
        e90.append(abs(r["dwell"]["p90_s"] - _pct(t, 0.9)))
    return statistics.fmean(e50), statistics.fmean(e90), len(e50)


def _occupancy(rows: list[dict[str, Any]], truth: Truth, day: StoreDay) -> list[tuple[str, float, float, float]]:
    out = []
    for z in ZONES:
        edge, real, errs = [], [], []
        for r in rows:
            i = (r["start"] - DAY0_MS) // 1000 // truth.interval_s
            if not day.open <= i * truth.interval_s < day.close:
                continue
            m = r["occupancy"][z]["mean"]
            t = statistics.fmean(truth.occupancy[i][z]) if i in truth.occupancy else 0.0
            real.append(t)
            if m is not None:
                edge.append(m)
                errs.append(abs(m - t))
        out.append((z, statistics.fmean(edge) if edge else float("nan"), statistics.fmean(real),
                    statistics.fmean(errs) if errs else float("nan")))
    return out


def accuracy(args: argparse.Namespace, state: Path) -> bool:
    day = StoreDay(seed=args.seed, shoppers=args.shoppers, staff=args.staff, fixed=args.fixed)
    edge = StoreEdge(state, k=args.k, rotation_rssi=args.rotation_rssi)
    c0, w0 = time.process_time(), time.perf_counter()
    truth = day.run(edge.feed, edge.second)
    edge.clock.wall += 3600_000  # let the last intervals settle
    edge.second((edge.clock.wall - DAY0_MS) / 1000)
    snap = {n: a.snapshot() for n, a in edge.analytics.items()}
    edge.finish()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    ff_true = truth.footfall()
    rec_true = len(truth.receipts)
    print(f"simulated day: {args.shoppers} shoppers, {args.staff} staff, {args.fixed} fixed devices, seed {args.seed},"
          f" k={args.k}; {edge.adverts:,} adverts, {truth.rotations:,} address rotations, {truth.taps} taps,"
          f" {rec_true} receipts; {wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"{'KPI':<34}{'edge':>12}{'truth':>12}{'error':>12}")
    ok: bool = True
    for name in ("rotation", "no-rotation"):
        ff = snap[name]["totals"]["footfall"] or 0
        err = (ff - ff_true) / ff_true * 100
        print(f"{'footfall, rotation ' + ('on' if name == 'rotation' else 'off'):<34}{ff:>12,}{ff_true:>12,}"
              f"{err:>+11.1f}%")
        if name == "rotation":
            ok &= abs(err) <= 5.0
    t = snap["rotation"]["totals"]
    conv_true = rec_true / ff_true
    conv = t["conversion"] or 0.0
    print(f"{'conversion (points)':<34}{conv * 100:>12.1f}{conv_true * 100:>12.1f}{(conv - conv_true) * 100:>+12.1f}")
    ok &= abs(conv - conv_true) * 100 <= 2.0
    print(f"{'receipts':<34}{t['receipts'] or 0:>12,}{rec_true:>12,}")
    print(f"{'staff + fixed devices (peak)':<34}{t['staff'] or 0:>12,}{truth.staff + truth.fixed:>12,}")
    rows = edge.rows("rotation")
    e50, e90, n = _dwell_errors(rows, truth)
    print(f"{'dwell p50, mean abs error':<34}{'':>24}{e50:>11.0f}s   over {n} intervals")
    print(f"{'dwell p90, mean abs error':<34}{'':>24}{e90:>11.0f}s")
    all_true = [e - s for s, e in truth.visits]
    hist = {b["bucket"]: b["visits"] for b in snap["rotation"]["dwell_histogram"]}
    print(f"{'dwell p50 / p90 of the day (truth)':<34}{'':>12}{_pct(all_true, 0.5):>8.0f}/{_pct(all_true, 0.9):.0f}s"
          f"   edge histogram {hist}")
    for z, m, r, mae in _occupancy(rows, truth, day):
        rel = (m - r) / r * 100 if r else float("nan")
        print(f"{'occupancy ' + z + ' (mean, open hours)':<34}{m:>12.1f}{r:>12.1f}{rel:>+11.1f}%"
              f"   per-interval mean abs error {mae:.1f}")
    print(f"suppressed cells (k={args.k}) in the day's intervals: {sum(r['suppressed'] for r in rows)};"
          f" intervals published: {len(rows)}")
    print(f"targets: footfall within 5 %, conversion within 2 points: {'met' if ok else 'NOT met'}")
    return ok


def throughput(state: Path, n: int) -> bool:
    """Adverts per CPU-second over scripts/bench_ble.py's crowd (manufacturer data, beacons,
    garbage; 5,000 adverts per store second): its path (b) (decode + beacons + presence +
    pseudonyms) as the baseline, then the same with zone events, the pipeline's stages and
    analytics (two instances) on every reading, over the same adverts."""
    spec = importlib.util.spec_from_file_location("bench_ble", Path(__file__).with_name("bench_ble.py"))
    if spec is None or spec.loader is None:
        raise RuntimeError("scripts/bench_ble.py not found")
    bench_ble: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ble)
    STORE_RATE = bench_ble.STORE_RATE
    crowd = bench_ble.Crowd(500, dwell_s=20.0, rotate_s=60.0)
    adverts = [crowd.advert(i / STORE_RATE) for i in range(n)]
    rates = {}
    for label, with_analytics in (("bench_ble (b): presence + pseudonyms", False), ("+ pipeline + analytics", True)):
        edge = StoreEdge(state)
        presence = dict(edge.ble.presence.model_dump()) | {"exit_after": 10, "zone_events": with_analytics}
        proc = BleProcessor(Ble.model_validate({"backend": "bleak", "presence": presence}), 0.0)
        process = edge.pipeline.process
        put: Callable[[Any], bool] = edge.pipeline._sink.put_nowait
        pseudo = Pseudonymizer(Privacy(), KeyStore(state / "keys", edge.clock), None).pseudonym
        clock = edge.clock
        per_tick = int(STORE_RATE)
        c0 = time.process_time()
        for i, (address, rssi, mfr, svc) in enumerate(adverts):
            t = i / STORE_RATE
            wall = DAY0_MS + int(t * 1000)
            clock.wall = wall
            out = proc.advert(address, rssi, mfr, svc, t, wall)
            tick = i % per_tick == 0
            rs = [*out, *proc.tick(t, wall)] if tick else out
            for r in rs:
                if with_analytics:
                    p = process(r)
                    if p is not None:
                        put(p)
                else:
                    for ident in r.ids.values():
                        pseudo(ident)
            if tick and with_analytics:
                for a in edge.analytics.values():
                    a.tick()
        rates[label] = len(adverts) / (time.process_time() - c0)
    base, got = rates.values()
    for label, rate in rates.items():
        print(f"{label:<44}{rate:>12,.0f} adverts/CPU-s")
    print(f"with analytics: {got / base * 100:.0f} % of the baseline; target >= {TARGET_ADVERTS:,.0f}/CPU-s: "
          f"{'met' if got >= TARGET_ADVERTS else 'NOT met'}")
    return got >= TARGET_ADVERTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoppers", type=int, default=1200)
    ap.add_argument("--staff", type=int, default=6)
    ap.add_argument("--fixed", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rotation-rssi", type=int, default=None, help="analytics.rotation_rssi (default: the config's)")
    ap.add_argument("--no-throughput", action="store_true", help="accuracy only")
    ap.add_argument("--adverts", type=int, default=300_000, help="adverts for the throughput figure")
    args = ap.parse_args()
    from edge.logs import configure_logging

    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        ok = accuracy(args, Path(tmp))
        if not args.no_throughput:
            print()
            ok &= throughput(Path(tmp), args.adverts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
