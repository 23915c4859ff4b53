"""The ingest core without a broker: groups of messages straight into `Receiver.process`.

Covers the chain rules of cloud/chain.py that need exact ordering (old-epoch replays after a
device reset), the commit-before-ack rule, and the Store seam as the SQLite store implements it.
"""

from __future__ import annotations

import itertools
import sqlite3
import tracemalloc
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_receiver import CLOUD, Device, cloud_key_file

from cloud.config import ReceiverConfig
from cloud.receiver import Receiver
from cloud.sqlite_store import SqliteStore
from cloud.transport import Inbound
from edge.clock import FakeClock
from edge.wire.uplink import Ack, parse_ack, verify_ack


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "r.db",
                         out=tmp_path / "events.jsonl", cloud_key=cloud_key_file(tmp_path))  # fmt: skip
    return Receiver(cfg, clock=FakeClock())


def send(r: Receiver, dev: Device, *batches: tuple[int, bytes, bytes]) -> list[Ack]:
    result = r.process([Inbound(dev.topic, payload) for _, _, payload in batches])
    acks = [parse_ack(a.payload) for a in result.acks]
    assert all(verify_ack(a, tenant="acme", store="s001", device=dev.ids[2], cloud_key=CLOUD.public_key())
               for a in acks)  # fmt: skip
    return acks


def test_old_epoch_replay_after_a_reset_does_not_break_the_new_chain(tmp_path: Path, receiver: Receiver) -> None:
    """Epoch 1 stored 1..3; its batches 5 and 6 were in flight and never stored. The device resets
    (seq 1 again). An attacker replays old 5 and 6 into the new epoch before the genuine 4..6:
    they are stored (genuine data) but detached once the genuine 4 links, and the genuine 5 and 6
    are accepted, never chain-broken."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        old = [dev.seal(tag="old") for _ in range(6)]
        assert all(a.ok for a in send(receiver, dev, *old[:3]))
        dev.restart_from_scratch()
        new = [dev.seal(tag="new") for _ in range(6)]
        assert all(a.ok for a in send(receiver, dev, *new[:3]))
        assert receiver.stats.resets == 1
        replayed = send(receiver, dev, old[4], old[5])  # a gap in the new epoch: stored for now
        assert [a.ok for a in replayed] == [True, True]
        acks = send(receiver, dev, *new[3:])
        assert [(a.seq, a.ok, a.err) for a in acks] == [(4, True, None), (5, True, None), (6, True, None)]
        assert receiver.stats.rejected == {}
        assert receiver.stats.detached == 2
    finally:
        receiver.close()


def test_ambiguous_conflict_is_deferred_unanswered_then_settled_by_the_gap_filling(
    tmp_path: Path, receiver: Receiver
) -> None:
    """New epoch holds 1..2 and a replayed old 4; the genuine 4 arrives before the genuine 3: neither
    4 links, so the genuine one gets no ack (deferred); once 3 arrives the old 4 is detached and the
    device's resend of 4 is accepted."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        old = [dev.seal(tag="old") for _ in range(4)]
        assert all(a.ok for a in send(receiver, dev, old[0]))
        dev.restart_from_scratch()
        new = [dev.seal(tag="new") for _ in range(4)]
        assert all(a.ok for a in send(receiver, dev, new[0], new[1]))
        assert send(receiver, dev, old[3])[0].ok
        assert send(receiver, dev, new[3]) == []  # deferred: no ack
        assert receiver.stats.deferred == 1
        assert send(receiver, dev, new[2])[0].ok
        again = send(receiver, dev, new[3])
        assert [(a.seq, a.ok) for a in again] == [(4, True)]
        assert receiver.stats.rejected == {}
    finally:
        receiver.close()


def _reset_with_a_replayed_old_4(r: Receiver, dev: Device) -> list[tuple[int, bytes, bytes]]:
    """Epoch 1 stored its seq 1; the device resets, the new epoch stores 1 and 2, and an attacker
    replays the old epoch's never-stored 4 (accepted into the new epoch, unlinked: a gap at 3).
    The device's genuine 3 never comes (its buffer dropped it). The new chain's 1..6 are returned."""
    old = [dev.seal(tag="old") for _ in range(4)]
    assert all(a.ok for a in send(r, dev, old[0]))
    dev.restart_from_scratch()
    new = [dev.seal(tag="new") for _ in range(6)]
    assert all(a.ok for a in send(r, dev, new[0], new[1]))
    assert send(r, dev, old[3])[0].ok
    return new


def test_a_deferral_behind_a_gap_that_never_fills_is_settled_after_three_resends(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The genuine 4 conflicts with the replayed old 4 and neither links: deferred (no ack) on its
    first arrival and its first two resends; its third resend (defer_max_resends: 3) is settled:
    acked ok, the old 4 detached (kept), counted and logged. The genuine 5 behind it is accepted
    at once, nothing is refused, and if the genuine 3 does turn up after all, it links 4 and 5."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        new = _reset_with_a_replayed_old_4(receiver, dev)
        for _ in range(3):
            assert send(receiver, dev, new[3]) == []
        assert (receiver.stats.deferred, receiver.stats.settled) == (3, 0)
        with capture_logs() as logs:
            acks = send(receiver, dev, new[3])
        assert [(a.seq, a.ok) for a in acks] == [(4, True)]
        (settled,) = [e for e in logs if e["event"] == "batch_settled"]
        assert (settled["seq"], settled["after"], settled["detached"]) == (4, "resends", [4])
        assert (receiver.stats.settled, receiver.stats.detached) == (1, 1)
        assert [(a.seq, a.ok) for a in send(receiver, dev, new[4])] == [(5, True)]
        assert receiver.stats.deferred == 3
        assert receiver.stats.rejected == {}
        # epoch 2: 1, 2 linked; old 4 detached; genuine 4 and 5 unlinked (gap at 3)
        assert [r for r in _rows(receiver_db(tmp_path), dev.ids[2]) if r[1] == 2] == [
            (1, 2, 1, 0), (2, 2, 1, 0), (4, 2, 0, 0), (4, 2, 0, 1), (5, 2, 0, 0)]  # fmt: skip
        assert [(a.seq, a.ok) for a in send(receiver, dev, new[2])] == [(3, True)]
        assert [r for r in _rows(receiver_db(tmp_path), dev.ids[2]) if r[1] == 2 and not r[3]] == [
            (1, 2, 1, 0), (2, 2, 1, 0), (3, 2, 1, 0), (4, 2, 1, 0), (5, 2, 1, 0)]  # fmt: skip
    finally:
        receiver.close()


def test_a_deferral_is_settled_once_defer_max_age_has_passed(tmp_path: Path) -> None:
    """With resends not counting (defer_max_resends high), the bound is time: the genuine 4 and 5
    (5's prev does not match the held, unlinked old 4) are deferred while the clock is under
    defer_max_age (10 min by default) since their first deferral, and settled by the first resend
    after it: both acked ok, the old 4 detached, the chain-broken rule against LINKED batches
    untouched (a fork of seq 2 is still refused)."""
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "r.db",
                         out=tmp_path / "events.jsonl", cloud_key=cloud_key_file(tmp_path),
                         defer_max_resends=1000)  # fmt: skip
    assert cfg.defer_max_age == 600
    clock = FakeClock()
    r = Receiver(cfg, clock=clock)
    dev = Device()
    dev.register(tmp_path / "keys")
    r.open()
    try:
        new = _reset_with_a_replayed_old_4(r, dev)
        for _ in range(5):
            assert send(r, dev, new[4], new[3]) == []
            clock.advance(119.9)
        assert r.stats.deferred == 10
        clock.advance(0.6)
        acks = send(r, dev, new[4], new[3])
        assert [(a.seq, a.ok) for a in acks] == [(5, True), (4, True)]
        assert (r.stats.settled, r.stats.detached, r.stats.rejected) == (2, 1, {})
        _, _, fork = dev.seal(seq=2, prev=new[0][1], tag="fork")
        (ack,) = send(r, dev, (2, b"", fork))
        assert (ack.ok, ack.err) == (False, "chain-broken")
    finally:
        r.close()


def test_the_deferral_tracker_is_bounded_and_forgets_a_batch_settled_by_its_gap() -> None:
    """`Deferrals` keeps at most `capacity` batches (LRU); `forget` (the gap filled) restarts the count."""
    from cloud.chain import Deferrals

    ids = ("acme", "s001", "edge-01")
    d = Deferrals(max_resends=2, max_age=600, capacity=2)
    assert [d.note(ids, 4, b"a", 0.0), d.note(ids, 4, b"a", 1.0), d.note(ids, 4, b"a", 2.0)] == [None, None, "resends"]
    assert d.note(ids, 4, b"a", 3.0) is None  # settled: forgotten, a new deferral starts over
    d.forget(ids, 4, b"a")
    assert d.note(ids, 4, b"a", 4.0) is None
    d.note(ids, 5, b"b", 4.0)
    d.note(ids, 6, b"c", 4.0)  # capacity 2: (4, a) evicted
    assert d.note(ids, 4, b"a", 5.0) is None
    assert d.note(ids, 6, b"c", 700.0) == "age"


def test_a_fork_of_a_linked_chain_is_still_chain_broken(tmp_path: Path, receiver: Receiver) -> None:
    """Two signed batches for one seq of a linked chain: the second is chain-broken (uplink-v1)."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        s1 = dev.seal()
        s2 = dev.seal()
        assert all(a.ok for a in send(receiver, dev, s1, s2))
        _, _, fork = dev.seal(seq=2, prev=s1[1], tag="fork")
        (ack,) = send(receiver, dev, (2, b"", fork))
        assert (ack.ok, ack.err) == (False, "chain-broken")
    finally:
        receiver.close()


class FailingCommit(SqliteStore):
    """A SQLite store whose commit fails (as on a full disk), injected through the Store seam."""

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with super().transaction() as txn:
            yield txn
            raise OSError(28, "No space left on device")


def test_no_ok_ack_claims_data_when_the_commit_fails(tmp_path: Path) -> None:
    """The commit fails: the batch accepted in that group gets no ack, nor does a duplicate of it in
    the same group (it was never stored); a batch stored earlier is still answered ok; the group is
    reported uncommitted (a JetStream transport would not ack it)."""
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "r.db",
                         out=tmp_path / "events.jsonl", cloud_key=cloud_key_file(tmp_path))  # fmt: skip
    dev = Device()
    dev.register(tmp_path / "keys")
    b1, b2 = dev.seal(), dev.seal()
    good = Receiver(cfg, clock=FakeClock())
    good.open()
    assert send(good, dev, b1)[0].ok
    good.close()
    failing = Receiver(cfg, clock=FakeClock(), store=FailingCommit(cfg.db, cfg.out))
    failing.open()
    try:
        result = failing.process([Inbound(dev.topic, b2[2]), Inbound(dev.topic, b2[2]), Inbound(dev.topic, b1[2])])
        assert result.committed is False
        assert [(parse_ack(a.payload).seq, parse_ack(a.payload).ok) for a in result.acks] == [(1, True)]
    finally:
        failing.close()
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 3  # b1's events only


def test_amplifying_payload_costs_little_memory_and_is_not_answered(tmp_path: Path, receiver: Receiver) -> None:
    """10 MB of empty MessagePack arrays (behind an array-32 header, and bare) is refused unread
    above max_payload, and within it by the unpacker's container limits: the core's peak allocation
    stays a small multiple of what it was handed, nothing is answered, and the genuine batch in the
    same group is stored and acked."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        bomb = b"\xdd\x00\x98\x96\x80" + b"\x90" * 10_000_000
        small_bomb = b"\xdd\x00\x0f\xff\xff" + b"\x90" * 1_000_000  # just under the 1 MiB default
        genuine = dev.seal()
        tracemalloc.start()
        try:
            result = receiver.process([Inbound(dev.topic, bomb), Inbound(dev.topic, small_bomb),
                                       Inbound(dev.topic, genuine[2])])  # fmt: skip
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [parse_ack(a.payload).seq for a in result.acks] == [1]
        assert receiver.stats.unauthenticated == 2
        assert peak < 8 * 1024 * 1024, peak  # the old receiver built ~1.4 GiB of lists from this
    finally:
        receiver.close()


def _rows(db: Path, device: str) -> list[tuple[int, int, int, int]]:
    """(seq, epoch, linked, detached) of a device's stored batches, read straight from the SQLite file."""
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT seq, epoch, linked, detached FROM batches WHERE device = ?",
                           (device,)).fetchall()  # fmt: skip
    return sorted((int(a), int(b), int(c), int(d)) for a, b, c, d in rows)  # two batches may share a seq


def test_every_arrival_order_of_one_chain_ends_linked_in_one_epoch_with_no_reset(
    tmp_path: Path, receiver: Receiver
) -> None:
    """All 120 orders of seqs 1..5 of one chain (3, 4 then 1, 2 included): every batch is accepted
    into epoch 1 and ends linked, no reset is recorded, no rejection or deferral; the device's next
    batch (6) is linked with no gap, and a later fork of seq 3 gets a signed chain-broken, never a
    silent deferral."""
    orders = list(itertools.permutations(range(5)))
    devices = [Device(f"edge-p{i:03d}") for i in range(len(orders))]
    for dev in devices:
        dev.register(tmp_path / "keys")
    receiver.open()
    try:
        for dev, order in zip(devices, orders, strict=True):
            chain = [dev.seal() for _ in range(5)]
            acks = [a for i in order for a in send(receiver, dev, chain[i])]
            assert [(a.seq, a.ok) for a in acks] == [(i + 1, True) for i in order], order
            gaps = receiver.stats.gaps
            (nxt,) = send(receiver, dev, dev.seal())
            assert nxt.ok
            assert receiver.stats.gaps == gaps, order
            assert _rows(receiver_db(tmp_path), dev.ids[2]) == [(s, 1, 1, 0) for s in range(1, 7)], order
            _, _, fork = dev.seal(seq=3, prev=chain[1][1], tag="fork")
            (ack,) = send(receiver, dev, (3, b"", fork))
            assert (ack.seq, ack.ok, ack.err) == (3, False, "chain-broken"), order
        assert receiver.stats.resets == 0
        assert receiver.stats.deferred == 0
        assert receiver.stats.rejected == {"chain-broken": len(orders)}
    finally:
        receiver.close()


def test_a_device_that_starts_over_still_opens_a_new_epoch(tmp_path: Path, receiver: Receiver) -> None:
    """The late-first rule does not hide a genuine reset: a second, different seq 1 while the epoch
    holds its seq 1 is a reset (epoch 2), and the new chain links there."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        assert all(a.ok for a in send(receiver, dev, *[dev.seal() for _ in range(3)]))
        dev.restart_from_scratch()
        assert all(a.ok for a in send(receiver, dev, *[dev.seal(tag="new") for _ in range(2)]))
        assert receiver.stats.resets == 1
        assert _rows(receiver_db(tmp_path), dev.ids[2]) == [(1, 1, 1, 0), (1, 2, 1, 0), (2, 1, 1, 0),
                                                             (2, 2, 1, 0), (3, 1, 1, 0)]  # fmt: skip
    finally:
        receiver.close()


def receiver_db(tmp_path: Path) -> Path:
    return tmp_path / "r.db"


def test_replayed_stored_batch_gets_at_most_one_ack_per_interval(tmp_path: Path) -> None:
    """Anybody may republish a stored batch (answered before authentication): the first resend is
    acked ok, further ones within duplicate_ack_interval (5 s by default) are not (counted), another
    seq is independent, and after the interval a resend is answered again."""
    (tmp_path / "keys").mkdir()
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=tmp_path / "keys", db=tmp_path / "r.db",
                         out=tmp_path / "events.jsonl", cloud_key=cloud_key_file(tmp_path))  # fmt: skip
    clock = FakeClock()
    r = Receiver(cfg, clock=clock)
    dev = Device()
    dev.register(tmp_path / "keys")
    r.open()
    try:
        b1, b2 = dev.seal(), dev.seal()
        assert [a.seq for a in send(r, dev, b1, b2)] == [1, 2]
        assert [a.seq for a in send(r, dev, b1, b1, b1, b2)] == [1, 2]
        clock.mono += 4.9
        assert send(r, dev, b1) == []
        assert (r.stats.duplicates, r.stats.duplicate_acks_suppressed) == (5, 3)
        clock.mono += 0.2
        assert [(a.seq, a.ok) for a in send(r, dev, b1)] == [(1, True)]
        b3 = dev.seal()
        assert [(a.seq, a.ok) for a in send(r, dev, b3, b3)] == [(3, True)]  # stored once, acked once
    finally:
        r.close()


def test_the_duplicate_ack_limiter_forgets_the_least_recent_key_beyond_its_capacity() -> None:
    """Memory is bounded: beyond `capacity` keys the least recently answered is forgotten (answered again)."""
    from cloud.ack import DuplicateAcks

    limiter = DuplicateAcks(interval=5.0, capacity=2)
    ids = ("acme", "s001", "edge-01")
    assert limiter.allow(ids, 1, 0.0)
    assert not limiter.allow(ids, 1, 1.0)
    assert limiter.allow(ids, 2, 1.0)
    assert limiter.allow(ids, 3, 1.0)  # capacity 2: seq 1 evicted
    assert limiter.allow(ids, 1, 2.0)


def test_a_late_first_batch_of_a_new_chain_displaces_an_older_chains_unlinked_batches(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The price of the late-first rule: when the epoch holds only unlinked batches of an older chain
    (3, 4 of a life whose 1, 2 never arrived), a new chain's seq 1 joins the epoch instead of
    opening one; its batches that link then displace the older 3 and 4 (detached, kept), and none
    of the new chain is refused or deferred."""
    dev = Device()
    dev.register(tmp_path / "keys")
    receiver.open()
    try:
        old = [dev.seal(tag="old") for _ in range(4)]
        assert all(a.ok for a in send(receiver, dev, old[2], old[3]))
        dev.restart_from_scratch()
        new = [dev.seal(tag="new") for _ in range(4)]
        acks = [a for b in new for a in send(receiver, dev, b)]
        assert [(a.seq, a.ok) for a in acks] == [(1, True), (2, True), (3, True), (4, True)]
        assert (receiver.stats.detached, receiver.stats.deferred, receiver.stats.rejected) == (2, 0, {})
        rows = _rows(receiver_db(tmp_path), dev.ids[2])
        assert sorted(rows) == [(1, 1, 1, 0), (2, 1, 1, 0), (3, 1, 0, 1), (3, 1, 1, 0), (4, 1, 0, 1), (4, 1, 1, 0)]
    finally:
        receiver.close()
