"""The buffer survives what storage does to it: a full disk, a corrupt or garbage database.

A full disk is simulated with SQLite's max_page_count (Buffer.set_max_pages), corruption by
overwriting pages of a real database file.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog

from edge.buffer import Buffer, SealedBatch, StoredEvent
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending, Source

NOW = 1_767_225_600_000  # FakeClock's default wall time: 2026-01-01T00:00:00Z
MOVED = "buffer.db.corrupt-20260101T000000Z"


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate(
        {
            "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
            "buffer": buffer,
        }
    )


def ev(src: Source = "ble", i: int = 0, pad: int = 0) -> Pending:
    data: dict[str, Any] = {"p": f"{i:016x}", "rssi": -60}
    if pad:
        data["pad"] = "x" * pad
    return Pending(ts=NOW, src=src, type="presence.enter", data=data)


def degraded(buf: Buffer) -> str | None:
    """Read through a call: mypy would narrow the property across awaits."""
    return buf.degraded


async def put_all(buf: Buffer, items: list[Pending]) -> int:
    for p in items:
        await buf.put(p)
    return await buf.flush()


async def stored(buf: Buffer) -> list[dict[str, Any]]:
    return [msgpack.unpackb(e.body) for e in await buf.unsealed(10_000_000, 1 << 40)]


def build_batch(seq: int, prev: bytes, events: list[StoredEvent]) -> SealedBatch:
    import hashlib

    body = msgpack.packb([msgpack.unpackb(e.body) for e in events], use_bin_type=True)
    h = msgpack.packb({"seq": seq, "prev": prev, "z": "none", "n": len(events)}, use_bin_type=True)
    payload = msgpack.packb({"v": 1, "h": h, "b": body, "s": bytes(64)}, use_bin_type=True)
    return SealedBatch(seq, hashlib.sha256(h).digest(), payload, events[0].id, events[-1].id, len(events))


# ----------------------------------------------------------------------------- disk full


async def test_disk_full_drops_oldest_keeps_running_and_recovers(tmp_path: Path) -> None:
    """Disk full: commits roll back, the oldest lowest-priority events make room (counted as
    disk_full), `degraded` says so with one warning, and it clears once space returns."""
    cfg = make_cfg(tmp_path, commit_max_events=500)
    buf = await Buffer.open(cfg, FakeClock())
    await put_all(buf, [ev("pos", i, pad=100) for i in range(200)])  # ids 1-200
    await put_all(buf, [ev("ble", i, pad=100) for i in range(4000)])  # ids 201-4200
    await buf.set_max_pages(1)  # capped at its current size: every new page fails
    with structlog.testing.capture_logs() as logs:
        await put_all(buf, [ev("nfc", i, pad=100) for i in range(1500)])  # ids 4201-5700 (+ reports)
        assert buf.degraded is not None
        assert buf.degraded.startswith("disk_full")
        assert [e["event"] for e in logs].count("buffer_degraded") == 1
        events = await stored(buf)
        by_src = {s: [e["id"] for e in events if e["src"] == s] for s in ("pos", "nfc", "ble")}
        assert by_src["pos"] == list(range(1, 201))  # higher priority: untouched
        assert len(by_src["nfc"]) == 1500  # the new events are all stored
        assert by_src["ble"] == list(range(4201 - len(by_src["ble"]), 4201))  # the oldest ble went
        stats = await buf.stats()
        assert stats.drops["ble/disk_full"] == 4000 - len(by_src["ble"]) > 0

        await buf.set_max_pages(None)  # space is back
        await put_all(buf, [ev("pos", 9999)])
        assert degraded(buf) is None
        assert "buffer_recovered" in [e["event"] for e in logs]
    events = await stored(buf)
    reports = [e["data"] for e in events if e["type"] == "edge.dropped"]
    assert reports
    assert {(r["source"], r["reason"]) for r in reports} <= {("ble", "disk_full"), ("edge", "disk_full")}
    # every drop is counted (edge: older drop reports, lowest priority, went first) and reported
    final = await buf.stats()
    assert set(final.drops) <= {"ble/disk_full", "edge/disk_full"}
    assert final.drops_unreported == 0
    assert sum(1 for e in events if e["src"] == "ble") + final.drops["ble/disk_full"] == 4000
    await buf.close()


async def test_disk_full_with_nothing_to_drop_counts_queue_overflow(tmp_path: Path) -> None:
    """With nothing stored to give up, events wait in the bounded queue; beyond it they are
    dropped, counted (reason disk_full) and reported once space returns."""
    cfg = make_cfg(tmp_path, queue_max=100, commit_max_events=50)
    buf = await Buffer.open(cfg, FakeClock())
    await buf.set_max_pages(1)
    for i in range(300):
        await buf.put(ev("ble", i, pad=200))
    async with asyncio.timeout(10):
        while degraded(buf) is None:  # noqa: ASYNC110 - polling a property the buffer sets
            await asyncio.sleep(0.01)
    for i in range(300, 400):
        await buf.put(ev("nfc", i, pad=200))  # returns at once: queue full and degraded
    await buf.set_max_pages(None)
    last = await asyncio.wait_for(buf.flush(), 30)
    assert degraded(buf) is None
    events = await stored(buf)
    kept = [e for e in events if e["src"] != "edge"]
    reports = {(r["data"]["source"], r["data"]["reason"]): r["data"] for r in events if r["src"] == "edge"}
    lost = sum(r["count"] for r in reports.values())
    assert len(kept) + lost == 400
    assert all(reason == "disk_full" and "first_id" not in r for (_, reason), r in reports.items())
    assert last == events[-1]["id"]
    await buf.close()


# ----------------------------------------------------------------------------- corruption


async def _populated(cfg: Config, n: int = 3000) -> None:
    buf = await Buffer.open(cfg, FakeClock())
    await put_all(buf, [ev("ble", i, pad=150) for i in range(n)])
    await buf.seal(await buf.unsealed(10, 1 << 20), build_batch)  # ids 1-10 into batch seq 1
    await buf.close()  # last connection: WAL checkpointed into the file


async def test_corrupt_pages_are_salvaged_and_the_file_kept(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    await _populated(cfg)
    path = cfg.buffer_path
    page, size = 4096, path.stat().st_size
    pages = size // page
    rng = random.Random(7)
    with path.open("r+b") as fh:
        for p in range(pages // 2, pages // 2 + 8):
            fh.seek(p * page)
            fh.write(rng.randbytes(page))
    original = path.read_bytes()

    with structlog.testing.capture_logs() as logs:
        buf = await Buffer.open(cfg, FakeClock())
    report = buf.open_report
    assert report.status == "salvaged"
    assert report.moved_to == path.with_name(MOVED)
    assert report.moved_to.read_bytes() == original  # moved aside untouched, never deleted
    warning = next(e for e in logs if e["event"] == "buffer_corrupt_moved_aside")
    assert warning["log_level"] == "warning"
    assert warning["moved_to"] == str(path.with_name(MOVED))
    assert str(path.with_name(MOVED)) in str(report)

    events = await stored(buf)
    ids = [e["id"] for e in events if e["src"] == "ble"]
    assert 0 < len(ids) < 2990
    assert ids == sorted(ids)
    assert report.salvaged_events == len(ids)
    assert report.salvaged_batches == 1  # the sealed batch survived
    assert [b.seq for b in await buf.pending_batches()] == [1]
    corrupt = [e for e in events if e["type"] == "edge.dropped"]
    assert [e["data"]["reason"] for e in corrupt] == ["corrupt"]
    assert corrupt[0]["data"]["count"] in (-1, 2990 - len(ids))
    assert corrupt[0]["id"] > 3000  # counters kept past everything ever stored
    await put_all(buf, [ev("pos", 1)])
    assert (await stored(buf))[-1]["id"] == corrupt[0]["id"] + 1
    assert (await buf.seal(await buf.unsealed(1, 1 << 20), build_batch)).seq == 2
    await buf.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_garbage_file_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.paths.state_dir.mkdir(mode=0o700)
    garbage = random.Random(1).randbytes(10_000)
    cfg.buffer_path.write_bytes(garbage)
    buf = await Buffer.open(cfg, FakeClock())
    report = buf.open_report
    assert (report.status, report.salvaged_events, report.lost) == ("salvaged", 0, -1)
    assert cfg.buffer_path.with_name(MOVED).read_bytes() == garbage
    [only] = await stored(buf)
    assert only["type"] == "edge.dropped"
    assert only["data"] == {"source": "*", "count": -1, "reason": "corrupt"}
    # nothing is known about ids used before: they jump ahead rather than risk reuse
    assert only["id"] > 1_000_000
    await buf.close()


async def test_a_second_corruption_gets_its_own_name(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.paths.state_dir.mkdir(mode=0o700)
    for _ in range(2):
        await (await Buffer.open(cfg, FakeClock())).close()
        cfg.buffer_path.write_bytes(b"not a database" * 100)
        await (await Buffer.open(cfg, FakeClock())).close()
    assert sorted(p.name for p in cfg.paths.state_dir.glob("*.corrupt-*")) == [MOVED, MOVED + "-2"]


async def test_interrupted_salvage_is_finished_at_next_open(tmp_path: Path) -> None:
    """Crash after the salvaged copy was complete and the corrupt file moved aside."""
    cfg = make_cfg(tmp_path)
    await _populated(cfg, 100)
    cfg.buffer_path.rename(cfg.buffer_path.with_name("buffer.db.salvaged"))
    buf = await Buffer.open(cfg, FakeClock())
    assert buf.open_report.status == "ok"
    assert len(await stored(buf)) == 90
    await buf.close()
    assert not cfg.buffer_path.with_name("buffer.db.salvaged").exists()


async def test_other_open_errors_are_not_mistaken_for_corruption(tmp_path: Path) -> None:
    """A file that cannot be opened (here: a directory in its place) is an error, never moved."""
    from edge.errors import BufferError_

    cfg = make_cfg(tmp_path)
    cfg.buffer_path.mkdir(parents=True)
    with pytest.raises(BufferError_):
        await Buffer.open(cfg, FakeClock())
    assert cfg.buffer_path.is_dir()
    assert not list(cfg.paths.state_dir.glob("*.corrupt-*"))
    os.rmdir(cfg.buffer_path)
