"""The daemon's in-memory backlog and batch counters stay equal to what the database holds.

The buffer keeps per-priority event/byte counts and the sealed batches' event/byte totals in
memory (its bounds and `stats()` read them). They must match a read-only `read_stats` of the
same file after any mix of commits, seals and acks, on a reused database too, and even when
the caller of `seal()` or `ack()` is cancelled after its transaction began (the transaction
still commits, shielded). Real SQLite files in tmp_path; the clock is a FakeClock.
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from edge.buffer import Buffer, SealedBatch, StoredEvent
from edge.buffer.stats import BufferStats, read_stats
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending, Source

NOW = 1_767_225_600_000  # FakeClock's default wall time (2026-01-01T00:00:00Z)


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate(
        {
            "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
            "buffer": {"commit_interval": "1ms", **buffer},
        }
    )


def ev(src: Source, i: int) -> Pending:
    return Pending(ts=NOW + i, src=src, type="presence.enter", data={"p": f"{i:016x}", "rssi": -60})


def build(seq: int, prev: bytes, events: list[StoredEvent]) -> SealedBatch:
    """Stand-in for the uplink's sealer: a payload shaped like uplink-v1 (unsigned)."""
    body = zlib.compress(msgpack.packb([msgpack.unpackb(e.body) for e in events], use_bin_type=True))
    header = {"seq": seq, "prev": prev, "z": "zlib", "n": len(events), "first": events[0].id, "last": events[-1].id}
    h = msgpack.packb(header, use_bin_type=True)
    payload = msgpack.packb({"v": 1, "h": h, "b": body, "s": bytes(64)}, use_bin_type=True)
    return SealedBatch(seq, hashlib.sha256(h).digest(), payload, events[0].id, events[-1].id, len(events))


def backlog(st: BufferStats) -> dict[str, tuple[int, int]]:
    return {src: (b.events, b.bytes) for src, b in st.backlog.items()}


async def put_all(buf: Buffer, items: list[Pending]) -> int:
    for p in items:
        await buf.put(p)
    return await buf.flush()


async def seal_some(buf: Buffer, n: int) -> SealedBatch:
    return await buf.seal(await buf.unsealed(n, 1 << 30), build)


async def ack_all(buf: Buffer) -> None:
    for b in await buf.pending_batches():
        assert await buf.ack(b.seq, b.hh)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def reused_database(cfg: Config, clock: FakeClock) -> None:
    """A database left by an earlier run: 10 unsent events and two sealed, unacked batches."""
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("ble" if i % 2 else "pos", i) for i in range(30)])
    await seal_some(buf, 12)
    await seal_some(buf, 8)
    await buf.close()
    st = read_stats(cfg.buffer_path)
    assert sum(b.events for b in st.backlog.values()) == 10
    assert st.batches_pending == 2


async def test_backlog_matches_read_stats_after_seals_and_acks_that_race_commits(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Reopen a used database, then seal and ack everything while new events are committed
    at the same moments (as the uplink does while drivers produce): once all is acked, the
    in-memory backlog is 0 like read_stats', and the bounds see an empty store (max_events
    events fit without a drop)."""
    cfg = make_cfg(tmp_path, max_events=200)
    await reused_database(cfg, clock)
    buf = await Buffer.open(cfg, clock)
    assert backlog(await buf.stats()) == backlog(read_stats(cfg.buffer_path))
    for r in range(20):
        fresh = [ev("ble", 1000 + 10 * r + i) for i in range(10)]
        # the seal (or ack) holds the lock while the writer waits for it with fresh events
        await asyncio.gather(seal_some(buf, 15), put_all(buf, fresh))
        pending = await buf.pending_batches()
        await asyncio.gather(
            *(buf.ack(b.seq, b.hh) for b in pending), put_all(buf, [ev("nfc", 5000 + r)])
        )
    while await buf.unsealed(1, 1 << 30):
        await asyncio.gather(seal_some(buf, 50), put_all(buf, []))
    await ack_all(buf)
    mem, disk = await buf.stats(), read_stats(cfg.buffer_path)
    assert disk.batches_pending == 0
    assert sum(b.events for b in disk.backlog.values()) == 0
    assert backlog(mem) == backlog(disk)
    await put_all(buf, [ev("ble", 9000 + i) for i in range(200)])
    st = read_stats(cfg.buffer_path)
    assert st.drops == {}
    assert st.backlog["ble"].events == 200
    assert backlog(await buf.stats()) == backlog(st)
    await buf.close()


@pytest.mark.parametrize("op", ["seal", "ack"])
async def test_a_cancelled_caller_still_counts_its_committed_seal_or_ack(
    tmp_path: Path, clock: FakeClock, op: str
) -> None:
    """seal()/ack() run their transaction shielded: a caller cancelled meanwhile does not undo
    it, and the in-memory counters must follow the database all the same."""
    cfg = make_cfg(tmp_path, max_events=40)
    await reused_database(cfg, clock)
    buf = await Buffer.open(cfg, clock)
    task: asyncio.Future[Any]
    if op == "seal":
        task = asyncio.ensure_future(buf.seal(await buf.unsealed(100, 1 << 30), build))
    else:
        first = (await buf.pending_batches())[0]
        task = asyncio.ensure_future(buf.ack(first.seq, first.hh))
    for _ in range(3):  # let it reach the shielded database work
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    mem = await buf.stats()  # queued behind the shielded transaction: it has committed
    disk = read_stats(cfg.buffer_path)
    assert (sum(b.events for b in disk.backlog.values()), disk.batches_pending) == (
        (0, 3) if op == "seal" else (10, 1)
    )
    assert backlog(mem) == backlog(disk)
    await ack_all(buf)
    for b in await buf.unsealed(100, 1 << 30):
        assert b.src in ("ble", "pos")
    # the store now holds what read_stats says; up to max_events more fit without a drop
    room = 40 - sum(b.events for b in read_stats(cfg.buffer_path).backlog.values())
    await put_all(buf, [ev("ble", 9000 + i) for i in range(room)])
    assert read_stats(cfg.buffer_path).drops == {}
    await buf.close()
