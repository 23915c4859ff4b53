"""Buffer statistics and export, readable from another process while the daemon runs.

`read_stats` and `iter_events` open the database read-only (`file:...?mode=ro`), inside one
read transaction: WAL gives them a consistent snapshot without blocking the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from edge.buffer.schema import decode_batch_events, decode_body
from edge.errors import BufferError_
from edge.events import SOURCES

log = structlog.get_logger("edge.buffer")

BATCHES_SQL = (
    "SELECT state, count(*), coalesce(sum(length(payload)), 0), min(sealed_ms) FROM batches GROUP BY state"
)
DROPS_SQL = "SELECT source, reason, count, pending FROM drops ORDER BY source, reason"
META_SQL = "SELECT k, v FROM meta WHERE k IN ('next_event_id', 'next_seq', 'last_ack_ms')"
# plain inserts do not rewrite meta.next_event_id: the next id is at least max(id) + 1
TOP_ID_SQL = (
    "SELECT max(coalesce((SELECT max(id) FROM events), 0), coalesce((SELECT max(last) FROM batches), 0))"
)
OLDEST_SQL = "SELECT ts FROM events WHERE prio = ? ORDER BY id LIMIT 1"
_BACKLOG_SQL = "SELECT prio, src, count(*), coalesce(sum(size), 0) FROM events GROUP BY prio, src"


@dataclass(slots=True, frozen=True)
class SourceBacklog:
    """Unsent (not yet sealed) events of one source; `oldest_ts` is the capture time of the
    first stored of them (None when there are none)."""

    events: int
    bytes: int
    oldest_ts: int | None


@dataclass(slots=True, frozen=True)
class BufferStats:
    backlog: Mapping[str, SourceBacklog]
    batches_pending: int
    batches_pending_bytes: int
    batches_quarantined: int
    batches_quarantined_bytes: int
    drops: Mapping[str, int]  # "source/reason" -> cumulative count
    drops_unreported: int  # counted but not yet reported in an edge.dropped event
    last_ack_ms: int | None
    next_event_id: int
    next_seq: int
    queued: int = 0  # waiting for a commit (only known inside the daemon)
    degraded: str | None = None  # only known inside the daemon
    oldest_pending_sealed_ms: int | None = None  # when the oldest unacked batch was sealed (wall clock)

    @property
    def oldest_unsent_ts(self) -> int | None:
        found = [b.oldest_ts for b in self.backlog.values() if b.oldest_ts is not None]
        return min(found) if found else None

    def to_json(self) -> dict[str, Any]:
        return {
            "backlog": {
                src: {"events": b.events, "bytes": b.bytes, "oldest_ts": b.oldest_ts}
                for src, b in self.backlog.items()
            },
            "backlog_events": sum(b.events for b in self.backlog.values()),
            "backlog_bytes": sum(b.bytes for b in self.backlog.values()),
            "oldest_unsent_ts": self.oldest_unsent_ts,
            "batches_pending": self.batches_pending,
            "batches_pending_bytes": self.batches_pending_bytes,
            "batches_quarantined": self.batches_quarantined,
            "batches_quarantined_bytes": self.batches_quarantined_bytes,
            "drops": dict(self.drops),
            "drops_unreported": self.drops_unreported,
            "last_ack_ms": self.last_ack_ms,
            "next_event_id": self.next_event_id,
            "next_seq": self.next_seq,
            "queued": self.queued,
            "degraded": self.degraded,
            "oldest_pending_sealed_ms": self.oldest_pending_sealed_ms,
        }


def assemble(
    backlog: Mapping[str, SourceBacklog],
    batch_rows: Iterable[Any],
    drop_rows: Iterable[Any],
    meta_rows: Iterable[Any],
    top_id: int = 0,
    *,
    queued: int = 0,
    degraded: str | None = None,
) -> BufferStats:
    """BufferStats from the rows of BATCHES_SQL, DROPS_SQL and META_SQL."""
    full: dict[str, SourceBacklog] = {src: SourceBacklog(0, 0, None) for src in SOURCES}
    full.update(backlog)
    batches: dict[str, tuple[int, int]] = {}
    oldest_pending: int | None = None
    for state, n, b, sealed in batch_rows:
        batches[state] = (int(n), int(b))
        if state == "pending" and sealed is not None:
            oldest_pending = int(sealed)
    drops: dict[str, int] = {}
    unreported = 0
    for source, reason, count, pending in drop_rows:
        drops[f"{source}/{reason}"] = int(count)
        unreported += int(pending)
    meta = {r[0]: r[1] for r in meta_rows}
    last_ack = meta.get("last_ack_ms")
    return BufferStats(
        backlog=full,
        batches_pending=batches.get("pending", (0, 0))[0],
        batches_pending_bytes=batches.get("pending", (0, 0))[1],
        batches_quarantined=batches.get("quarantined", (0, 0))[0],
        batches_quarantined_bytes=batches.get("quarantined", (0, 0))[1],
        drops=drops,
        drops_unreported=unreported,
        last_ack_ms=int(last_ack) if last_ack is not None else None,
        next_event_id=max(int(meta.get("next_event_id", 1)), top_id + 1),
        next_seq=int(meta.get("next_seq", 1)),
        queued=queued,
        degraded=degraded,
        oldest_pending_sealed_ms=oldest_pending,
    )


async def gather(
    db: aiosqlite.Connection,
    per_src: Mapping[str, tuple[int, int, int]],
    top_id: int,
    queued: int,
    degraded: str | None,
) -> BufferStats:
    """Stats inside the daemon: backlog counts from memory (src -> events, bytes, prio)."""
    backlog: dict[str, SourceBacklog] = {}
    for src, (n, size, prio) in per_src.items():
        got = list(await db.execute_fetchall(OLDEST_SQL, (prio,))) if n else []
        backlog[src] = SourceBacklog(n, size, int(got[0][0]) if got else None)
    return assemble(
        backlog,
        await db.execute_fetchall(BATCHES_SQL),
        await db.execute_fetchall(DROPS_SQL),
        await db.execute_fetchall(META_SQL),
        top_id,
        queued=queued,
        degraded=degraded,
    )


def _connect_ro(path: Path) -> sqlite3.Connection:
    try:
        uri = f"{path.absolute().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
        conn.execute("BEGIN")  # one snapshot for every query that follows
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot read {path}: {exc}", hint="check the path and its permissions") from exc
    return conn


def read_stats(path: Path) -> BufferStats:
    """Stats of the buffer at `path`, read-only; safe while the daemon writes."""
    conn = _connect_ro(path)
    try:
        backlog: dict[str, SourceBacklog] = {}
        for prio, src, n, size in conn.execute(_BACKLOG_SQL).fetchall():
            row = conn.execute(OLDEST_SQL, (prio,)).fetchone()
            backlog[str(src)] = SourceBacklog(int(n), int(size), int(row[0]) if row else None)
        return assemble(
            backlog,
            conn.execute(BATCHES_SQL).fetchall(),
            conn.execute(DROPS_SQL).fetchall(),
            conn.execute(META_SQL).fetchall(),
            int(conn.execute(TOP_ID_SQL).fetchone()[0]),
        )
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()


def count_events(path: Path) -> int:
    """How many events `iter_events` will yield at most (sealed batches' plus unsent)."""
    conn = _connect_ro(path)
    try:
        batched = conn.execute("SELECT coalesce(sum(n), 0) FROM batches").fetchone()[0]
        unsent = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return int(batched) + int(unsent)
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every stored event as its wire map, read-only (for `edge export`).

    Sealed batches come first, by seq (their events carry two extra keys: `"batch"`, the
    seq, and `"batch_state"`, pending or quarantined), then unsent events by id. A damaged
    batch or body is skipped with a warning, never raised.
    """
    conn = _connect_ro(path)
    try:
        for seq, state, payload in conn.execute("SELECT seq, state, payload FROM batches ORDER BY seq"):
            try:
                events = decode_batch_events(payload)
            except ValueError as exc:
                log.warning("export_batch_unreadable", seq=seq, error=str(exc))
                continue
            for ev in events:
                yield {**ev, "batch": seq, "batch_state": state}
        for eid, body in conn.execute("SELECT id, body FROM events ORDER BY id"):
            try:
                yield decode_body(body)
            except ValueError as exc:
                log.warning("export_event_unreadable", id=eid, error=str(exc))
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()
