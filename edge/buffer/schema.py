"""The buffer database: schema migrations (PRAGMA user_version), row types, body encoding.

Version history (append only; a migration is never edited once released):
  v1  meta, events (+ index by priority), batches, drops.
Meta keys added without a version bump (absent = default): `priorities`, `last_ack_ms`,
`retention_marks` (JSON [[boot id, monotonic ms, wall ms, max id], ...], bounds.py; absent or
unreadable = no marks, which only delays retention).

`events.body` is exactly the wire Event map as MessagePack (str as str, bytes as bin), so the
uplink concatenates bodies behind an array header without re-encoding. `size` is
`len(body)`; `prio` is the source's rank in `buffer.priorities` (0 = highest), rewritten at
open when the configured order changes.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from edge.errors import BufferError_
from edge.events import SOURCES

ZERO_HASH = bytes(32)

_V1 = (
    "CREATE TABLE meta (k TEXT PRIMARY KEY NOT NULL, v)",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,
        src TEXT NOT NULL,
        prio INTEGER NOT NULL,
        size INTEGER NOT NULL,
        body BLOB NOT NULL)""",
    # (prio, rowid): eviction walks the lowest priority oldest first; retention scans one source
    "CREATE INDEX events_prio ON events (prio)",
    """CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        hh BLOB NOT NULL,
        payload BLOB NOT NULL,
        first INTEGER NOT NULL,
        last INTEGER NOT NULL,
        n INTEGER NOT NULL,
        sealed_ms INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'quarantined')),
        err TEXT)""",
    # count: cumulative; pending: not yet reported in an edge.dropped event (first/last: its ids)
    """CREATE TABLE drops (
        source TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 0,
        pending INTEGER NOT NULL DEFAULT 0,
        first_id INTEGER,
        last_id INTEGER,
        last_ms INTEGER,
        PRIMARY KEY (source, reason))""",
    "INSERT INTO meta (k, v) VALUES ('next_event_id', 1), ('next_seq', 1), ('prev_hash', zeroblob(32))",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(slots=True, frozen=True)
class StoredEvent:
    """A committed, not yet sealed event; `body` is its wire map as MessagePack."""

    id: int
    ts: int
    src: str
    size: int
    body: bytes


@dataclass(slots=True, frozen=True)
class SealedBatch:
    """A sealed uplink batch: `payload` is sent byte for byte; `hh` = SHA-256 of its header."""

    seq: int
    hh: bytes
    payload: bytes
    first: int
    last: int
    n: int


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring an autocommit connection to SCHEMA_VERSION; returns the version found.

    Each step runs in its own transaction together with its user_version bump, so a crash
    leaves the database at a whole version.
    """
    found = user_version(conn)
    if found > SCHEMA_VERSION:
        raise BufferError_(
            f"buffer database has schema version {found}, this build knows up to {SCHEMA_VERSION}",
            hint="run the newer store-edge that created it, or export and move the file aside",
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def ranks(priorities: Sequence[str]) -> dict[str, int]:
    """Source -> priority rank (0 = highest); every source has one."""
    r = {src: i for i, src in enumerate(priorities)}
    for src in SOURCES:
        r.setdefault(src, len(r))
    return r


def apply_priorities(conn: sqlite3.Connection, priorities: Sequence[str]) -> bool:
    """Rewrite stored `prio` when the configured order changed; returns whether it did."""
    want = ",".join(priorities)
    row = conn.execute("SELECT v FROM meta WHERE k = 'priorities'").fetchone()
    if row is not None and row[0] == want:
        return False
    r = ranks(priorities)
    case = " ".join(f"WHEN '{src}' THEN {rank}" for src, rank in r.items())  # literals from SOURCES
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"UPDATE events SET prio = CASE src {case} ELSE {len(r)} END")  # noqa: S608 - fixed literals
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('priorities', ?)", (want,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def decode_body(body: bytes) -> dict[str, Any]:
    """A stored body back to its wire map; ValueError when it is not one."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"undecodable event body: {exc}") from exc
    if not isinstance(m, dict) or not {"id", "ts", "src", "type", "data"} <= m.keys():
        raise ValueError("event body is not an event map")
    return m


_MAX_BODY = 256 * 1024**2


def decode_batch_events(payload: bytes) -> list[dict[str, Any]]:
    """The events inside a sealed batch payload {"v","h","b","s"}; ValueError on garbage."""
    try:
        outer = msgpack.unpackb(payload, raw=False)
        header = msgpack.unpackb(outer["h"], raw=False)
        body = outer["b"]
        if header.get("z") == "zlib":
            body = _inflate(body)
        events = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except ValueError:
        raise
    except Exception as exc:  # msgpack/zlib/key errors on a damaged payload
        raise ValueError(f"undecodable batch payload: {exc}") from exc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError("batch body is not an array of event maps")
    return events


def _inflate(body: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(body, _MAX_BODY)
    if d.unconsumed_tail:
        raise ValueError("batch body too large")
    return out
