"""Deleting the buffered events that carry given strings (consent withdrawn), in one transaction.

An event "carries" a pseudonym when the pseudonym's UTF-8 bytes occur in its stored body (the
MessagePack wire map: a str value is its bytes behind a length prefix), found with SQLite's
byte-wise `instr` on the BLOB. Stable pseudonyms are `<class>:s<tenant kid>:<26 base32>`, so a
byte match is the pseudonym and nothing else.

The delete runs with `secure_delete` on (SQLite overwrites the deleted cells and freed pages
with zeros) and is followed by a TRUNCATE checkpoint, so the bytes do not linger in the file's
free space nor in the WAL (the checkpoint is best effort: a reader holding an old snapshot, e.g.
`edge status` at that instant, can keep WAL frames until the next checkpoint).

Sealed batches are NOT touched: a sealed batch is signed and hash-chained (uplink-v1); deleting
or rewriting one breaks the chain for the cloud (`chain-broken`, then quarantine) or re-sends a
seq with other bytes. They are counted (`sealed_batches`, `sealed_events`) so the caller can say
how many left carrying it; the cloud erases a withdrawn pseudonym's events on its side
(docs/privacy.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite
import msgpack

from edge.buffer.schema import decode_batch_events

_CHUNK = 50  # needles per statement (SQLite's parameter limit is far above)


@dataclass(slots=True, frozen=True)
class Found:
    ids: list[int]
    removed: list[tuple[int, int, int]]  # (prio, count, bytes) per rank


async def carrying(db: aiosqlite.Connection, needles: Sequence[bytes]) -> Found:
    """Stored unsealed events whose body holds any of `needles` (inside the caller's transaction)."""
    ids: set[int] = set()
    for i in range(0, len(needles), _CHUNK):
        chunk = list(needles[i:i + _CHUNK])
        where = " OR ".join(["instr(body, ?) > 0"] * len(chunk))
        rows = await db.execute_fetchall(f"SELECT id FROM events WHERE {where}", chunk)  # noqa: S608 - fixed text
        ids.update(int(r[0]) for r in rows)
    if not ids:
        return Found([], [])
    id_list = sorted(ids)
    removed = await db.execute_fetchall(
        "SELECT prio, count(*), coalesce(sum(size), 0) FROM events "
        "WHERE id IN (SELECT value FROM json_each(?)) GROUP BY prio", (json.dumps(id_list),))
    return Found(id_list, [(int(p), int(n), int(b)) for p, n, b in removed])


async def delete_ids(db: aiosqlite.Connection, ids: list[int]) -> None:
    await db.execute("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))


async def sealed_carrying(db: aiosqlite.Connection, needles: Sequence[bytes]) -> tuple[int, int]:
    """(batches, events) among sealed, unacknowledged batches that carry any of `needles`."""
    n_batches = n_events = 0
    for (payload,) in await db.execute_fetchall("SELECT payload FROM batches WHERE state = 'pending'"):
        try:
            events = decode_batch_events(payload)
        except ValueError:
            continue
        hits = sum(1 for e in events if any(x in msgpack.packb(e, use_bin_type=True) for x in needles))
        if hits:
            n_batches += 1
            n_events += hits
    return n_batches, n_events


async def checkpoint(db: aiosqlite.Connection) -> None:
    """Move the WAL into the database and truncate it (best effort)."""
    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
