"""The SQLite store: the reference receiver's store (one file) plus events as JSON lines.

Design. Chain and dedupe state live in SQLite (WAL, synchronous=FULL: an ack promises the
batch is stored); events are appended to a JSON-lines file, one compact object per event with
tenant/store/device/seq/received_ms added. One transaction per group: the group's lines are
written and fsynced, then SQLite commits, and only then does the core release the acks. A crash
between the fsync and the commit can leave a batch's events in the file without its row; the
device resends (no ack went out) and the events are appended again: the file is at-least-once,
the database exact. A PostgreSQL store (cloud/db/) writes events as rows in the same
transaction as the batch row and is exactly-once.

Quarantine: `rejected` holds authenticated rejections (the core never records unauthenticated
input: anybody can publish it, and it is only counted and logged).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import structlog

from cloud.jsonlines import json_line_encoder
from cloud.store import Accepted, DeviceState, Ids, Rejected, StoredBatch

log = structlog.get_logger()

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    tenant TEXT NOT NULL, store TEXT NOT NULL, device TEXT NOT NULL,
    seq INTEGER NOT NULL, hh BLOB NOT NULL, epoch INTEGER NOT NULL, prev BLOB NOT NULL,
    linked INTEGER NOT NULL, detached INTEGER NOT NULL DEFAULT 0, kid TEXT NOT NULL,
    n INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    sealed_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, store, device, seq, hh)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL, store TEXT NOT NULL, device TEXT NOT NULL,
    epoch INTEGER NOT NULL, highest INTEGER NOT NULL,
    PRIMARY KEY (tenant, store, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    tenant TEXT NOT NULL, store TEXT NOT NULL, device TEXT NOT NULL,
    seq INTEGER, hh BLOB, kid TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
"""
# version 1 (edge/uplink/receiver.py): batches keyed by (ids, seq, epoch), no links, no kid
_MIGRATE_V1 = """
ALTER TABLE batches RENAME TO batches_v1;
{schema}
INSERT INTO batches SELECT tenant, store, device, seq, hh, epoch, prev, 1, 0, '', n, first, last,
    sealed_ms, received_ms FROM batches_v1;
DROP TABLE batches_v1;
"""
_EXTRA_KEYS = frozenset({"tenant", "store", "device", "seq", "received_ms"})  # added to each event


class SqliteStore:
    """`Store` over SQLite and a JSON-lines file (see the module doc)."""

    def __init__(self, db: Path, out: Path) -> None:
        self.db_path = db
        self.out_path = out
        self._db: sqlite3.Connection | None = None
        self._out: IO[bytes] | None = None
        self._encode = json_line_encoder()

    def open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an ack promises the batch is stored
            db.execute("PRAGMA busy_timeout=5000")  # receivers may share one store
            cols = {r[1] for r in db.execute("PRAGMA table_info(batches)")}
            if cols and "linked" not in cols:
                db.executescript("BEGIN;" + _MIGRATE_V1.format(schema=_SCHEMA) + "COMMIT;")
                log.info("receiver_store_migrated", db=str(self.db_path), to=SCHEMA_VERSION)
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.out_path.exists()
            self._out = self.out_path.open("ab")
            if not existed:  # make the new file's directory entry durable too
                fd = os.open(self.out_path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def transaction(self) -> Iterator[_Txn]:
        db, out = self._db, self._out
        if db is None or out is None:
            raise RuntimeError("the store is not open")
        txn = _Txn(db, self._encode)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield txn
            pos = out.tell()
            try:
                if txn.lines:
                    out.write("".join(txn.lines).encode("utf-8"))
                    out.flush()
                    os.fsync(out.fileno())
                db.execute("COMMIT")
            except BaseException:
                out.truncate(pos)
                raise
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


class _Txn:
    def __init__(self, db: sqlite3.Connection, encode: Any) -> None:
        self._db = db
        self._encode = encode
        self.lines: list[str] = []

    def lock(self, identities: Sequence[Ids]) -> None:
        """Nothing to do: the SQLite transaction is the only writer (BEGIN IMMEDIATE)."""

    def device(self, ids: Ids) -> DeviceState | None:
        row = self._db.execute(
            "SELECT epoch, highest FROM devices WHERE tenant=? AND store=? AND device=?", ids
        ).fetchone()
        return None if row is None else DeviceState(epoch=int(row[0]), highest=int(row[1]))

    def at_seq(self, ids: Ids, seq: int) -> list[StoredBatch]:
        rows = self._db.execute(
            "SELECT epoch, hh, prev, linked, detached FROM batches"
            " WHERE tenant=? AND store=? AND device=? AND seq=?",
            (*ids, seq),
        ).fetchall()
        return [StoredBatch(int(e), bytes(hh), bytes(p), bool(ln), bool(d)) for e, hh, p, ln, d in rows]

    def add(self, a: Accepted) -> None:
        b = a.batch
        self._db.execute(
            "INSERT INTO batches VALUES (?,?,?,?,?,?,?,?,0,?,?,?,?,?,?)",
            (*b.ids, b.seq, b.hh, a.epoch, b.prev, int(a.linked), b.kid, b.n, b.first, b.last, b.t, a.received_ms),
        )
        self._db.execute(
            "INSERT INTO devices VALUES (?,?,?,?,?) ON CONFLICT (tenant, store, device)"
            " DO UPDATE SET epoch=excluded.epoch, highest=excluded.highest",
            (*b.ids, a.epoch, a.highest),
        )
        self._lines(a)

    def _lines(self, a: Accepted) -> None:
        b, encode = a.batch, self._encode
        extra = {"tenant": b.tenant, "store": b.store, "device": b.device, "seq": b.seq, "received_ms": a.received_ms}
        tail = "," + encode(extra)[1:] + "\n"  # splice the pre-encoded extra fields into each object
        for ev in a.events:
            if _EXTRA_KEYS.isdisjoint(ev):
                self.lines.append(encode(ev)[:-1] + tail)
            else:  # an unknown event key named like ours: ours win
                self.lines.append(encode({**ev, **extra}) + "\n")

    def relink(self, ids: Ids, seq: int, hh: bytes) -> None:
        self._db.execute("UPDATE batches SET linked=1 WHERE tenant=? AND store=? AND device=? AND seq=? AND hh=?",
                         (*ids, seq, hh))  # fmt: skip

    def detach(self, ids: Ids, seq: int, hh: bytes) -> None:
        self._db.execute(
            "UPDATE batches SET detached=1, linked=0 WHERE tenant=? AND store=? AND device=? AND seq=? AND hh=?",
            (*ids, seq, hh),
        )

    def reject(self, r: Rejected) -> None:
        self._db.execute("INSERT INTO rejected VALUES (?,?,?,?,?,?,?,?,?)",
                         (*r.ids, r.seq, r.hh, r.kid, r.reason, r.detail[:500], r.received_ms))  # fmt: skip

    @contextmanager
    def message(self) -> Iterator[None]:
        mark = len(self.lines)
        self._db.execute("SAVEPOINT msg")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO msg")
            self._db.execute("RELEASE msg")
            del self.lines[mark:]
            raise
        self._db.execute("RELEASE msg")
