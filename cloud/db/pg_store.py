"""The PostgreSQL store of record behind the ingest core's `Store` seam (cloud/store.py).

Exactly-once. A group is one PostgreSQL transaction: every accepted batch's `batches` row (the
dedupe key is its primary key (tenant, store, device, seq, hh)), its `chains` state and its
events (COPY into the partitioned `events` table) commit together or not at all, and the core
releases acks only after `transaction()` returned, i.e. after COMMIT.

Concurrency. Any number of workers share the database. `device(ids)` is the core's first call
for an identity in a transaction; it takes a transaction-scoped advisory lock on the identity,
so two workers holding batches of one device decide its chain one after the other (the lock
needs no row, so a device never seen is serialized too). The core first locks every device of
the group in sorted order (`lock`), so two workers whose groups share devices wait for each
other instead of deadlocking (a deadlock aborted a group, unanswered until the device resent).

Partitions. Before a batch's events go in, the day partitions they need exist: a missing one is
created through a second, autocommit connection (`edge_event_partition(day)`), so the lock a
new partition takes on `events` is never held across a group.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from cloud.jsonlines import json_line_encoder
from cloud.store import Accepted, DeviceState, Ids, Rejected, StoredBatch

_MIN_TS = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_TS = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)  # partition key only; ts_ms keeps the exact value
_COPY_EVENTS = ("COPY events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
                " FROM STDIN")


def capture_time(ts_ms: int) -> dt.datetime:
    """The partition key of an event: its capture time, clamped into [1970, 2200)."""
    try:
        ts = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return _MIN_TS if ts_ms < 0 else _MAX_TS
    return min(max(ts, _MIN_TS), _MAX_TS)


class PgStore:
    """`Store` over PostgreSQL (schema: cloud/db/migrations)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._ddl: psycopg.Connection[tuple[Any, ...]] | None = None
        self._days: set[dt.date] = set()  # partitions known to exist
        self._encode = json_line_encoder()

    def open(self) -> None:
        try:
            self._conn = psycopg.connect(self.dsn, connect_timeout=10)
            self._ddl = psycopg.connect(self.dsn, connect_timeout=10, autocommit=True)
            self._ddl.execute("SET lock_timeout = '2s'")
        except BaseException:
            self.close()  # both or neither: a half-open store would never be reopened
            raise

    def close(self) -> None:
        for conn in (self._conn, self._ddl):
            if conn is not None:
                conn.close()
        self._conn = self._ddl = None

    def _reconnect_if_broken(self) -> None:
        if any(c is None or c.closed or c.broken for c in (self._conn, self._ddl)):
            self.close()
            self.open()

    @contextmanager
    def transaction(self) -> Iterator[_Txn]:
        self._reconnect_if_broken()  # a database that went away and came back
        conn, ddl = self._conn, self._ddl
        if conn is None or ddl is None:
            raise RuntimeError("the store is not open")
        with conn.transaction() as tx:
            yield _Txn(conn, self)
        # psycopg leaves the block quietly, without COMMIT, when the connection broke inside it
        # (the core survives per-message errors, so nothing else may raise): that group is NOT
        # stored, and saying otherwise would send ok acks for lost batches
        if tx.status is not tx.Status.COMMITTED:
            raise psycopg.OperationalError(f"the transaction did not commit ({tx.status.value}): connection lost")

    def ensure_days(self, days: set[dt.date], txn: psycopg.Connection[tuple[Any, ...]], *, wrote: bool) -> None:
        """Make the day partitions exist: on the side connection (lock held for an instant), or, when
        this very transaction already wrote into `events` (the side connection would wait for it),
        inside it."""
        missing = days - self._days
        if not missing or self._ddl is None:
            return
        for day in sorted(missing):
            if wrote:
                txn.execute("SELECT edge_event_partition(%s)", (day,))
                continue
            try:
                self._ddl.execute("SELECT edge_event_partition(%s)", (day,))
            except psycopg.errors.LockNotAvailable:  # another worker's long transaction holds events
                txn.execute("SELECT edge_event_partition(%s)", (day,))
            except psycopg.errors.DuplicateTable:
                # another worker created it while this one waited for the function's advisory lock
                # (whose second look at the catalog predates that commit): it exists, as wanted
                pass
        self._days |= missing


class _Txn:
    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], store: PgStore) -> None:
        self._conn = conn
        self._store = store
        self._wrote = False  # this transaction holds a lock on events (a side connection would wait)

    def lock(self, identities: Sequence[Ids]) -> None:
        for ids in identities:
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("/".join(ids),))

    def device(self, ids: Ids) -> DeviceState | None:
        self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("/".join(ids),))
        row = self._conn.execute("SELECT epoch, highest FROM chains WHERE tenant = %s AND store = %s AND device = %s",
                                 ids).fetchone()
        return None if row is None else DeviceState(epoch=int(row[0]), highest=int(row[1]))

    def at_seq(self, ids: Ids, seq: int) -> list[StoredBatch]:
        rows = self._conn.execute(
            "SELECT epoch, hh, prev, linked, detached FROM batches"
            " WHERE tenant = %s AND store = %s AND device = %s AND seq = %s", (*ids, seq)).fetchall()
        return [StoredBatch(int(e), bytes(hh), bytes(p), bool(ln), bool(d)) for e, hh, p, ln, d in rows]

    def add(self, a: Accepted) -> None:
        b = a.batch
        received = dt.datetime.fromtimestamp(a.received_ms / 1000, dt.UTC)
        self._conn.execute(
            "INSERT INTO batches (tenant, store, device, epoch, seq, hh, prev, kid, linked, n, first_id, last_id,"
            " sealed_ms, synced, received_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*b.ids, a.epoch, b.seq, b.hh, b.prev, b.kid, a.linked, b.n, b.first, b.last, b.t, b.sync, received))
        self._conn.execute(
            "INSERT INTO chains (tenant, store, device, epoch, highest) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant, store, device) DO UPDATE"
            " SET epoch = excluded.epoch, highest = excluded.highest, updated_at = now()",
            (*b.ids, a.epoch, a.highest))
        rows = [(capture_time(int(ev["ts"])), ev) for ev in a.events]
        self._store.ensure_days({ts.date() for ts, _ in rows}, self._conn, wrote=self._wrote)
        self._wrote = True
        encode = self._store._encode
        with self._conn.cursor().copy(_COPY_EVENTS) as copy:
            for ts, ev in rows:
                copy.write_row((b.tenant, b.store, b.device, a.epoch, b.seq, ev["id"], ts, ev["ts"],
                                ev["src"], ev["type"], encode(ev["data"])))

    def relink(self, ids: Ids, seq: int, hh: bytes) -> None:
        self._conn.execute("UPDATE batches SET linked = true"
                           " WHERE tenant = %s AND store = %s AND device = %s AND seq = %s AND hh = %s",
                           (*ids, seq, hh))

    def detach(self, ids: Ids, seq: int, hh: bytes) -> None:
        self._conn.execute("UPDATE batches SET detached = true, linked = false"
                           " WHERE tenant = %s AND store = %s AND device = %s AND seq = %s AND hh = %s",
                           (*ids, seq, hh))

    def reject(self, r: Rejected) -> None:
        # only authenticated input is ever quarantined (cloud/core.py), so `authenticated` is always true
        self._conn.execute(
            "INSERT INTO rejected_batches (tenant, store, device, seq, hh, kid, reason, authenticated, detail,"
            " received_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*(x[:63] for x in r.ids), r.seq, r.hh, (r.kid or "")[:64] or None, r.reason[:32], True,
             r.detail.encode()[:1000].decode(errors="ignore"),
             dt.datetime.fromtimestamp(r.received_ms / 1000, dt.UTC)))

    @contextmanager
    def message(self) -> Iterator[None]:
        with self._conn.transaction():  # nested: a SAVEPOINT, rolled back when the block raises
            yield
