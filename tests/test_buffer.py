"""The durable buffer: ids, group commit, the stored body, bounds, drop reports, retention.

Real SQLite files in tmp_path; the clock is a FakeClock; wire constants are literals.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest

from edge.buffer import Buffer, StoredEvent
from edge.buffer.bounds import Mark, Marks, boot_id
from edge.buffer.schema import SCHEMA_VERSION
from edge.clock import FakeClock
from edge.config import Config
from edge.errors import BufferError_
from edge.events import Pending, Source

NOW = 1_767_225_600_000  # FakeClock's default wall time (2026-01-01T00:00:00Z)
DAY_MS = 86_400_000


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate(
        {
            "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
            "buffer": buffer,
        }
    )


def ev(src: Source = "ble", i: int = 0, ts: int = NOW, **data: Any) -> Pending:
    return Pending(ts=ts, src=src, type="presence.enter", data={"p": f"{i:016x}", "rssi": -60, **data})


async def put_all(buf: Buffer, items: list[Pending]) -> int:
    for p in items:
        await buf.put(p)
    return await buf.flush()


async def all_events(buf: Buffer) -> list[dict[str, Any]]:
    stored = await buf.unsealed(1_000_000, 1 << 40)
    return [msgpack.unpackb(e.body) for e in stored]


def dropped(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == "edge.dropped"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----------------------------------------------------------------------------- ids


async def test_ids_increase_and_are_never_reused_across_reopen(tmp_path: Path, clock: FakeClock) -> None:
    """Ids continue after a restart, even when the highest events were sealed and acked away."""
    cfg = make_cfg(tmp_path)
    buf = await Buffer.open(cfg, clock)
    assert buf.open_report.status == "created"
    assert await put_all(buf, [ev(i=i) for i in range(10)]) == 10
    await buf.close()

    buf = await Buffer.open(cfg, clock)
    assert buf.open_report.status == "ok"
    assert buf.last_committed_id == 10
    await put_all(buf, [ev(i=i) for i in range(5)])
    assert [e["id"] for e in await all_events(buf)] == list(range(1, 16))
    # remove every stored event (the highest too): sealed, then acknowledged
    events = await buf.unsealed(100, 1 << 30)
    batch = await buf.seal(events, build_batch)
    assert await buf.ack(batch.seq, batch.hh)
    await buf.close()

    buf = await Buffer.open(cfg, clock)
    assert buf.last_committed_id == 15
    await put_all(buf, [ev()])
    assert [e["id"] for e in await all_events(buf)] == [16]
    await buf.close()


async def test_commit_listener_reports_each_commit(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path, commit_max_events=10, commit_interval="10s")
    buf = await Buffer.open(cfg, clock)
    seen: list[int] = []
    buf.add_commit_listener(seen.append)
    for i in range(25):
        await buf.put(ev(i=i))
    await buf.flush()
    assert seen == [10, 20, 25]
    await buf.close()


async def test_group_commit_when_batch_is_full(tmp_path: Path, clock: FakeClock) -> None:
    """commit_max_events queued events commit at once, without waiting for the interval."""
    cfg = make_cfg(tmp_path, commit_max_events=50, commit_interval="10s")
    buf = await Buffer.open(cfg, clock)
    seen: list[int] = []
    buf.add_commit_listener(seen.append)
    for i in range(120):
        await buf.put(ev(i=i))
    async with asyncio.timeout(5):
        while seen[-1:] != [100]:  # noqa: ASYNC110 - polling what the listener recorded
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert seen == [50, 100]  # the last 20 wait for the 10 s interval (or a flush)
    assert buf.last_committed_id == 100
    assert await buf.flush() == 120
    await buf.close()


async def test_group_commit_after_interval(tmp_path: Path, clock: FakeClock) -> None:
    """A few events commit after commit_interval even if the batch is not full."""
    cfg = make_cfg(tmp_path, commit_max_events=10_000, commit_interval="50ms")
    buf = await Buffer.open(cfg, clock)
    seen: list[int] = []
    buf.add_commit_listener(seen.append)
    for i in range(3):
        await buf.put(ev(i=i))
    assert seen == []  # accepted only once committed
    async with asyncio.timeout(5):
        while not seen:  # noqa: ASYNC110 - polling what the listener recorded
            await asyncio.sleep(0.01)
    assert seen == [3]
    await buf.close()


async def test_put_waits_when_queue_is_full(tmp_path: Path, clock: FakeClock) -> None:
    """Backpressure: at most queue_max events wait for a commit; put() waits beyond that."""
    cfg = make_cfg(tmp_path, queue_max=100, commit_max_events=100, commit_interval="10s")
    buf = await Buffer.open(cfg, clock)
    peak = 0
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, buf.queued)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    for i in range(1000):
        await buf.put(ev(i=i))
    done = True
    await sampler
    assert 0 < peak <= 100
    assert await buf.flush() == 1000
    await buf.close()


async def test_body_is_the_wire_event_map(tmp_path: Path, clock: FakeClock) -> None:
    """The stored body is msgpack of {"id","ts","src","type","data"} (bin as bin), so bodies
    concatenated behind an array header are the msgpack array of events."""
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await put_all(buf, [Pending(ts=NOW + 5, src="nfc", type="nfc.tap", data={"tag": b"\x01\x02", "n": 3})])
    await put_all(buf, [ev("pos", 1)])
    stored = await buf.unsealed(10, 1 << 20)
    first = stored[0]
    assert first == StoredEvent(first.id, NOW + 5, "nfc", len(first.body), first.body)
    expected = {"id": 1, "ts": NOW + 5, "src": "nfc", "type": "nfc.tap", "data": {"tag": b"\x01\x02", "n": 3}}
    assert first.body == msgpack.packb(expected, use_bin_type=True)
    array = b"\x92" + b"".join(e.body for e in stored)  # fixarray of 2
    assert [e["id"] for e in msgpack.unpackb(array)] == [1, 2]
    await buf.close()


async def test_unpackable_event_is_dropped_and_counted(tmp_path: Path, clock: FakeClock) -> None:
    """A pipeline bug (data that is not msgpack-able) costs that event only, reported as invalid."""
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await put_all(buf, [ev(i=1), Pending(ts=NOW, src="pos", type="pos.bad", data={"x": {1, 2}}), ev(i=2)])
    events = await all_events(buf)
    assert [e["src"] for e in events] == ["ble", "ble", "edge"]
    assert dropped(events) == [{"source": "pos", "count": 1, "reason": "invalid"}]
    assert (await buf.stats()).drops == {"pos/invalid": 1}
    await buf.close()


async def test_put_after_close_raises_and_close_is_idempotent(tmp_path: Path, clock: FakeClock) -> None:
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await buf.put(ev())
    await buf.close()
    await buf.close()
    with pytest.raises(BufferError_):
        await buf.put(ev())


async def test_state_dir_is_created_private(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path)
    buf = await Buffer.open(cfg, clock)
    await buf.close()
    assert stat.S_IMODE(cfg.paths.state_dir.stat().st_mode) == 0o700
    assert cfg.buffer_path.exists()


# ----------------------------------------------------------------------------- schema


async def test_opens_empty_file_as_version_zero(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path)
    cfg.paths.state_dir.mkdir(mode=0o700)
    cfg.buffer_path.touch()
    buf = await Buffer.open(cfg, clock)
    assert (buf.open_report.status, buf.open_report.version_from) == ("ok", 0)
    await put_all(buf, [ev()])
    await buf.close()
    with sqlite3.connect(cfg.buffer_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    buf = await Buffer.open(cfg, clock)
    assert (buf.open_report.status, buf.open_report.version_from) == ("ok", 1)
    await buf.close()


async def test_refuses_a_newer_schema(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path)
    cfg.paths.state_dir.mkdir(mode=0o700)
    with sqlite3.connect(cfg.buffer_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(BufferError_, match="schema version 99"):
        await Buffer.open(cfg, clock)
    assert cfg.buffer_path.exists()


# ----------------------------------------------------------------------------- bounds


async def test_drop_oldest_takes_lowest_priority_first(tmp_path: Path, clock: FakeClock) -> None:
    """With the default priorities (pos, nfc, ble, edge) ble loses before nfc, nfc before pos;
    each commit reports its drops as one edge.dropped per source with the id range."""
    buf = await Buffer.open(make_cfg(tmp_path, max_events=40), clock)
    await put_all(buf, [ev("pos", i) for i in range(10)])  # ids 1-10
    await put_all(buf, [ev("ble", i) for i in range(15)])  # ids 11-25
    await put_all(buf, [ev("nfc", i) for i in range(10)])  # ids 26-35
    assert (await buf.stats()).drops == {}
    await put_all(buf, [ev("pos", i) for i in range(10)])  # ids 36-45: 6 over (+1 report)
    events = await all_events(buf)
    assert len(events) == 40
    assert dropped(events) == [{"source": "ble", "count": 6, "reason": "full", "first_id": 11, "last_id": 16}]
    assert events[-1]["id"] == 46  # the report comes after the events of its commit
    counts = {s: sum(1 for e in events if e["src"] == s) for s in ("pos", "nfc", "ble", "edge")}
    assert counts == {"pos": 20, "nfc": 10, "ble": 9, "edge": 1}

    await put_all(buf, [ev("pos", i) for i in range(20)])  # 20 more pos: edge, ble, then nfc go
    events = await all_events(buf)
    counts = {s: sum(1 for e in events if e["src"] == s) for s in ("pos", "nfc", "ble", "edge")}
    assert len(events) <= 40
    assert counts["pos"] == 40 - counts["edge"]
    assert counts["ble"] == counts["nfc"] == 0
    stats = await buf.stats()
    assert stats.drops["ble/full"] == 15
    assert stats.drops["nfc/full"] == 10
    assert stats.drops_unreported == 0
    assert stats.backlog["pos"].events == 40 - counts["edge"]
    await buf.close()


async def test_drop_oldest_respects_configured_priorities(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path, max_events=20, priorities=["ble", "edge", "nfc", "pos"])
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("pos", i) for i in range(10)])
    await put_all(buf, [ev("ble", i) for i in range(15)])
    events = await all_events(buf)
    assert [d["source"] for d in dropped(events)] == ["pos"]
    assert sum(1 for e in events if e["src"] == "ble") == 15
    await buf.close()


async def test_low_priority_flood_never_evicts_higher_priority(tmp_path: Path, clock: FakeClock) -> None:
    """A flood of ble drops ble (oldest first, the incoming ones too), never stored pos."""
    buf = await Buffer.open(make_cfg(tmp_path, max_events=20), clock)
    await put_all(buf, [ev("pos", i) for i in range(15)])
    await put_all(buf, [ev("ble", i) for i in range(30)])  # ids 16-45
    events = await all_events(buf)
    assert sum(1 for e in events if e["src"] == "pos") == 15
    ble = [e["id"] for e in events if e["src"] == "ble"]
    assert ble == list(range(46 - len(ble), 46))  # the newest ble survive
    [report] = dropped(events)
    assert report["source"] == "ble"
    assert report["first_id"] == 16
    assert report["count"] == 30 - len(ble)
    await buf.close()


async def test_byte_bound_is_kept(tmp_path: Path, clock: FakeClock) -> None:
    mib = 1024 * 1024
    buf = await Buffer.open(make_cfg(tmp_path, max_bytes=mib), clock)
    pad = "x" * 1000
    for chunk in range(4):
        await put_all(buf, [ev("ble", i, pad=pad) for i in range(chunk * 500, chunk * 500 + 500)])
    stats = await buf.stats()
    total = sum(b.bytes for b in stats.backlog.values())
    assert mib - 2000 < total <= mib
    assert stats.drops["ble/full"] > 900
    await buf.close()


async def test_reject_new_rejects_unless_it_evicts_lower_priority(tmp_path: Path, clock: FakeClock) -> None:
    """reject_new: a full buffer rejects new events, except that an incoming event may evict
    strictly-lower-priority stored ones. Rejections stay counted until they can be reported."""
    buf = await Buffer.open(make_cfg(tmp_path, max_events=20, when_full="reject_new"), clock)
    await put_all(buf, [ev("ble", i) for i in range(12)])  # ids 1-12
    await put_all(buf, [ev("nfc", i) for i in range(8)])  # ids 13-20: full
    await put_all(buf, [ev("pos", 0), ev("pos", 1)])  # ids 21-22 evict ble 1-2
    await put_all(buf, [ev("nfc", 9)])  # id 23 evicts ble 3
    await put_all(buf, [ev("ble", 99)])  # id 24: nothing lower to evict -> rejected
    events = await all_events(buf)
    ids = [e["id"] for e in events]
    assert 24 not in ids
    assert {21, 22, 23} <= set(ids)
    assert [e["id"] for e in events if e["src"] == "ble"] == list(range(4, 13))
    stats = await buf.stats()
    assert stats.drops == {"ble/full": 3, "ble/rejected": 1}
    # the store is full: the reports wait (counted, persisted) until there is room
    assert stats.drops_unreported == 4
    assert dropped(events) == []
    await buf.seal(await buf.unsealed(5, 1 << 20), build_batch)
    batch = (await buf.pending_batches())[0]
    assert await buf.ack(batch.seq, batch.hh)
    await put_all(buf, [ev("pos", 2)])
    reports = dropped(await all_events(buf))
    got = {(r["source"], r["reason"], r["count"]) for r in reports}
    assert got == {("ble", "full", 3), ("ble", "rejected", 1)}
    rejected = next(r for r in reports if r["reason"] == "rejected")
    assert (rejected["first_id"], rejected["last_id"]) == (24, 24)
    assert (await buf.stats()).drops_unreported == 0
    await buf.close()


async def test_unreported_drops_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path, max_events=5, when_full="reject_new")
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("ble", i) for i in range(7)])
    assert (await buf.stats()).drops_unreported == 2
    await buf.close()
    buf = await Buffer.open(cfg, clock)
    stats = await buf.stats()
    assert (stats.drops, stats.drops_unreported) == ({"ble/rejected": 2}, 2)
    await buf.close()


# ----------------------------------------------------------------------------- retention


async def test_retention_only_with_synchronized_clock(tmp_path: Path, clock: FakeClock) -> None:
    """Old events go by capture time, but never while the clock is unsynchronized, and an
    event from the future is never old."""
    cfg = make_cfg(tmp_path, retention={"ble": "1d", "pos": "30d", "nfc": "1d", "edge": "7d"})
    clock.wall = NOW - DAY_MS  # a day before NOW: retention only deletes what was stored a day ago
    buf = await Buffer.open(cfg, clock)
    await put_all(
        buf,
        [
            ev("ble", 1, ts=NOW - 2 * DAY_MS),  # id 1: old
            ev("ble", 2, ts=NOW - 3 * DAY_MS),  # id 2: old
            ev("ble", 3, ts=NOW - DAY_MS // 2),  # id 3: young
            ev("ble", 4, ts=NOW + 400 * DAY_MS),  # id 4: from the future
            ev("pos", 5, ts=NOW - 2 * DAY_MS),  # id 5: pos keeps 30 days
        ],
    )
    clock.sync = False
    assert await buf.enforce_retention() == 0
    assert len(await all_events(buf)) == 5

    clock.sync = True
    assert await buf.enforce_retention() == 0  # synced, but nothing was stored a day ago yet
    clock.advance(86400)  # now NOW
    assert await buf.enforce_retention() == 2
    events = await all_events(buf)
    assert [e["id"] for e in events] == [3, 4, 5, 6]
    assert dropped(events) == [
        {"source": "ble", "count": 2, "reason": "retention", "first_id": 1, "last_id": 2}
    ]
    clock.advance(10 * 365 * 86400)  # ten years on: the future event is old too by now
    assert await buf.enforce_retention() >= 3
    await buf.close()


async def test_retention_runs_periodically(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path, retention={"ble": "1d", "pos": "30d", "nfc": "1d", "edge": "7d"})
    buf = await Buffer.open(cfg, clock, retention_every=60.0)
    await put_all(buf, [ev("ble", 1, ts=NOW - 2 * DAY_MS)])
    assert await buf.enforce_retention() == 0  # a run that notes event 1 as stored; a day later it may go
    clock.advance(86400 + 61)
    await put_all(buf, [ev("ble", 2)])  # wakes the writer, which finds retention due
    events = await all_events(buf)
    assert [e["id"] for e in events if e["src"] == "ble"] == [3]
    assert dropped(events) == [
        {"source": "ble", "count": 1, "reason": "retention", "first_id": 1, "last_id": 1}
    ]
    await buf.close()


async def test_retention_marks_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    """What a retention run noted as stored is still known after a reopen: a day later (by the
    monotonic clock of the same boot) the old event goes, an event stored after the note stays."""
    cfg = make_cfg(tmp_path, retention={"ble": "1d", "pos": "30d", "nfc": "1d", "edge": "7d"})
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("ble", 1, ts=NOW - 2 * DAY_MS)])
    assert await buf.enforce_retention() == 0
    await put_all(buf, [ev("ble", 2, ts=NOW - 2 * DAY_MS)])  # stored after the run: not yet a day
    await buf.close()
    clock.advance(86400)
    buf = await Buffer.open(cfg, clock)
    assert await buf.enforce_retention() == 1
    assert [e["id"] for e in await all_events(buf) if e["src"] == "ble"] == [2]
    await buf.close()


def test_retention_marks_are_bounded_and_keep_deletion_close_to_the_configured_age() -> None:
    """Hourly runs for 90 days keep at most 128 marks, and the newest mark at least 7, 14 or
    30 days old is less than 10% older than that (deletion lags the retention by < 10%)."""
    boot, hour = "b", 3_600_000
    marks: list[Mark] = []
    for h in range(90 * 24):
        cur = Marks(tuple(marks), boot, h * hour, NOW + h * hour)
        marks = cur.add(h, keep_ms=30 * DAY_MS)
    assert len(marks) <= 128
    cur = Marks(tuple(marks), boot, 90 * 24 * hour, NOW + 90 * 24 * hour)
    for days in (7, 14, 30):
        got = [m for m in marks if m.max_id == cur.upto(days * DAY_MS)]
        assert len(got) == 1
        assert days * DAY_MS <= cur.age(got[0]) < days * DAY_MS * 1.1


def test_a_mark_of_this_boot_ages_by_the_monotonic_clock_one_of_an_earlier_boot_by_the_wall() -> None:
    """Same boot: the monotonic clock decides (a wall step changes nothing); earlier boot: the
    synchronized wall clock; a mark that looks to be from the future is never old."""
    week = 7 * DAY_MS
    this = Mark("b", 1_000, NOW, 5)
    assert Marks((this,), "b", 1_000 + 60_000, NOW + 365 * DAY_MS).upto(week) == 0
    assert Marks((this,), "b", 1_000 + week, NOW + 60_000).upto(week) == 5
    assert Marks((this,), "other", 0, NOW + week).upto(week) == 5
    assert Marks((this,), "other", 0, NOW + week - 1).upto(week) == 0
    assert Marks((this,), "b", 0, NOW + week).upto(week) == 0


# ----------------------------------------------------------------------------- helpers


def build_batch(seq: int, prev: bytes, events: list[StoredEvent]) -> Any:
    """A stand-in for the uplink's sealer: a payload shaped like uplink-v1 (unsigned)."""
    import hashlib
    import zlib

    from edge.buffer import SealedBatch

    body = zlib.compress(msgpack.packb([msgpack.unpackb(e.body) for e in events], use_bin_type=True))
    first, last = events[0].id, events[-1].id
    header = {"seq": seq, "prev": prev, "z": "zlib", "n": len(events), "first": first, "last": last}
    h = msgpack.packb(header, use_bin_type=True)
    payload = msgpack.packb({"v": 1, "h": h, "b": body, "s": bytes(64)}, use_bin_type=True)
    return SealedBatch(seq, hashlib.sha256(h).digest(), payload, events[0].id, events[-1].id, len(events))


def test_the_boot_id_comes_from_the_unit_when_proc_sys_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ProcSubset=pid /proc/sys is hidden; the unit passes systemd's %b as EDGE_BOOT_ID,
    so marks of this boot keep aging by the monotonic clock across restarts of the service."""
    monkeypatch.setenv("EDGE_BOOT_ID", "3f1c0e55a2b84b6c9d7e1f2a3b4c5d6e")
    assert boot_id() == "3f1c0e55a2b84b6c9d7e1f2a3b4c5d6e"
    monkeypatch.delenv("EDGE_BOOT_ID")
    assert boot_id() == boot_id()  # the kernel's, stable within a boot
