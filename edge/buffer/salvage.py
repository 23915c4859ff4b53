"""Open-time integrity check and salvage of a corrupt buffer database (synchronous; run in a thread).

A database that fails `PRAGMA quick_check` (or is not a database at all) is never deleted:

1. whatever rows can be read are copied, row range by row range, skipping unreadable
   pages, into `<file>.salvage-tmp`, which is then renamed to `<file>.salvaged`;
2. the corrupt file with its -wal/-shm/-journal is renamed to `<file>.corrupt-<UTC time>`;
3. `<file>.salvaged` is renamed to `<file>`.

A crash anywhere in between is finished (or restarted) by the next open: a `.salvaged`
file without `<file>` is put in place; with `<file>` still there, salvage starts over.
Counters (next event id, next seq) are kept at least past every salvaged row; when the
meta table itself is lost they jump ahead (ids and seqs must never be reused; a gap is
reported by receivers, a reuse would be silently deduplicated).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack
import structlog

from edge.buffer.schema import ZERO_HASH, apply_priorities, decode_body, migrate, ranks
from edge.clock import Clock
from edge.errors import BufferError_
from edge.events import SOURCES

log = structlog.get_logger("edge.buffer")

ID_JUMP = 1_000_000  # event ids skipped when the persisted counter is unreadable
SEQ_JUMP = 1_000  # batch seqs skipped likewise
_CHUNK = 1000
_PROBE_BUDGET = 20_000  # failing single-row probes before unreadable regions are skipped whole
_INT64_MAX = 2**63 - 1
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(slots=True, frozen=True)
class OpenReport:
    """What happened at open: `ok` (existing database fine), `created`, or `salvaged`."""

    status: Literal["ok", "created", "salvaged"]
    version_from: int = 0
    moved_to: Path | None = None
    salvaged_events: int = 0
    salvaged_batches: int = 0
    lost: int = 0  # events known lost; -1 when unknowable
    problem: str | None = None

    def __str__(self) -> str:
        if self.status != "salvaged":
            return self.status
        lost = "unknown" if self.lost < 0 else str(self.lost)
        return (
            f"salvaged {self.salvaged_events} events and {self.salvaged_batches} batches "
            f"(lost: {lost}); corrupt file moved to {self.moved_to}"
        )


def is_corruption(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _CORRUPT_CODES


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(path: Path, priorities: Sequence[str], clock: Clock) -> OpenReport:
    """Check, salvage if needed, migrate and set WAL mode; the caller then connects."""
    salvaged = path.with_name(path.name + ".salvaged")
    if salvaged.exists():
        if path.exists():
            salvaged.unlink()  # derived copy from an interrupted salvage; the original is intact
        else:
            salvaged.replace(path)
            fsync_dir(path.parent)
    report: OpenReport | None = None
    existed = path.exists()
    if existed:
        problem = check(path)
        if problem is not None:
            report = salvage(path, priorities, clock, problem)
    version = _finish(path, priorities, created=not existed)
    if report is not None:
        return report
    return OpenReport(status="ok" if existed else "created", version_from=version)


def check(path: Path) -> str | None:
    """None when the database passes quick_check; else what is wrong. Other errors raise."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot open {path}: {exc}", hint="check permissions of the state dir") from exc
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            return str(exc)
        raise BufferError_(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:5])


def _finish(path: Path, priorities: Sequence[str], *, created: bool) -> int:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BufferError_(f"{path}: cannot switch to WAL mode (got {mode})")
            found = migrate(conn)
            apply_priorities(conn, priorities)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BufferError_(f"cannot prepare {path}: {exc}", hint="check free space and permissions") from exc
    if created:
        fsync_dir(path.parent)
    return found


# ------------------------------------------------------------------------------ salvage


def salvage(path: Path, priorities: Sequence[str], clock: Clock, problem: str) -> OpenReport:
    tmp = path.with_name(path.name + ".salvage-tmp")
    for p in (tmp, *(tmp.with_name(tmp.name + s) for s in _SIDE_FILES)):
        p.unlink(missing_ok=True)
    src = _open_ro(path)
    try:
        counts = _build(src, tmp, priorities, clock)
    finally:
        if src is not None:
            src.close()
    salvaged = path.with_name(path.name + ".salvaged")
    tmp.replace(salvaged)
    fsync_dir(path.parent)
    moved = _move_aside(path, clock)
    salvaged.replace(path)
    fsync_dir(path.parent)
    report = OpenReport(
        status="salvaged",
        moved_to=moved,
        salvaged_events=counts[0],
        salvaged_batches=counts[1],
        lost=counts[2],
        problem=problem,
    )
    log.warning(
        "buffer_corrupt_moved_aside",
        path=str(path),
        moved_to=str(moved),
        problem=problem[:200],
        salvaged_events=report.salvaged_events,
        salvaged_batches=report.salvaged_batches,
        lost=report.lost,
        hint="the moved-aside file is kept for inspection; delete it when done",
    )
    return report


def _open_ro(path: Path) -> sqlite3.Connection | None:
    """A read-only connection, or None when not even the schema can be read."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return None
    if _try(conn, "SELECT name FROM sqlite_master") is None:
        conn.close()
        return None
    return conn


def _move_aside(path: Path, clock: Clock) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock.wall_ms() / 1000))
    base = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while base.exists():
        n += 1
        base = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    # side files first: the fresh file must never pick up the corrupt one's WAL or journal
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(base.with_name(base.name + suffix))
    path.replace(base)
    fsync_dir(path.parent)
    return base


def _try(conn: sqlite3.Connection | None, sql: str, args: tuple[Any, ...] = ()) -> list[Any] | None:
    if conn is None:
        return None
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return None


class _Scanner:
    """Reads a rowid table in key order, range by range, skipping what cannot be read."""

    def __init__(self, conn: sqlite3.Connection | None, table: str, key: str, cols: str) -> None:
        self._conn = conn
        self._fwd = f"SELECT {cols} FROM {table} WHERE {key} >= ? ORDER BY {key} LIMIT {_CHUNK}"  # noqa: S608 - fixed names
        self._rng = f"SELECT {cols} FROM {table} WHERE {key} BETWEEN ? AND ? ORDER BY {key}"  # noqa: S608 - fixed names
        self._hi = f"SELECT max({key}) FROM {table}"  # noqa: S608 - fixed names
        self._probes = 0

    def rows(self) -> Iterator[tuple[Any, ...]]:
        conn = self._conn
        if conn is None:
            return
        hi_rows = _try(conn, self._hi)
        hi = hi_rows[0][0] if hi_rows and isinstance(hi_rows[0][0], int) else _INT64_MAX
        a, width = 1, _CHUNK  # ids and seqs start at 1
        while a <= hi:
            try:
                got = conn.execute(self._fwd, (a,)).fetchall()
            except sqlite3.Error:
                got = None
            if got is not None:
                if not got:
                    return
                yield from got
                a = int(got[-1][0]) + 1
                width = _CHUNK
                continue
            b = min(a + width - 1, hi)
            yield from self._bisect(a, b)
            a = b + 1
            if self._probes >= _PROBE_BUDGET:
                width = min(width * 2, _INT64_MAX // 4)

    def _bisect(self, a: int, b: int) -> Iterator[tuple[Any, ...]]:
        stack = [(a, b)]
        while stack:
            lo, hi = stack.pop()
            got = _try(self._conn, self._rng, (lo, hi))
            if got is not None:
                yield from got
                continue
            self._probes += 1
            if lo == hi or self._probes >= _PROBE_BUDGET:
                continue
            mid = (lo + hi) // 2
            stack.append((mid + 1, hi))
            stack.append((lo, mid))


def _valid_event(row: tuple[Any, ...]) -> bool:
    eid, ts, src, body = row[0], row[1], row[2], row[3]
    if not (isinstance(eid, int) and isinstance(ts, int) and src in SOURCES and isinstance(body, bytes)):
        return False
    try:
        m = decode_body(body)
    except ValueError:
        return False
    return bool(m["id"] == eid and m["src"] == src)


def _valid_batch(row: tuple[Any, ...]) -> bool:
    seq, hh, payload, first, last, n, sealed_ms, state, err = row
    ints = all(isinstance(v, int) for v in (seq, first, last, n, sealed_ms))
    return (
        ints
        and seq > 0
        and isinstance(hh, bytes)
        and len(hh) == 32
        and isinstance(payload, bytes)
        and state in ("pending", "quarantined")
        and (err is None or isinstance(err, str))
    )


def _build(
    src: sqlite3.Connection | None, tmp: Path, priorities: Sequence[str], clock: Clock
) -> tuple[int, int, int]:
    """Copy what is readable into a fresh database at `tmp`; (events, batches, lost)."""
    rank = ranks(priorities)
    meta_rows = _try(src, "SELECT k, v FROM meta")
    meta = dict(meta_rows) if meta_rows else {}
    total = _try(src, "SELECT count(*) FROM events")
    drops = _try(src, "SELECT source, reason, count, pending, first_id, last_id, last_ms FROM drops") or []
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        out.execute("PRAGMA journal_mode = DELETE")
        out.execute("PRAGMA synchronous = FULL")
        migrate(out)
        out.execute("BEGIN IMMEDIATE")
        n_ev, max_id = 0, 0
        ev_scan = _Scanner(src, "events", "id", "id, ts, src, body")
        for chunk in _chunks(r for r in ev_scan.rows() if _valid_event(r)):
            out.executemany(
                "INSERT INTO events (id, ts, src, prio, size, body) VALUES (?, ?, ?, ?, ?, ?)",
                [(r[0], r[1], r[2], rank[r[2]], len(r[3]), r[3]) for r in chunk],
            )
            n_ev += len(chunk)
            max_id = max(max_id, chunk[-1][0])
        cols = "seq, hh, payload, first, last, n, sealed_ms, state, err"
        batches = [r for r in _Scanner(src, "batches", "seq", cols).rows() if _valid_batch(r)]
        out.executemany(f"INSERT INTO batches ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batches)  # noqa: S608 - fixed names
        for d in drops:
            if not (isinstance(d[0], str) and isinstance(d[1], str) and isinstance(d[2], int)):
                continue
            with contextlib.suppress(sqlite3.Error):  # a garbage row is skipped, not fatal
                out.execute("INSERT OR REPLACE INTO drops VALUES (?, ?, ?, ?, ?, ?, ?)", d)
        max_id = max([max_id] + [b[4] for b in batches])
        max_seq = max([0] + [b[0] for b in batches])
        next_id, next_seq, prev = _counters(meta, max_id, max_seq, batches)
        lost = -1
        if total and isinstance(total[0][0], int) and total[0][0] >= n_ev:
            lost = total[0][0] - n_ev
        now = clock.wall_ms()
        data: dict[str, Any] = {"source": "*", "count": lost, "reason": "corrupt"}
        wire = {"id": next_id, "ts": now, "src": "edge", "type": "edge.dropped", "data": data}
        body = msgpack.packb(wire, use_bin_type=True)
        out.execute(
            "INSERT INTO events (id, ts, src, prio, size, body) VALUES (?, ?, 'edge', ?, ?, ?)",
            (next_id, now, rank["edge"], len(body), body),
        )
        out.execute(
            "INSERT INTO drops (source, reason, count, pending, last_ms) VALUES ('*', 'corrupt', ?, 0, ?)"
            " ON CONFLICT (source, reason) DO UPDATE"
            " SET count = count + excluded.count, last_ms = excluded.last_ms",
            (max(lost, 0), now),
        )
        kv: list[tuple[str, Any]] = [
            ("next_event_id", next_id + 1),
            ("next_seq", next_seq),
            ("prev_hash", prev),
        ]
        if isinstance(meta.get("last_ack_ms"), int):
            kv.append(("last_ack_ms", meta["last_ack_ms"]))
        out.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", kv)
        out.execute("COMMIT")
    finally:
        out.close()
    return n_ev, len(batches), lost


def _counters(
    meta: dict[Any, Any], max_id: int, max_seq: int, batches: list[tuple[Any, ...]]
) -> tuple[int, int, bytes]:
    next_id, next_seq, prev = meta.get("next_event_id"), meta.get("next_seq"), meta.get("prev_hash")
    if isinstance(next_id, int) and next_id > 0:
        next_id = max(next_id, max_id + 1)
    else:
        next_id = max_id + 1 + ID_JUMP
        log.warning("buffer_salvage_counter_lost", counter="next_event_id", jumped_to=next_id)
    if isinstance(next_seq, int) and next_seq > 0:
        next_seq = max(next_seq, max_seq + 1)
    else:
        next_seq = max_seq + 1 + SEQ_JUMP
        log.warning("buffer_salvage_counter_lost", counter="next_seq", jumped_to=next_seq)
    if not (isinstance(prev, bytes) and len(prev) == 32):
        prev = max(batches, key=lambda b: b[0])[1] if batches else ZERO_HASH
    return next_id, next_seq, prev


def _chunks(rows: Iterator[tuple[Any, ...]], n: int = 5000) -> Iterator[list[tuple[Any, ...]]]:
    buf: list[tuple[Any, ...]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
