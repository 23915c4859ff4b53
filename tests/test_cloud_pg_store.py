"""The ingest core over the PostgreSQL store (cloud/db/pg_store.py) on a real server.

What must hold: a group's events and dedupe rows commit together (every accepted batch's
events are rows, each once, whatever the resends); the chain rules of the core hold through
this store too (old-epoch replays detached, forks chain-broken); day partitions are made on
demand, also for two new days inside one group; a store that cannot commit sends no ack that
claims data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_receiver import CLOUD, Device, cloud_key_file

from cloud.config import ReceiverConfig
from cloud.db.migrate import migrate
from cloud.db.pg_store import PgStore, capture_time
from cloud.receiver import Receiver
from cloud.transport import Inbound
from edge.clock import FakeClock
from edge.wire.uplink import Ack, encode_event, kid_of, parse_ack, seal_batch, verify_ack

pytestmark = pytest.mark.cloud


@pytest.fixture
def receiver(tmp_path: Path, pg_dsn: str) -> Receiver:
    migrate(pg_dsn)
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "unused.db",
                         out=tmp_path / "unused.jsonl", cloud_key=cloud_key_file(tmp_path))
    return Receiver(cfg, clock=FakeClock(), store=PgStore(pg_dsn))


def send(r: Receiver, dev: Device, *batches: tuple[int, bytes, bytes]) -> list[Ack]:
    result = r.process([Inbound(dev.topic, payload) for _, _, payload in batches])
    acks = [parse_ack(a.payload) for a in result.acks]
    assert all(verify_ack(a, tenant="acme", store="s001", device=dev.ids[2], cloud_key=CLOUD.public_key())
               for a in acks)
    return acks


def _one(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


def test_events_and_dedupe_rows_are_stored_once_whatever_the_resends(
    tmp_path: Path, receiver: Receiver, pg_dsn: str,
) -> None:
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        batches = [dev.seal(n_events=5) for _ in range(4)]
        acks = send(receiver, dev, *batches[:3], batches[1])  # a resend inside the group
        # the resend is stored once; its second ack is held back (duplicate acks: one per seq per interval)
        assert [(a.seq, a.ok) for a in acks] == [(1, True), (2, True), (3, True)]
        assert next((a.seq, a.ok) for a in send(receiver, dev, batches[3], batches[0])) == (4, True)
    finally:
        receiver.close()
    assert _one(pg_dsn, "SELECT count(*) FROM batches") == 4
    assert _one(pg_dsn, "SELECT count(*) FROM events") == 20
    assert _one(pg_dsn, "SELECT count(DISTINCT id) FROM events") == 20
    assert _one(pg_dsn, "SELECT string_agg(seq::text, ',' ORDER BY seq) FROM batches") == "1,2,3,4"
    assert _one(pg_dsn, "SELECT bool_and(linked) FROM batches") is True
    assert _one(pg_dsn, "SELECT highest FROM chains") == 4
    assert _one(pg_dsn, "SELECT data->>'tag' FROM events LIMIT 1") == "x"


def test_old_epoch_replays_are_detached_and_forks_are_chain_broken(
    tmp_path: Path, receiver: Receiver, pg_dsn: str,
) -> None:
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        old = [dev.seal(tag="old") for _ in range(6)]
        assert all(a.ok for a in send(receiver, dev, *old[:3]))
        dev.restart_from_scratch()
        new = [dev.seal(tag="new") for _ in range(6)]
        assert all(a.ok for a in send(receiver, dev, *new[:3]))
        assert [a.ok for a in send(receiver, dev, old[4], old[5])] == [True, True]
        acks = send(receiver, dev, *new[3:])
        assert [(a.seq, a.ok, a.err) for a in acks] == [(4, True, None), (5, True, None), (6, True, None)]
        _, _, fork = dev.seal(seq=2, prev=new[0][1], tag="fork")
        (ack,) = send(receiver, dev, (2, b"", fork))
        assert (ack.ok, ack.err) == (False, "chain-broken")
    finally:
        receiver.close()
    assert _one(pg_dsn, "SELECT count(*) FROM batches WHERE detached") == 2
    assert _one(pg_dsn, "SELECT epoch FROM chains") == 2
    assert _one(pg_dsn, "SELECT reason FROM rejected_batches") == "chain-broken"
    assert _one(pg_dsn, "SELECT authenticated FROM rejected_batches") is True


def _seal_at(dev: Device, ts_ms: int) -> tuple[int, bytes, bytes]:
    """The device's next batch with two events captured at `ts_ms`."""
    events: list[dict[str, Any]] = [
        {"id": dev.next_id + i, "ts": ts_ms, "src": "edge", "type": "edge.tick", "data": {}} for i in range(2)
    ]
    dev.next_id += 2
    seq = dev.seq + 1
    payload, hh = seal_batch(tenant=dev.ids[0], store=dev.ids[1], device=dev.ids[2], seq=seq, prev=dev.prev,
                             event_bodies=[encode_event(e) for e in events], first=events[0]["id"],
                             last=events[-1]["id"], t_ms=max(ts_ms, 0), sync=True, key=dev.key, kid=kid_of(dev.raw))
    dev.seq, dev.prev = seq, hh
    return seq, hh, payload


def test_day_partitions_are_made_on_demand_also_two_in_one_group(
    tmp_path: Path, receiver: Receiver, pg_dsn: str,
) -> None:
    dev = Device()
    dev.register(tmp_path / "keys")
    day = 86_400_000
    t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    receiver.open()
    try:
        group = [_seal_at(dev, t0), _seal_at(dev, t0 + 3 * day), _seal_at(dev, -1)]  # -1: an unset clock
        assert [a.ok for a in send(receiver, dev, *group)] == [True, True, True]
    finally:
        receiver.close()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT tableoid::regclass::text, count(*), min(ts_ms) FROM events GROUP BY 1 ORDER BY 1")
        assert rows.fetchall() == [("events_19700101", 2, -1), ("events_20260101", 2, t0),
                                   ("events_20260104", 2, t0 + 3 * day)]
    assert capture_time(2**62).year == 2200


def test_a_store_that_cannot_commit_claims_nothing(tmp_path: Path, receiver: Receiver, pg_dsn: str) -> None:
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE chains ADD CONSTRAINT no_writes CHECK (false) NOT VALID")
        assert send(receiver, dev, dev.seal()) == []
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE chains DROP CONSTRAINT no_writes")
        dev.restart_from_scratch()
        assert [a.ok for a in send(receiver, dev, dev.seal())] == [True]
    finally:
        receiver.close()
    assert _one(pg_dsn, "SELECT count(*) FROM batches") == 1



class DyingStore(PgStore):
    """A PgStore whose server connection is terminated right after the group's first `add`."""

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with super().transaction() as txn:
            real_add = txn.add
            pid = txn._conn.info.backend_pid  # the backend of this very transaction

            def add(acc: Any) -> None:
                real_add(acc)
                with psycopg.connect(self.dsn, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

            txn.add = add  # type: ignore[method-assign,assignment]  # wraps the real add
            yield txn


def test_a_connection_lost_inside_a_group_is_a_failed_commit_and_no_ok_ack_leaves(tmp_path: Path, pg_dsn: str) -> None:
    """psycopg leaves a transaction block on a broken connection quietly, without COMMIT; the core
    survives per-message errors. Regression: such a group was reported committed and its batches
    acked ok although none was stored (found by stopping PostgreSQL under load)."""
    migrate(pg_dsn)
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "unused.db",
                         out=tmp_path / "unused.jsonl", cloud_key=cloud_key_file(tmp_path))
    r = Receiver(cfg, clock=FakeClock(), store=DyingStore(pg_dsn))
    dev = Device("lost-1")
    dev.register(tmp_path / "keys")
    r.open()
    try:
        result = r.process([Inbound(dev.topic, dev.seal()[2]), Inbound(dev.topic, dev.seal()[2])])
    finally:
        r.close()
    assert not result.committed
    assert result.acks == []
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone() == (0,)


def test_a_day_partition_another_worker_creates_meanwhile_is_not_an_error(pg_dsn: str) -> None:
    """Two workers needing the same new day: the second waits for the first's advisory lock, and
    its second look at the catalog predates the first's commit. The partition exists: no error
    (seen with two workers on a fresh database: a group failed DuplicateTable and was redelivered)."""
    import datetime as dt
    import threading
    import time

    migrate(pg_dsn)
    day = dt.date(2031, 5, 17)
    store = PgStore(pg_dsn)
    store.open()
    errors: list[BaseException] = []
    try:
        with psycopg.connect(pg_dsn) as first:  # the other worker, inside its transaction
            first.execute("SELECT edge_event_partition(%s)", (day,))

            def second() -> None:
                try:
                    with psycopg.connect(pg_dsn) as txn:
                        store.ensure_days({day}, txn, wrote=False)
                except BaseException as exc:  # reported by the assertion below
                    errors.append(exc)

            t = threading.Thread(target=second)
            t.start()
            time.sleep(0.5)  # the second waits on the advisory lock (its lock_timeout is 2 s)
            first.commit()
            t.join(10)
    finally:
        store.close()
    assert errors == []
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass('events_20310517') IS NOT NULL").fetchone() == (True,)


def test_two_workers_with_the_same_devices_in_opposite_orders_never_deadlock(tmp_path: Path, pg_dsn: str) -> None:
    """Each group locks its devices up front in sorted order: worker 1 gets [a, b], worker 2
    [b, a] of the same batches, at once, many times; no group fails (before, the two took the
    devices' locks in arrival order, PostgreSQL aborted one as a deadlock, and its batches went
    unanswered until the devices resent them), and every batch is stored once."""
    import threading

    migrate(pg_dsn)
    (tmp_path / "keys").mkdir()
    devices = [Device("edge-a"), Device("edge-b")]
    for d in devices:
        d.register(tmp_path / "keys")
    workers = []
    for i in (1, 2):
        cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / f"u{i}.db",
                             out=tmp_path / f"u{i}.jsonl", cloud_key=cloud_key_file(tmp_path))
        workers.append(Receiver(cfg, clock=FakeClock(), store=PgStore(pg_dsn)))
    rounds = [[(d.topic, d.seal(n_events=50)[2]) for d in devices] for _ in range(40)]
    failed: list[int] = []
    start = threading.Barrier(2)

    def run(w: Receiver, reverse: bool) -> None:
        start.wait()
        for group in rounds:
            items = [Inbound(t, p) for t, p in (reversed(group) if reverse else group)]
            result = w.process(items)
            if not result.committed or result.counts["errors"]:  # a deadlock fails a message or a group
                failed.append(1)

    for w in workers:
        w.open()
    try:
        threads = [threading.Thread(target=run, args=(w, i == 1)) for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for w in workers:
            w.close()
    assert failed == []
    assert _one(pg_dsn, "SELECT count(*) FROM batches") == 80
    assert _one(pg_dsn, "SELECT count(DISTINCT (device, id)) FROM events") == 80 * 50
