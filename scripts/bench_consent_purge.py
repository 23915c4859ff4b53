"""How long a consent withdrawal's purge takes on a full buffer, beside a plain scan of the same rows.

    .venv/bin/python scripts/bench_consent_purge.py [--events 200000] [--withdrawn 1]

Fills a buffer (temporary folder) with `--events` POS receipts whose customers come from a pool of
2,000 stable pseudonyms, then withdraws `--withdrawn` of them through ConsentSync.apply (flush,
one transaction with secure_delete, the consent_purged event, WAL truncation). Baseline, measured
in the same run on the same file: `SELECT sum(length(body)) FROM events` (reads every body once).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

from edge.buffer import Buffer
from edge.clock import SystemClock
from edge.config import Config
from edge.downlink.consent import ConsentSync
from edge.events import Pending
from edge.wire.downlink import Document


def _shard(p: str) -> str:
    return hashlib.sha256(p.encode()).digest()[:1].hex()


def _doc(shard: str, rev: int, consented: list[str]) -> Document:
    return Document(kind="consent", tenant="bench", store="_all", device="_all", kid="k", t=rev,
                    body={"shard": shard, "rev": rev, "consented": consented}, raw=b"", digest=str(rev))


async def main(n_events: int, n_withdrawn: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        cfg = Config.model_validate({
            "identity": {"tenant": "bench", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
            "buffer": {"max_bytes": "4GiB", "commit_max_events": 2000, "synchronous": "normal"},
        })
        buf = await Buffer.open(cfg, SystemClock())
        pool = [f"loy:s0badc0de:{i:026d}" for i in range(2000)]
        for i in range(n_events):
            await buf.put(Pending(1_767_225_600_000 + i, "pos", "pos.receipt",
                                  {"register": "till-1", "total": i, "customer": pool[i % len(pool)]}))
        await buf.flush()
        by_shard: dict[str, list[str]] = {}
        for p in pool:
            by_shard.setdefault(_shard(p), []).append(p)
        shard, members = max(by_shard.items(), key=lambda kv: len(kv[1]))
        members.sort()
        sync = ConsentSync(state, buf)
        await sync.apply(_doc(shard, 1, members))
        with sqlite3.connect(cfg.buffer_path) as db:
            t0 = time.perf_counter()
            db.execute("SELECT sum(length(body)) FROM events").fetchone()
            scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        await sync.apply(_doc(shard, 2, members[n_withdrawn:]))
        purge = time.perf_counter() - t0
        size = cfg.buffer_path.stat().st_size
        print(f"events {n_events}, withdrawn {n_withdrawn}, purged {sync.purged_events}, db {size / 2**20:.1f} MiB")
        print(f"baseline full scan of bodies: {scan * 1000:8.1f} ms")
        print(f"withdrawal (purge + report):  {purge * 1000:8.1f} ms")
        sync.close()
        await buf.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--withdrawn", type=int, default=1)
    args = ap.parse_args()
    asyncio.run(main(args.events, args.withdrawn))
