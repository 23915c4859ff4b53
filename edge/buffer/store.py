"""The durable event buffer: group commit into SQLite (WAL, synchronous=FULL by default).

`put()` (or `put_nowait()`, the pipeline's no-await path) packs the event (all but its id,
edge/buffer/packing.py) and enqueues it in a bounded queue, waiting when full. One writer
task takes up to `commit_max_events` events, or whatever is there after `commit_interval`,
gives them their ids and commits them. The common case is ONE autocommit statement
(packing.ColumnInsert; bounds.INSERT_JSON for the odd batch): atomic, durable, and executed
by SQLite without the GIL, so producers keep running meanwhile. An event is accepted once committed;
`add_commit_listener` tells when. Ids are never reused: every transaction that deletes
events or skips ids persists the counter, and at open it is at least max(id) + 1.

Bounds (`max_bytes`, `max_events`) are enforced at commit by the configured policy
(edge/buffer/bounds.py); every drop is counted in the `drops` table and reported downstream
as an `edge.dropped` event (one per source and reason per commit). A full disk or an I/O
error never stops the daemon: the commit is rolled back, the oldest lowest-priority events
make room, and it is retried with backoff while `degraded` says why. Test hook for a full
disk: `set_max_pages()` (PRAGMA max_page_count), or `Buffer.open(..., pragmas={...})`.

Database work holds one asyncio lock. Calls from other components run shielded from
cancellation, so a cancelled caller never leaves a transaction half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import sys
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosqlite
import msgpack
import structlog

from edge.buffer import batches, purge
from edge.buffer.batches import Build
from edge.buffer.bounds import (
    INSERT_JSON,
    Bounds,
    Drop,
    Level,
    Meta,
    Row,
    Tx,
    boot_id,
    insert_params,
    load_marks,
    save_marks,
)
from edge.buffer.packing import MAP5_ID, ColumnInsert, EventPacker, Item
from edge.buffer.salvage import OpenReport, prepare
from edge.buffer.schema import SealedBatch, StoredEvent, ranks
from edge.buffer.stats import BufferStats, gather
from edge.clock import Clock
from edge.config import Config
from edge.errors import BufferError_, StorageFullError
from edge.events import Pending

log = structlog.get_logger("edge.buffer")

T = TypeVar("T")

_FAST_RETRIES = 5  # commit attempts with short backoff before the slow cadence
_SLOW_RETRY_S = 2.0
_PRAGMA_NAME = re.compile(r"^[a-z_]{1,40}$")
_NO_LIMIT_PAGES = 4294967294
# The SQLite thread needs the GIL twice per commit (to start the statement, and once SQLite
# is done). While producers keep the event loop busy, CPython hands the GIL over only after
# a switch interval without a voluntary release, and the loop's brief releases (a zero
# timeout poll at every yield) keep restarting that wait: with the default 5 ms, commits of
# 2000 events waited ~25-35 ms for the GIL and capped ingest below the producers' rate. At
# 1 ms they wait ~0.1 ms. A shorter interval costs nothing while no other thread asks.
SWITCH_INTERVAL_S = 0.001


def _classify(exc: BaseException) -> str:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return "disk_full"
    if code == sqlite3.SQLITE_IOERR:
        return "io_error"
    return "error"


@dataclass(slots=True, frozen=True)
class PurgeResult:
    """What `purge_carrying` did: events deleted, the report's event id, sealed batches left
    carrying a needle (and their events)."""

    deleted: int
    report_id: int
    sealed_batches: int
    sealed_events: int


class Buffer:
    """Durable, bounded event buffer. Create with `await Buffer.open(cfg, clock)`."""

    def __init__(
        self, cfg: Config, clock: Clock, db: aiosqlite.Connection, report: OpenReport, retention_every: float
    ) -> None:
        self._cfg = cfg.buffer
        self._clock = clock
        self._db = db
        self._report = report
        self._path = cfg.buffer_path
        self._rank = ranks(cfg.buffer.priorities)
        self._packer = EventPacker(self._rank)
        self._columns = ColumnInsert(self._rank)
        self._bounds = Bounds(db, cfg.buffer, self._rank, self._packer.body)
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._q: deque[Item] = deque()
        self._qmax = cfg.buffer.queue_max
        self._cmax = cfg.buffer.commit_max_events
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._first_at = 0.0
        self._enq = self._done = self._flush_upto = 0
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._uncounted: Counter[tuple[str, str]] = Counter()  # drops without ids, not yet in a tx
        self._degraded: str | None = None
        self._disk_credit = 0  # bytes freed for a full disk in this episode, not yet used again
        self._last_batch_bytes = 0
        self._retention_every = retention_every
        self._next_retention = clock.monotonic() + retention_every
        self._boot = boot_id()
        self._next_id = 1
        self._level = Level([0] * len(self._rank), [0] * len(self._rank))
        self._drops: dict[tuple[str, str], Drop] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        cfg: Config,
        clock: Clock,
        *,
        pragmas: Mapping[str, int] | None = None,
        retention_every: float = 60.0,
        switch_interval: float | None = SWITCH_INTERVAL_S,
    ) -> Buffer:
        """Open the buffer (create, check, salvage, migrate) and start its writer.

        `pragmas`: extra integer PRAGMAs for the connection, e.g. `{"max_page_count": 64}`
        to simulate a full disk in tests. `retention_every`: seconds between retention runs.
        `switch_interval`: lower the interpreter's GIL switch interval to this (process-wide,
        never raised; see SWITCH_INTERVAL_S); None leaves it alone.
        """
        path = cfg.buffer_path
        bad = [n for n in (pragmas or {}) if not _PRAGMA_NAME.match(n)]
        if bad:
            raise ValueError(f"bad pragma name(s): {bad}")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferError_(f"cannot create {path.parent}: {exc}", hint="check the state dir") from exc
        report = await asyncio.to_thread(prepare, path, cfg.buffer.priorities, clock)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise BufferError_(f"cannot open {path}: {exc}") from exc
        try:
            sync = "FULL" if cfg.buffer.synchronous == "full" else "NORMAL"
            await db.execute(f"PRAGMA synchronous = {sync}")
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_size_limit = 67108864")
            await db.execute("PRAGMA cache_size = -512")  # 512 KiB: RSS matters on a Pi; appends touch few pages
            for name, value in (pragmas or {}).items():
                await db.execute(f"PRAGMA {name} = {int(value)}")
            buf = cls(cfg, clock, db, report, retention_every)
            await buf._load()
        except BaseException:
            await db.close()
            raise
        if switch_interval is not None and sys.getswitchinterval() > switch_interval:
            sys.setswitchinterval(switch_interval)
        buf._writer = asyncio.create_task(buf._run(), name="buffer-writer")
        log.info("buffer_opened", path=str(path), report=str(report), next_event_id=buf._next_id)
        return buf

    async def _load(self) -> None:
        db = self._db
        meta = {r[0]: r[1] for r in await db.execute_fetchall("SELECT k, v FROM meta")}
        tops = await db.execute_fetchall(
            "SELECT (SELECT max(id) FROM events), (SELECT max(last) FROM batches)"
        )
        top = max([0] + [v for row in tops for v in row if isinstance(v, int)])
        self._next_id = max(int(meta.get("next_event_id", 1)), top + 1)
        for prio, n, size in await db.execute_fetchall(
            "SELECT prio, count(*), coalesce(sum(size), 0) FROM events GROUP BY prio"
        ):
            if 0 <= prio < len(self._level.events):
                self._level.events[prio], self._level.bytes[prio] = int(n), int(size)
        for n, size in await db.execute_fetchall(
            "SELECT coalesce(sum(n), 0), coalesce(sum(length(payload)), 0) FROM batches"
        ):
            self._level.batch_events, self._level.batch_bytes = int(n), int(size)
        for source, reason, *cols in await db.execute_fetchall("SELECT * FROM drops"):
            self._drops[(source, reason)] = Drop(*cols)

    async def close(self) -> None:
        """Commit what is queued, stop the writer, close the database. Idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._do_close())
        await asyncio.shield(self._close_task)

    async def _do_close(self) -> None:
        self._closing = True
        self._wake.set()
        self._space.set()
        if self._writer is not None:
            await self._writer
        await self._db.close()
        log.info("buffer_closed", last_committed_id=self.last_committed_id)

    # ------------------------------------------------------------------ ingest

    @property
    def open_report(self) -> OpenReport:
        """What happened at open: ok, created, or salvaged (with the moved-aside path)."""
        return self._report

    @property
    def last_committed_id(self) -> int:
        """Highest event id durably resolved: stored, or recorded as dropped."""
        return self._next_id - 1

    @property
    def queued(self) -> int:
        """Events waiting for a commit."""
        return len(self._q)

    @property
    def degraded(self) -> str | None:
        """Why commits are failing (disk full, I/O error), or None when healthy."""
        return self._degraded

    def add_commit_listener(self, cb: Callable[[int], None]) -> None:
        """`cb(last_committed_id)` after every commit (in the event loop; keep it quick)."""
        self._listeners.append(cb)

    def put_nowait(self, p: Pending) -> bool:
        """Queue an event for the next group commit if the queue has room now; False (and
        nothing done) when `put` would have to wait or raise. The hot path: no await."""
        q = self._q
        if len(q) >= self._qmax or self._closing:
            return False
        try:
            rank, rest = self._packer(p)
        except (TypeError, ValueError, OverflowError, KeyError) as exc:
            self._invalid(p, exc)
            return True
        q.append((p.ts, p.src, rank, rest))
        self._enq += 1
        if len(q) == 1:
            self._first_at = self._loop.time()
            self._wake.set()
        elif len(q) == self._cmax:  # the queue grows one by one: it passes cmax exactly here
            self._wake.set()
        return True

    async def put(self, p: Pending) -> None:
        """Queue an event for the next group commit; waits while the queue is full.

        The event is packed here, all but its id (the writer prepends that), so the queue
        holds compact bytes and later changes to `p.data` cannot leak in. An event that
        cannot be packed (a pipeline bug) is dropped and reported with reason invalid; while
        the buffer is degraded (disk full) a full queue drops the event, reason disk_full."""
        if self.put_nowait(p):
            return
        item = self._item(p)
        if item is None:
            return
        q = self._q
        while True:
            if self._closing:
                raise BufferError_("buffer is closed")
            if len(q) < self._qmax:
                q.append(item)
                self._enq += 1
                self._wake.set()
                return
            if self._degraded is not None:
                self._uncounted[(p.src, "disk_full")] += 1
                return
            self._space.clear()
            await self._space.wait()

    def _item(self, p: Pending) -> Item | None:
        try:
            rank, rest = self._packer(p)
        except (TypeError, ValueError, OverflowError, KeyError) as exc:
            self._invalid(p, exc)
            return None
        return (p.ts, p.src, rank, rest)

    def _invalid(self, p: Pending, exc: Exception) -> None:
        log.error("buffer_event_invalid", src=str(p.src), type=str(p.type), error=str(exc)[:200])
        self._uncounted[(str(p.src), "invalid")] += 1

    async def flush(self) -> int:
        """Commit everything queued now; returns the last committed id."""
        target = self._enq
        if self._done < target:
            self._flush_upto = max(self._flush_upto, target)
            self._wake.set()
            while self._done < target:
                if self._writer is None or self._writer.done():
                    raise BufferError_("buffer writer is not running")
                self._progress.clear()
                await self._progress.wait()
        return self.last_committed_id

    # ------------------------------------------------------------------ writer

    async def _sleep_until_woken(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._wake.wait()

    async def _run(self) -> None:
        while True:
            try:
                if await self._step():
                    return
            except Exception:  # the writer must never die; a bug here is logged and retried
                log.exception("buffer_writer_error")
                await asyncio.sleep(0.5)

    async def _step(self) -> bool:
        """One round of the writer; True once closing and drained."""
        q = self._q
        if not q:
            if self._closing:
                return True
            self._wake.clear()
            await self._sleep_until_woken(self._next_retention - self._clock.monotonic())
            await self._maybe_retention()
            return False
        if len(q) < self._cmax and not self._closing and self._flush_upto <= self._done:
            delay = self._first_at + self._cfg.commit_interval - self._loop.time()
            if delay > 0:
                self._wake.clear()
                await self._sleep_until_woken(delay)
                return False
        n = min(len(q), self._cmax)
        if n == len(q):
            items = list(q)
            q.clear()
        else:
            popleft = q.popleft
            items = [popleft() for _ in range(n)]
        if q:
            self._first_at = self._loop.time()
        try:
            await self._commit_with_retry(items)
        finally:
            self._done += n
            self._progress.set()
        await self._maybe_retention()
        return False

    async def _maybe_retention(self) -> None:
        if self._clock.monotonic() < self._next_retention:
            return
        self._next_retention = self._clock.monotonic() + self._retention_every
        try:
            await self.enforce_retention()
        except (sqlite3.Error, BufferError_) as exc:
            log.warning("buffer_retention_failed", error=str(exc))

    async def _commit_with_retry(self, items: list[Item]) -> None:
        attempt = 0
        while True:
            try:
                # directly, not via _locked: packing and issuing the statement without a yield
                # in between lets producers refill the queue while SQLite works
                async with self._lock:
                    written = await self._commit(items)
            except Exception as exc:  # never lose the batch: SQLite errors and bugs alike are retried
                kind = _classify(exc)
                if not isinstance(exc, sqlite3.Error):
                    log.exception("buffer_commit_error")
                self._set_degraded(kind, exc)
                if self._closing and attempt >= _FAST_RETRIES:
                    log.error("buffer_close_lost", events=len(items), error=str(exc))
                    return
                if kind == "disk_full":  # room for this batch (plus a margin), more on each retry
                    await self._free_for_disk((self._last_batch_bytes * 5 // 4 + 16384) << min(attempt, 3))
                delay = 0.02 * 2**attempt if attempt < _FAST_RETRIES else _SLOW_RETRY_S
                await asyncio.sleep(delay * random.uniform(0.75, 1.25))
                attempt += 1
                continue
            if self._degraded is not None and attempt == 0:
                # space we freed ourselves does not prove the disk has room again
                self._disk_credit -= written
                if self._disk_credit <= 0 or await self._has_room():
                    log.info("buffer_recovered", was=self._degraded, last_committed_id=self.last_committed_id)
                    self._degraded = None
                    self._disk_credit = 0
            for cb in list(self._listeners):
                try:
                    cb(self.last_committed_id)
                except Exception:  # a listener's bug must not stop commits
                    log.exception("buffer_listener_error")
            return

    async def _has_room(self, need: int = 4 * 1024 * 1024) -> bool:
        """Whether the filesystem and the page cap both leave `need` bytes."""
        try:
            st = os.statvfs(self._path.parent)
            rows = await self._locked(self._db.execute_fetchall, "SELECT * FROM pragma_page_count, "
                                      "pragma_max_page_count, pragma_page_size")
        except (OSError, sqlite3.Error):
            return False
        count, cap, size = next(iter(rows))
        return bool(st.f_bavail * st.f_frsize >= need and (cap - count) * size >= need)

    def _set_degraded(self, kind: str, exc: BaseException) -> None:
        if self._degraded is None:
            hint = (
                "free disk space in the state dir; the oldest lowest-priority events are dropped meanwhile"
                if kind == "disk_full"
                else "check the storage device"
            )
            log.warning("buffer_degraded", kind=kind, error=str(exc), hint=hint)
        self._degraded = f"{kind}: {exc}"
        self._space.set()  # producers waiting for room count drops from now on

    async def _locked(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn` under the lock, to completion even if the caller is cancelled."""

        async def run() -> T:
            async with self._lock:
                return await fn(*args)

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    def _tx(self) -> Tx:
        drops = {k: Drop(d.total, d.pending, d.first, d.last, d.last_ms) for k, d in self._drops.items()}
        return Tx(self._level.copy(), drops, self._clock.wall_ms())

    def _apply(self, tx: Tx, next_id: int) -> None:
        self._level, self._drops, self._next_id = tx.level, tx.drops, next_id

    @staticmethod
    def _bodies(items: list[Item], next_id: int) -> tuple[list[Meta], list[bytes]]:
        """Give queued events their ids: the body is the 5-entry map {"id", ...the rest}."""
        metas: list[Meta] = []
        bodies: list[bytes] = []
        nid, off = next_id, 1
        pack_id = msgpack.Packer().pack
        for ts, src, rank, rest in items:
            body = b"".join((MAP5_ID, pack_id(nid), rest))
            size = len(body)
            metas.append((nid, ts, src, rank, size, off))
            bodies.append(body)
            nid += 1
            off += size
        return metas, bodies

    async def _commit(self, items: list[Item]) -> int:
        """Commit `items` (and pending drop reports); returns the bytes written."""
        tx = self._tx()
        uncounted = Counter(self._uncounted)
        for (src, reason), n in uncounted.items():
            tx.drop(src, reason, n, None, None)
        if not uncounted and not any(d.pending for d in tx.drops.values()):
            cols = self._columns.params(items, self._next_id)
            if cols is not None:
                params, add_b, add_n = cols
                total_b = sum(add_b)
                over_b, over_n = self._bounds.over(tx.level, total_b, len(items))
                if over_b <= 0 and over_n <= 0:
                    # the hot path: one autocommit statement (atomic, durable); no await before it
                    self._space.set()
                    self._last_batch_bytes = total_b
                    await self._db.execute(self._columns.sql, params)
                    for rank, (b, n) in enumerate(zip(add_b, add_n, strict=True)):
                        tx.level.events[rank] += n
                        tx.level.bytes[rank] += b
                    self._apply(tx, self._next_id + len(items))
                    return total_b
        metas, bodies = self._bodies(items, self._next_id)
        self._space.set()
        next_id = metas[-1][0] + 1 if metas else self._next_id
        inc_b = self._last_batch_bytes = metas[-1][5] + metas[-1][4] - 1 if metas else 0
        over_b, over_n = self._bounds.over(tx.level, inc_b, len(metas))
        if over_b <= 0 and over_n <= 0 and not any(d.pending for d in tx.drops.values()):
            # fast path: one autocommit statement (atomic, durable); no await before it
            if metas:
                await self._db.execute(INSERT_JSON, (json.dumps(metas), b"".join(bodies)))
                tx.level.add(metas)
            self._apply(tx, next_id)
            return inc_b
        rows: list[Row] = [(m[0], m[1], m[2], m[3], m[4], b) for m, b in zip(metas, bodies, strict=True)]
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            rows, reports = await self._bounds.fit(tx, rows, next_id)
            next_id += len(reports)
            tx.level.add(rows)
            tx.level.add(reports)
            if rows or reports:
                await db.execute(INSERT_JSON, insert_params(rows + reports))
            await self._bounds.write_drops(tx)
            await self._write_next_id(next_id)
            await db.execute("COMMIT")
        except BaseException:
            await batches.rollback(db)
            raise
        self._apply(tx, next_id)
        self._uncounted -= uncounted
        return sum(r[4] for r in rows) + sum(r[4] for r in reports)

    async def _write_next_id(self, next_id: int) -> None:
        """Persist the id counter. Plain inserts need not (at open the counter is at least
        max(id) + 1); every transaction that deletes events or skips ids must."""
        await self._db.execute("UPDATE meta SET v = ? WHERE k = 'next_event_id'", (next_id,))

    async def _free_for_disk(self, need_b: int) -> None:
        """The disk is full: drop the oldest lowest-priority events (reason disk_full)."""

        async def run() -> None:
            tx = self._tx()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._bounds.make_room(tx, [], "disk_full", force_b=need_b)
                await self._bounds.write_drops(tx)
                await self._write_next_id(self._next_id)
                await self._db.execute("COMMIT")
            except BaseException:
                await batches.rollback(self._db)
                raise
            self._disk_credit += self._level.total_bytes - tx.level.total_bytes
            self._apply(tx, self._next_id)

        try:
            await self._locked(run)
        except sqlite3.Error as exc:
            log.debug("buffer_disk_evict_failed", error=str(exc))

    async def set_max_pages(self, n: int | None) -> int:
        """Test hook: cap the database at `n` pages to simulate a full disk; None lifts the cap.
        Returns the cap in force (SQLite never sets it below the current size)."""
        value = _NO_LIMIT_PAGES if n is None else int(n)

        async def run() -> int:
            got = await self._db.execute_fetchall(f"PRAGMA max_page_count = {value}")
            return int(next(iter(got))[0])

        return await self._locked(run)

    # ------------------------------------------------------------------ retention

    async def enforce_retention(self) -> int:
        """Delete events older than their source's retention, by capture time, only while
        the clock is synchronized; an event from the future is never old, nor one committed
        less than its retention ago by the monotonic clock (retention marks, bounds.py), so
        the first runs after a fresh database delete nothing for age. Returns how many."""
        if not self._clock.synchronized():
            return 0
        return await self._locked(self._retention)

    async def _retention(self) -> int:
        tx = self._tx()
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            marks = await load_marks(db, self._boot, int(self._clock.monotonic() * 1000), tx.now)
            deleted = await self._bounds.expire(tx, self._cfg.retention, marks.upto)
            reports, keys = self._bounds.reports(tx, self._next_id) if deleted else ([], [])
            tx.reported(keys)
            tx.level.add(reports)
            if reports:
                await db.execute(INSERT_JSON, insert_params(reports))
            await self._bounds.write_drops(tx)
            next_id = self._next_id + len(reports)
            await self._write_next_id(next_id)
            keep_ms = int(max(self._cfg.retention.values(), default=0) * 1000)
            await save_marks(db, marks.add(next_id - 1, keep_ms))
            await db.execute("COMMIT")
        except BaseException:
            await batches.rollback(db)
            raise
        self._apply(tx, next_id)
        if deleted:
            log.info("buffer_retention", deleted=deleted)
        return deleted

    # ------------------------------------------------------------------ consent purge

    async def purge_carrying(self, needles: Sequence[str], report_type: str,
                             report: Callable[[int], dict[str, Any]]) -> PurgeResult:
        """Delete every buffered unsent event that carries any of `needles` (edge/buffer/purge.py)
        and store one `report_type` event with data `report(n deleted)`, in ONE transaction.
        Events still queued are committed first, so they are looked at too. Sealed batches are
        left alone and counted."""
        await self.flush()
        raw = [n.encode("utf-8") for n in needles]

        async def run() -> PurgeResult:
            db = self._db
            tx = self._tx()
            await db.execute("PRAGMA secure_delete = ON")
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    found = await purge.carrying(db, raw)
                    if found.ids:
                        await purge.delete_ids(db, found.ids)
                    sealed = await purge.sealed_carrying(db, raw)
                    eid = self._next_id
                    body = self._packer.body(eid, tx.now, "edge", report_type, report(len(found.ids)))
                    row: Row = (eid, tx.now, "edge", self._rank["edge"], len(body), body)
                    await db.execute(INSERT_JSON, insert_params([row]))
                    await self._write_next_id(eid + 1)
                    await db.execute("COMMIT")
                except BaseException:
                    await batches.rollback(db)
                    raise
            finally:
                await db.execute("PRAGMA secure_delete = OFF")
            for prio, n, size in found.removed:
                tx.level.events[prio] -= n
                tx.level.bytes[prio] -= size
            tx.level.add([row])
            self._apply(tx, eid + 1)
            await purge.checkpoint(db)
            return PurgeResult(len(found.ids), eid, sealed[0], sealed[1])

        result = await self._guard(run)
        for cb in list(self._listeners):
            try:
                cb(self.last_committed_id)
            except Exception:  # a listener's bug must not stop the purge's report
                log.exception("buffer_listener_error")
        return result

    # ------------------------------------------------------------------ uplink side

    async def unsealed(self, max_events: int, max_bytes: int, newest: bool = False) -> list[StoredEvent]:
        """Committed, unsealed events in ascending id order: the oldest ones, or the newest
        ones when `newest`; at most `max_events` and `max_bytes` (but at least one)."""
        return await self._guard(batches.unsealed, self._db, max_events, max_bytes, newest)

    async def seal(self, events: list[StoredEvent], build: Build) -> SealedBatch:
        """Seal `events` into the batch `build(seq, prev_hash, events)` returns, in one
        transaction that also removes them from the backlog. SealConflict (and nothing
        done) if any of them is no longer stored."""
        if not events:
            raise ValueError("a batch holds at least one event")

        async def run() -> SealedBatch:
            # the counters change under the lock, with the transaction: a commit that starts
            # once the lock is free copies them, and must see this seal (else it overwrites it)
            batch, removed = await batches.seal(self._db, events, build, self._clock.wall_ms(), self._next_id)
            for prio, n, size in removed:
                self._level.events[prio] -= n
                self._level.bytes[prio] -= size
            self._level.batch_events += batch.n
            self._level.batch_bytes += len(batch.payload)
            return batch

        return await self._guard(run)

    async def pending_batches(self, limit: int | None = None) -> list[SealedBatch]:
        """Sealed, unacknowledged batches by seq (at most `limit`)."""
        return await self._guard(batches.pending, self._db, limit)

    async def ack(self, seq: int, hh: bytes) -> bool:
        """Delete pending batch `seq` only if its header hash is `hh`; whether it did."""

        async def run() -> bool:
            got = await batches.ack(self._db, seq, hh, self._clock.wall_ms(), self._next_id)
            if got is None:
                return False
            self._level.batch_events -= got[0]  # under the lock, as in `seal`
            self._level.batch_bytes -= got[1]
            return True

        return await self._guard(run)

    async def quarantine(self, seq: int, hh: bytes, err: str) -> bool:
        """Keep a rejected batch aside (never resent, not deleted); whether it matched."""
        return await self._guard(batches.quarantine, self._db, seq, hh, err)

    async def quarantined(self) -> list[tuple[int, str]]:
        """(seq, error) of every quarantined batch."""
        return await self._guard(batches.quarantined, self._db)

    async def stats(self) -> BufferStats:
        """Backlog per source, sealed batches, drops, last ack, counters, queue, degraded."""
        return await self._guard(self._stats)

    async def _stats(self) -> BufferStats:
        # the level read under the lock: the same snapshot as the rows gather() reads
        per_src = {src: (self._level.events[r], self._level.bytes[r], r) for src, r in self._rank.items()}
        return await gather(self._db, per_src, self._next_id - 1, len(self._q), self._degraded)

    async def _guard(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A locked operation for another component; SQLite errors become BufferError_."""
        if self._close_task is not None:
            raise BufferError_("buffer is closed")
        try:
            return await self._locked(fn, *args)
        except sqlite3.Error as exc:
            cls = StorageFullError if _classify(exc) == "disk_full" else BufferError_
            raise cls(f"buffer: {exc}", hint="see edge status; free disk space if full") from exc
