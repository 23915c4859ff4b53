"""Ingest benchmark: simulated BLE readings -> pipeline -> durable buffer, three figures.

    .venv/bin/python scripts/bench_ingest.py [--events N] [--state DIR] [--naive-sample M]

(a) ceiling: the same simulated readings through CardScrubStage, NormalizeStage and
    PrivacyStage (real KeyStore) and msgpack.packb, no storage;
(b) the real path: edge.pipeline.Pipeline into edge.buffer.Buffer (default config:
    synchronous=FULL, WAL, group commit), flushed at the end, with no uplink so the backlog
    grows to N events; run in a fresh subprocess so its peak RSS (ru_maxrss) is its own;
(c) naive baseline: the same pipeline, then one INSERT + COMMIT per event (sqlite3,
    WAL, synchronous=FULL) on a smaller sample; its rate is the figure.

Targets: (b) >= 60 % of (a); (b) >= 30x (c); peak RSS of (b) <= 60 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack

from drivers.ble.sim import BleSim
from edge.buffer.store import Buffer
from edge.clock import SystemClock
from edge.config import Config
from edge.events import Pending, Reading
from edge.logs import configure_logging
from edge.pipeline import NormalizeStage, build_pipeline
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import CardScrubStage, PrivacyStage

SIM_RATE = 1_000_000.0  # readings/s asked of the simulation: never the bottleneck
TARGET_CEILING_PCT = 60.0
TARGET_NAIVE_X = 30.0
TARGET_RSS_MIB = 60.0


def _config(state: Path) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "bench", "store": "store-001", "device": "edge-bench"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": {"enabled": False},
        "drivers": {"ble": {"sim": {"rate": SIM_RATE, "seed": 42}}},
        "logging": {"level": "warning"},
    })


def _privacy(cfg: Config, clock: SystemClock) -> PrivacyStage:
    keys = KeyStore(cfg.paths.keys_dir, clock)
    if not keys.exists():
        keys.init()
    return PrivacyStage(Pseudonymizer(cfg.privacy, keys, None))


def _readings(cfg: Config, clock: SystemClock, n: int) -> AsyncIterator[Reading]:
    return BleSim(cfg.drivers.ble, clock, limit=n).readings()


def _staged(cfg: Config, clock: SystemClock) -> Callable[[Reading], Pending]:
    cards, norm, priv = CardScrubStage(), NormalizeStage(clock), _privacy(cfg, clock)

    def run(r: Reading) -> Pending:
        return priv(norm(cards(r)))

    return run


def _size_of(state: Path, name: str) -> int:
    return sum(f.stat().st_size for f in state.glob(name + "*"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------- (a)


async def ceiling(state: Path, n: int) -> dict[str, Any]:
    clock = SystemClock()
    cfg = _config(state)
    stages = _staged(cfg, clock)
    packb = msgpack.packb
    nbytes = count = 0
    t0 = time.perf_counter()
    async for r in _readings(cfg, clock, n):
        p = stages(r)
        nbytes += len(packb({"ts": p.ts, "src": p.src, "type": p.type, "data": p.data}, use_bin_type=True))
        count += 1
    dt = time.perf_counter() - t0
    return {"events": count, "seconds": dt, "rate": count / dt, "avg_bytes": nbytes / max(1, count)}


# ---------------------------------------------------------------------------- (b)


async def real_path(state: Path, n: int) -> dict[str, Any]:
    clock = SystemClock()
    cfg = _config(state)
    privacy = _privacy(cfg, clock)
    buffer = await Buffer.open(cfg, clock)
    pipeline, _cards = build_pipeline(clock, privacy, buffer)
    t0 = time.perf_counter()
    try:
        async for r in _readings(cfg, clock, n):
            await pipeline.submit(r)
        last = await buffer.flush()
        dt = time.perf_counter() - t0
        stats = await buffer.stats()
    finally:
        await buffer.close()
    accepted = sum(pipeline.accepted.values())
    db_bytes = _size_of(state, cfg.buffer.file)
    return {
        "events": accepted, "seconds": dt, "rate": accepted / dt, "last_id": last,
        "rejected": sum(pipeline.rejected.values()), "peak_rss_mib": _peak_rss_mib(),
        "db_mib": db_bytes / 2**20, "stats": repr(stats)[:300],
    }


def run_child(state: Path, n: int) -> dict[str, Any]:
    """(b) in a fresh interpreter, so nothing else this process allocated counts."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--events", str(n), "--state", str(state)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------- (c)


async def naive(state: Path, n: int) -> dict[str, Any]:
    clock = SystemClock()
    cfg = _config(state)
    stages = _staged(cfg, clock)
    db = sqlite3.connect(state / "naive.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts INTEGER, src TEXT, body BLOB)")
        packb = msgpack.packb
        count = 0
        t0 = time.perf_counter()
        async for r in _readings(cfg, clock, n):
            p = stages(r)
            body = packb({"ts": p.ts, "src": p.src, "type": p.type, "data": p.data}, use_bin_type=True)
            db.execute("BEGIN")
            db.execute("INSERT INTO events (ts, src, body) VALUES (?, ?, ?)", (p.ts, p.src, body))
            db.execute("COMMIT")
            count += 1
        dt = time.perf_counter() - t0
    finally:
        db.close()
    return {"events": count, "seconds": dt, "rate": count / dt}


# ---------------------------------------------------------------------------- main


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--state", type=Path, default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--naive-sample", type=int, default=5_000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configure_logging("warning", "json", sys.stderr)
    root: Path = args.state or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    if args.child:
        print(json.dumps(asyncio.run(real_path(root, args.events))))
        return 0
    n = args.events
    print(f"bench_ingest: {n} simulated BLE events, scratch dir {root}", file=sys.stderr)
    print("(b) real path in a subprocess ...", file=sys.stderr)
    b = run_child(root / "real", n)
    print("(a) ceiling ...", file=sys.stderr)
    a = asyncio.run(ceiling(root / "ceiling", n))
    print(f"(c) naive baseline on {args.naive_sample} events ...", file=sys.stderr)
    (root / "naive").mkdir(parents=True, exist_ok=True)
    c = asyncio.run(naive(root / "naive", args.naive_sample))

    pct = 100.0 * b["rate"] / a["rate"]
    mult = b["rate"] / c["rate"]
    rss = b["peak_rss_mib"]
    rows = [
        ("(a) ceiling: sim + stages + msgpack", a),
        ("(b) real: Pipeline -> Buffer (FULL)", b),
        ("(c) naive: INSERT+COMMIT per event", c),
    ]
    print(f"{'path':<38} {'events':>9} {'seconds':>8} {'events/s':>10}")
    for name, r in rows:
        print(f"{name:<38} {r['events']:>9} {r['seconds']:>8.2f} {r['rate']:>10,.0f}")
    print(f"avg packed event: {a['avg_bytes']:.0f} B; buffer files after (b): {b['db_mib']:.1f} MiB; "
          f"(b) rejected {b['rejected']}, last id {b['last_id']}")
    print(f"(b)/(a) = {pct:.1f} % of ceiling   (target >= {TARGET_CEILING_PCT:.0f} %: "
          f"{_verdict(pct >= TARGET_CEILING_PCT)})")
    print(f"(b)/(c) = {mult:.1f}x naive        (target >= {TARGET_NAIVE_X:.0f}x: {_verdict(mult >= TARGET_NAIVE_X)})")
    print(f"(b) peak RSS = {rss:.1f} MiB        (target <= {TARGET_RSS_MIB:.0f} MiB: "
          f"{_verdict(rss <= TARGET_RSS_MIB)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
