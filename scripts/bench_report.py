"""Cloud KPI views and `edge-cloud report` over a chain's worth of simulated store days.

    .venv/bin/python scripts/bench_report.py                      # 20 stores x 30 days
    .venv/bin/python scripts/bench_report.py --stores 50 --days 30 --shoppers 600

One simulated store day (hil/store/sim.py through the edge's real analytics, as
scripts/bench_analytics.py runs it) gives the day's `analytics.interval` rows; they are copied to
N stores x D days (shifted in time, footfall-like cells scaled per store so the stores differ)
into a fresh local PostgreSQL (migrations applied, COPY into `events`). Printed: the rows stored,
the day's footfall of s000 (unscaled) from kpi_store_day against the edge's own snapshot total and the simulated
truth, then the time of `edge-cloud report` for all stores (and for one store) and the page size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # after the path set-up

from cloud.cli import main as cloud_main
from cloud.cluster.postgres import LocalPostgres
from cloud.cluster.procs import free_port
from cloud.db.migrate import migrate
from cloud.report import load, render
from hil.store.edge import DAY0_MS, StoreEdge
from hil.store.sim import StoreDay

COUNTS = ("footfall", "visits", "receipts", "receipts_loyalty")


def simulate(args: argparse.Namespace, state: Path) -> tuple[list[dict[str, Any]], int | None, int]:
    day = StoreDay(seed=args.seed, shoppers=args.shoppers)
    edge = StoreEdge(state)
    truth = day.run(edge.feed, edge.second)
    edge.clock.wall += 3600_000  # let the last intervals settle
    edge.second((edge.clock.wall - DAY0_MS) / 1000)
    total = edge.analytics["rotation"].snapshot()["totals"]["footfall"]
    edge.finish()
    return edge.rows("rotation"), total, truth.footfall()


def scaled(row: dict[str, Any], shift_ms: int, f: float) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(row))
    out["start"] += shift_ms
    out["end"] += shift_ms
    for key in COUNTS:
        if out.get(key) is not None:
            out[key] = round(out[key] * f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=int, default=20)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--shoppers", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-report-", dir="/tmp"))
    base.chmod(0o755)  # the server's unprivileged user must reach its folder
    pg = LocalPostgres(base / "pg", port=free_port(), password=secrets.token_hex(12),
                       settings={"fsync": "off", "synchronous_commit": "off"})
    try:
        t0 = time.perf_counter()
        rows, edge_total, truth = simulate(args, base)
        print(f"simulated day: {len(rows)} interval rows, {time.perf_counter() - t0:.1f} s")
        pg.init(sync=False)
        pg.start()
        migrate(pg.dsn)
        day0 = dt.datetime.fromtimestamp(DAY0_MS / 1000, dt.UTC)
        t0 = time.perf_counter()
        n = 0
        with psycopg.connect(pg.dsn) as conn:
            conn.execute("SELECT edge_ensure_event_partitions(%s, %s)",
                         (day0, day0 + dt.timedelta(days=args.days + 1)))
            with conn.cursor().copy("COPY events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
                                    " FROM STDIN") as copy:
                for s in range(args.stores):
                    f = 1.0 if s == 0 else 0.6 + 0.8 * s / max(1, args.stores - 1)  # s000 as simulated
                    for d in range(args.days):
                        for r in rows:
                            data = scaled(r, d * 86_400_000, f)
                            n += 1
                            copy.write_row(("acme", f"s{s:03d}", "edge-01", 1, n, n,
                                            dt.datetime.fromtimestamp(data["end"] / 1000, dt.UTC), data["end"],
                                            "edge", "analytics.interval", json.dumps(data)))
            conn.execute("ANALYZE events")
            got = conn.execute("SELECT footfall, staff_new FROM kpi_store_day WHERE store = %s AND period_start = %s",
                               ("s000", day0)).fetchone()
        print(f"stored {n:,} analytics.interval events ({args.stores} stores x {args.days} days) in"
              f" {time.perf_counter() - t0:.1f} s")
        if got is not None:
            print(f"day footfall: view {got[0]} - staff_new {got[1]} = {(got[0] or 0) - (got[1] or 0)};"
                  f" edge snapshot {edge_total}; simulated truth {truth}")
        last = (day0 + dt.timedelta(days=args.days - 1)).date().isoformat()
        with psycopg.connect(pg.dsn) as conn:
            t0 = time.perf_counter()
            rep = load(conn, tenant="acme", store=None, day_from=day0.date(),
                       day_to=day0.date() + dt.timedelta(days=args.days - 1), tz="UTC")
            t1 = time.perf_counter()
            render(rep)
            print(f"of which: queries {t1 - t0:.2f} s, rendering {time.perf_counter() - t1:.2f} s"
                  f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        for scope in ([], ["--store", "s000"]):
            out = base / "report.html"
            t0 = time.perf_counter()
            rc = cloud_main(["report", "--dsn", pg.dsn, "--tenant", "acme", *scope, "--from", day0.date().isoformat(),
                             "--to", last, "--out", str(out)])
            wall = time.perf_counter() - t0
            what = "one store" if scope else f"{args.stores} stores"
            print(f"report, {what} x {args.days} days: {wall:.2f} s, {out.stat().st_size / 1024:.0f} KiB (exit {rc})")
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
