"""The buffer's uplink side: unsealed events, sealing, acks, quarantine; stats and export read
from another process while the daemon writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from edge.buffer import Buffer, SealConflict, SealedBatch, StoredEvent, iter_events
from edge.buffer.stats import count_events
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending, Source

NOW = 1_767_225_600_000
ROOT = Path(__file__).resolve().parents[1]
ZERO32 = b"\x00" * 32


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate(
        {
            "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
            "buffer": buffer,
        }
    )


def ev(src: Source = "ble", i: int = 0, pad: int = 0) -> Pending:
    return Pending(ts=NOW + i, src=src, type="presence.enter", data={"p": f"{i:016x}", "pad": "x" * pad})


async def put_all(buf: Buffer, items: list[Pending]) -> int:
    for p in items:
        await buf.put(p)
    return await buf.flush()


class Builder:
    """Stand-in for the uplink sealer: an unsigned payload shaped like uplink-v1."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes, list[int]]] = []

    def __call__(self, seq: int, prev: bytes, events: list[StoredEvent]) -> SealedBatch:
        self.calls.append((seq, prev, [e.id for e in events]))
        n = len(events)
        raw = (bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")) + b"".join(
            e.body for e in events
        )
        header = {"seq": seq, "prev": prev, "z": "zlib", "n": n, "first": events[0].id, "last": events[-1].id}
        h = msgpack.packb(header, use_bin_type=True)
        payload = msgpack.packb({"v": 1, "h": h, "b": zlib.compress(raw), "s": bytes(64)}, use_bin_type=True)
        return SealedBatch(seq, hashlib.sha256(h).digest(), payload, events[0].id, events[-1].id, n)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_unsealed_oldest_or_newest_within_limits(tmp_path: Path, clock: FakeClock) -> None:
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await put_all(buf, [ev(i=i, pad=100) for i in range(1, 11)])
    assert [e.id for e in await buf.unsealed(3, 1 << 20)] == [1, 2, 3]
    assert [e.id for e in await buf.unsealed(3, 1 << 20, newest=True)] == [8, 9, 10]
    one = (await buf.unsealed(1, 1 << 20))[0]
    assert [e.id for e in await buf.unsealed(10, 2 * one.size + 1)] == [1, 2]
    assert [e.id for e in await buf.unsealed(10, 1)] == [1]  # at least one, however large
    await buf.close()


async def test_seal_ack_and_a_chain_that_survives_restart(tmp_path: Path, clock: FakeClock) -> None:
    """seq starts at 1 with a zero prev; each batch chains to the previous header hash; acked
    batches are deleted; seq is never reused after a restart."""
    cfg = make_cfg(tmp_path)
    build = Builder()
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev(i=i) for i in range(1, 8)])
    b1 = await buf.seal(await buf.unsealed(3, 1 << 20), build)
    b2 = await buf.seal(await buf.unsealed(3, 1 << 20), build)
    assert [(c[0], c[2]) for c in build.calls] == [(1, [1, 2, 3]), (2, [4, 5, 6])]
    assert build.calls[0][1] == ZERO32
    assert build.calls[1][1] == b1.hh
    assert [e.id for e in await buf.unsealed(10, 1 << 20)] == [7]  # sealed events left the backlog
    assert await buf.pending_batches() == [b1, b2]
    assert await buf.pending_batches(limit=1) == [b1]
    stats = await buf.stats()
    assert (stats.batches_pending, stats.batches_pending_bytes) == (2, len(b1.payload) + len(b2.payload))
    assert stats.last_ack_ms is None

    assert not await buf.ack(1, b2.hh)  # wrong hash: nothing deleted
    assert not await buf.ack(3, b1.hh)  # no such batch
    assert await buf.pending_batches() == [b1, b2]
    clock.advance(5)
    assert await buf.ack(1, b1.hh)
    assert not await buf.ack(1, b1.hh)  # already gone
    assert await buf.pending_batches() == [b2]
    assert (await buf.stats()).last_ack_ms == NOW + 5000
    assert await buf.ack(2, b2.hh)
    await buf.close()

    buf = await Buffer.open(cfg, clock)
    b3 = await buf.seal(await buf.unsealed(3, 1 << 20), build)
    assert (b3.seq, build.calls[-1][1]) == (3, b2.hh)
    assert (await buf.stats()).next_seq == 4
    await buf.close()


async def test_quarantined_batches_are_kept_aside(tmp_path: Path, clock: FakeClock) -> None:
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await put_all(buf, [ev(i=i) for i in range(4)])
    b1 = await buf.seal(await buf.unsealed(2, 1 << 20), Builder())
    b2 = await buf.seal(await buf.unsealed(2, 1 << 20), Builder())
    assert not await buf.quarantine(1, b2.hh, "bad-signature")
    assert await buf.quarantine(1, b1.hh, "bad-signature")
    assert await buf.quarantined() == [(1, "bad-signature")]
    assert await buf.pending_batches() == [b2]  # not resent
    assert not await buf.ack(1, b1.hh)  # a quarantined batch is not deleted by an ack
    stats = await buf.stats()
    assert (stats.batches_pending, stats.batches_quarantined) == (1, 1)
    assert stats.batches_quarantined_bytes == len(b1.payload)
    await buf.close()


async def test_seal_does_nothing_if_an_event_was_dropped_meanwhile(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path, max_events=10)
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("ble", i) for i in range(8)])
    events = await buf.unsealed(5, 1 << 20)
    await put_all(buf, [ev("pos", i) for i in range(5)])  # evicts the oldest ble
    build = Builder()
    with pytest.raises(SealConflict):
        await buf.seal(events, build)
    assert build.calls == []
    assert await buf.pending_batches() == []
    batch = await buf.seal(await buf.unsealed(5, 1 << 20), build)
    assert batch.seq == 1  # the failed attempt used no seq
    await buf.close()


async def test_sealed_batches_are_dropped_only_when_nothing_else_is_left(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Stored events go first; a sealed batch (the oldest, quarantined ones before pending
    ones) only when no event is left, e.g. after the bound was lowered below the batches."""
    buf = await Buffer.open(make_cfg(tmp_path, max_events=20), clock)
    await put_all(buf, [ev("ble", i) for i in range(12)])
    b1 = await buf.seal(await buf.unsealed(4, 1 << 20), Builder())  # seq 1: ids 1-4
    await buf.seal(await buf.unsealed(4, 1 << 20), Builder())  # seq 2: ids 5-8
    await buf.seal(await buf.unsealed(4, 1 << 20), Builder())  # seq 3: ids 9-12
    await buf.quarantine(1, b1.hh, "malformed")
    await put_all(buf, [ev("pos", i) for i in range(8)])  # ids 13-20: full
    await put_all(buf, [ev("pos", 99)])  # id 21: the oldest stored pos goes, not a batch
    assert [b.seq for b in await buf.pending_batches()] == [2, 3]
    assert await buf.quarantined() == [(1, "malformed")]
    await buf.close()

    buf = await Buffer.open(make_cfg(tmp_path, max_events=6), clock)
    await put_all(buf, [ev("pos", 100)])  # every event goes, then batches: quarantined first
    assert await buf.quarantined() == []
    assert [b.seq for b in await buf.pending_batches()] == [3]
    stats = await buf.stats()
    assert stats.drops["*/full_batch"] == 8
    reports = [msgpack.unpackb(e.body)["data"] for e in await buf.unsealed(100, 1 << 20)]
    assert {"source": "*", "count": 8, "reason": "full_batch", "first_id": 1, "last_id": 8} in reports
    await buf.close()


async def test_export_yields_sealed_then_unsent_events(tmp_path: Path, clock: FakeClock) -> None:
    cfg = make_cfg(tmp_path)
    buf = await Buffer.open(cfg, clock)
    await put_all(buf, [ev("nfc", i) for i in range(1, 6)])
    await buf.seal(await buf.unsealed(2, 1 << 20), Builder())
    await buf.seal(await buf.unsealed(1, 1 << 20), Builder())
    b3 = await buf.seal(await buf.unsealed(1, 1 << 20), Builder())
    await buf.quarantine(3, b3.hh, "chain-broken")
    exported = list(iter_events(cfg.buffer_path))  # works while the buffer is open
    assert count_events(cfg.buffer_path) == len(exported) == 5  # the export progress bar's total
    await buf.close()
    assert [(e["id"], e.get("batch"), e.get("batch_state")) for e in exported] == [
        (1, 1, "pending"),
        (2, 1, "pending"),
        (3, 2, "pending"),
        (4, 3, "quarantined"),
        (5, None, None),
    ]
    assert exported[-1] == {
        "id": 5,
        "ts": NOW + 5,
        "src": "nfc",
        "type": "presence.enter",
        "data": {"p": f"{5:016x}", "pad": ""},
    }


async def test_read_stats_from_another_process_while_writing(tmp_path: Path, clock: FakeClock) -> None:
    """`edge status` reads a consistent snapshot read-only while the daemon keeps committing."""
    cfg = make_cfg(tmp_path, commit_interval="10ms")
    buf = await Buffer.open(cfg, clock)
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            await buf.put(ev("ble" if i % 3 else "pos", i))
            i += 1
            if i % 200 == 0:
                await asyncio.sleep(0.005)

    writer = asyncio.create_task(write())
    script = "import json, sys; from pathlib import Path; from edge.buffer import read_stats; " + (
        "print(json.dumps(read_stats(Path(sys.argv[1])).to_json()))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen: list[dict[str, Any]] = []
    try:
        for _ in range(3):
            await asyncio.sleep(0.2)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                script,
                str(cfg.buffer_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
                env=env,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            seen.append(json.loads(out))
    finally:
        stop.set()
        await writer
    last = await buf.flush()
    final = await buf.stats()
    await buf.close()
    ids = [s["next_event_id"] for s in seen]
    assert ids == sorted(ids)
    assert 1 < ids[0] < ids[-1] <= last + 1
    for s in seen:
        assert s["backlog"]["pos"]["events"] + s["backlog"]["ble"]["events"] == s["next_event_id"] - 1
        assert s["backlog"]["pos"]["oldest_ts"] == NOW
        assert s["degraded"] is None
    assert final.next_event_id == last + 1


async def test_backlog_counters_stay_exact_while_commits_race_seals_and_acks(tmp_path: Path) -> None:
    """Seals and acks change the in-memory counters under the lock, so a commit that copied them
    right after the lock was freed cannot overwrite the change (the fleet simulator found stats
    reporting 20 events left in buffers that were empty)."""
    buf = await Buffer.open(make_cfg(tmp_path, commit_interval=0.001), FakeClock(wall=NOW))
    build = Builder()
    try:
        async def produce() -> None:
            for i in range(400):
                await buf.put(ev(i=i))
                if i % 4 == 0:
                    await asyncio.sleep(0.002)  # commits keep coming while the drain seals
            await buf.flush()

        async def drain() -> None:
            while True:
                events = await buf.unsealed(7, 1 << 20)
                if events:
                    batch = await buf.seal(events, build)
                    assert await buf.ack(batch.seq, batch.hh)
                elif producer.done():
                    return
                await asyncio.sleep(0)

        producer = asyncio.create_task(produce())
        await asyncio.gather(producer, drain())
        stats = await buf.stats()
        assert sum(b.events for b in stats.backlog.values()) == 0
        assert (stats.batches_pending, stats.batches_pending_bytes) == (0, 0)
    finally:
        await buf.close()
