"""Sealed batches in the buffer database: seal, list, ack, quarantine (caller holds the lock).

A batch is sealed in ONE transaction that reads and advances the chain (`next_seq`,
`prev_hash` in meta), stores the payload and removes its events from the backlog; seq is
never reused because `next_seq` only moves forward, in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aiosqlite

from edge.buffer.schema import SealedBatch, StoredEvent
from edge.errors import BufferError_

Build = Callable[[int, bytes, list[StoredEvent]], SealedBatch]
_IN_IDS = "id IN (SELECT value FROM json_each(?))"


class SealConflict(BufferError_):
    """Events handed to `seal()` are no longer all stored (dropped or sealed meanwhile)."""


async def rollback(db: aiosqlite.Connection) -> None:
    if db.in_transaction:
        try:
            await db.execute("ROLLBACK")
        except Exception:
            return


async def unsealed(
    db: aiosqlite.Connection, max_events: int, max_bytes: int, newest: bool
) -> list[StoredEvent]:
    order = "DESC" if newest else "ASC"
    got = await db.execute_fetchall(
        f"SELECT id, ts, src, size, body FROM events ORDER BY id {order} LIMIT ?",  # noqa: S608 - fixed words
        (max_events,),
    )
    out: list[StoredEvent] = []
    total = 0
    for eid, ts, src, size, body in got:
        if out and total + size > max_bytes:
            break
        out.append(StoredEvent(eid, ts, src, size, body))
        total += size
    return out[::-1] if newest else out


async def seal(
    db: aiosqlite.Connection, events: list[StoredEvent], build: Build, now_ms: int, next_id: int
) -> tuple[SealedBatch, list[tuple[int, int, int]]]:
    """Seal in one transaction; returns the batch and (prio, count, bytes) removed per rank.
    `next_id` is persisted too (deleting events may remove the highest id)."""
    ids = json.dumps([e.id for e in events])
    await db.execute("BEGIN IMMEDIATE")
    try:
        removed = [
            (int(p), int(n), int(b))
            for p, n, b in await db.execute_fetchall(
                f"SELECT prio, count(*), sum(size) FROM events WHERE {_IN_IDS} GROUP BY prio",  # noqa: S608
                (ids,),
            )
        ]
        _check_all_stored(events, removed)
        meta = {r[0]: r[1] for r in await db.execute_fetchall("SELECT k, v FROM meta")}
        seq, prev = int(meta["next_seq"]), bytes(meta["prev_hash"])
        batch = build(seq, prev, events)
        _check_built(batch, seq)
        await db.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', NULL)",
            (seq, batch.hh, batch.payload, batch.first, batch.last, batch.n, now_ms),
        )
        await db.execute(f"DELETE FROM events WHERE {_IN_IDS}", (ids,))  # noqa: S608 - fixed words
        await db.executemany(
            "UPDATE meta SET v = ? WHERE k = ?",
            [(seq + 1, "next_seq"), (batch.hh, "prev_hash"), (next_id, "next_event_id")],
        )
        await db.execute("COMMIT")
    except BaseException:
        await rollback(db)
        raise
    return batch, removed


def _check_all_stored(events: list[StoredEvent], removed: list[tuple[int, int, int]]) -> None:
    if sum(n for _, n, _ in removed) != len(events) or len({e.id for e in events}) != len(events):
        raise SealConflict("some events to seal are no longer stored (dropped or sealed meanwhile)")


def _check_built(batch: SealedBatch, seq: int) -> None:
    if batch.seq != seq or len(batch.hh) != 32:
        raise ValueError(f"build returned seq {batch.seq} (expected {seq}) or a header hash not 32 bytes")


async def pending(db: aiosqlite.Connection, limit: int | None) -> list[SealedBatch]:
    got = await db.execute_fetchall(
        "SELECT seq, hh, payload, first, last, n FROM batches WHERE state = 'pending'"
        " ORDER BY seq LIMIT ?",
        (-1 if limit is None else limit,),
    )
    return [SealedBatch(*r) for r in got]


async def ack(
    db: aiosqlite.Connection, seq: int, hh: bytes, now_ms: int, next_id: int
) -> tuple[int, int] | None:
    """Delete pending batch `seq` if its hash is `hh`; (events, bytes) removed, or None."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        got = list(
            await db.execute_fetchall(
                "DELETE FROM batches WHERE seq = ? AND hh = ? AND state = 'pending'"
                " RETURNING n, length(payload)",
                (seq, bytes(hh)),
            )
        )
        if got:
            await db.executemany(
                "INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                [("last_ack_ms", now_ms), ("next_event_id", next_id)],
            )
        await db.execute("COMMIT")
    except BaseException:
        await rollback(db)
        raise
    return (int(got[0][0]), int(got[0][1])) if got else None


async def quarantine(db: aiosqlite.Connection, seq: int, hh: bytes, err: str) -> bool:
    cur = await db.execute(
        "UPDATE batches SET state = 'quarantined', err = ?"
        " WHERE seq = ? AND hh = ? AND state = 'pending'",
        (err[:500], seq, bytes(hh)),
    )
    return cur.rowcount > 0


async def quarantined(db: aiosqlite.Connection) -> list[tuple[int, str]]:
    got = await db.execute_fetchall(
        "SELECT seq, coalesce(err, '') FROM batches WHERE state = 'quarantined' ORDER BY seq"
    )
    return [(int(s), str(e)) for s, e in got]
