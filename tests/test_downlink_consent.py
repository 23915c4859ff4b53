"""Consent shards from the cloud (edge/downlink/consent.py, downlink-v1 §Consent).

What must hold: a shard never received is empty (nobody consented); a withdrawn pseudonym gets
its class's fallback at once; every buffered unsent event carrying it is deleted in one
transaction with ONE `edge.consent_purged` event of counts only, and its bytes are gone from
the SQLite files; logs, counters and reported counts never carry a pseudonym; shards survive a
restart; an old rev or a malformed shard changes nothing and is counted; a purge a crash
interrupted is finished at the next start; sealed batches are left alone and counted.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from edge.buffer import Buffer, SealedBatch, StoredEvent
from edge.buffer.schema import decode_body
from edge.clock import FakeClock
from edge.config import Config, Privacy
from edge.downlink.consent import ConsentSync
from edge.events import Ident, Pending
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.wire.downlink import Document, document, sign_document, verify_document
from edge.wire.uplink import kid_of, public_raw

CLOUD = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = kid_of(public_raw(CLOUD.public_key()))
TENANT_HEX = "11" * 32


def shard_of(p: str) -> str:
    return hashlib.sha256(p.encode("utf-8")).digest()[:1].hex()  # the spec's rule, written out


def same_shard(n: int) -> tuple[str, list[str]]:
    """`n` pseudonyms shaped like stable ones that share one shard."""
    by_shard: dict[str, list[str]] = {}
    for i in itertools.count():
        p = f"loy:s0badc0de:{i:026d}"
        group = by_shard.setdefault(shard_of(p), [])
        group.append(p)
        if len(group) == n:
            return shard_of(p), sorted(group)
    raise AssertionError


def consent_doc(shard: str, rev: int, consented: list[str]) -> Document:
    doc = document("consent", "acme", "_all", "_all", KID, 1_767_225_600_000, shard=shard, rev=rev,
                   consented=consented)
    return verify_document(sign_document(doc, CLOUD), topic=f"edge/v1/acme/_all/_all/consent/{shard}",
                           prefix="edge/v1", trusted={KID: CLOUD.public_key()})


def raw_doc(body: dict[str, Any]) -> Document:
    """A document as apply() could get it from a buggy caller (not through verify_document)."""
    return Document(kind="consent", tenant="acme", store="_all", device="_all", kid=KID, t=1, body=body, raw=b"",
                    digest="00")


def config(state: Path) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "5ms"},
    })


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buf = await Buffer.open(config(tmp_path / "state"), FakeClock())
    yield buf
    await buf.close()


def visit(customer: str | None, i: int) -> Pending:
    data: dict[str, Any] = {"register": "till-1", "total": i}
    if customer is not None:
        data["customer"] = customer
    return Pending(1_767_225_600_000 + i, "pos", "pos.receipt", data)


async def stored(buf: Buffer) -> list[dict[str, Any]]:
    return [decode_body(e.body) for e in await buf.unsealed(100_000, 1 << 30)]


def file_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.iterdir()) if p.is_file() and p.name.startswith("buffer"))


async def test_a_shard_never_received_is_empty(tmp_path: Path) -> None:
    sync = ConsentSync(tmp_path)
    _, (p,) = same_shard(1)
    assert p not in sync
    assert sync.counts() == (0, 0)
    sync.close()


async def test_revoke_purges_buffered_events_and_leaves_no_trace(tmp_path: Path, buffer: Buffer) -> None:
    shard, (gone, kept) = same_shard(2)
    state = tmp_path / "state"
    sync = ConsentSync(state, buffer)
    await sync.apply(consent_doc(shard, 1, [gone, kept]))
    assert gone in sync
    for i in range(5):
        await buffer.put(visit(gone, i))
    for i in range(3):
        await buffer.put(visit(kept, 10 + i))
    await buffer.put(visit(None, 20))
    await buffer.flush()
    buffer.put_nowait(visit(gone, 30))  # still queued, not committed, when the revision arrives
    with capture_logs() as logs:
        await sync.apply(consent_doc(shard, 2, [kept]))
    assert gone not in sync
    assert kept in sync
    events = await stored(buffer)
    assert not any(e["data"].get("customer") == gone for e in events)
    assert sum(e["data"].get("customer") == kept for e in events) == 3
    purged = [e for e in events if e["type"] == "edge.consent_purged"]
    assert len(purged) == 1
    assert purged[0]["src"] == "edge"
    assert purged[0]["data"] == {"shard": shard, "rev": 2, "events": 6}
    assert sync.counts() == (1, 1)
    assert gone not in repr(logs)
    assert gone not in repr(sync.status())
    assert any(entry["event"] == "consent_purged" and entry["events"] == 6 for entry in logs)
    await buffer.close()
    assert gone.encode() not in file_bytes(state)
    assert kept.encode() in file_bytes(state)  # the scan does find what is still there
    sync.close()
    assert gone.encode() not in b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith("consent"))


async def test_withdrawal_uses_the_fallback_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = KeyStore(tmp_path / "keys", clock)
    keys.init()
    keys.provision_tenant_key(TENANT_HEX.encode())
    sync = ConsentSync(tmp_path / "state")
    privacy = Privacy.model_validate({"classes": {"loyalty_id": {"policy": "stable", "fallback": "ephemeral"}}})
    pz = Pseudonymizer(privacy, keys, sync)
    ident = Ident("loyalty_id", "8120 9364 5172")
    stable = pz.stable_pseudonym(ident)
    assert stable is not None
    assert pz.pseudonym(ident) != stable  # nothing received yet: fail closed
    await sync.apply(consent_doc(shard_of(stable), 1, [stable]))
    assert pz.pseudonym(ident) == stable
    await sync.apply(consent_doc(shard_of(stable), 2, []))  # no buffer bound: the purge waits
    p = pz.pseudonym(ident)
    assert p is not None
    assert p.startswith("loy:e1:")
    sync.close()


async def test_shards_survive_a_restart(tmp_path: Path) -> None:
    shard, members = same_shard(3)
    sync = ConsentSync(tmp_path)
    await sync.apply(consent_doc(shard, 4, members))
    sync.close()
    again = ConsentSync(tmp_path)
    assert again.counts() == (1, 3)
    assert all(p in again for p in members)
    assert again.revs() == {shard: 4}
    await again.apply(consent_doc(shard, 4, []))  # the same rev again (a retained copy): changes nothing
    assert again.counts() == (1, 3)
    assert again.dropped["stale"] == 1
    again.close()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s, m: {"shard": s, "rev": 1, "consented": m[::-1]}, "unsorted"),
        (lambda s, m: {"shard": s, "rev": 1, "consented": [m[0], m[0]]}, "unsorted"),
        (lambda s, m: {"shard": "zz", "rev": 1, "consented": m}, "bad-shard"),
        (lambda s, m: {"shard": "0" if s != "00" else "01", "rev": 1, "consented": m}, "bad-shard"),
        (lambda s, m: {"shard": s, "rev": 0, "consented": m}, "bad-rev"),
        (lambda s, m: {"shard": s, "rev": True, "consented": m}, "bad-rev"),
        (lambda s, m: {"shard": s, "rev": 1, "consented": "all"}, "bad-consented"),
        (lambda s, m: {"shard": s, "rev": 1, "consented": [*m, 7]}, "bad-consented"),
        (lambda s, m: {"shard": f"{(int(s, 16) + 1) % 256:02x}", "rev": 1, "consented": m}, "wrong-shard"),
    ],
)
async def test_malformed_shard_documents_are_dropped_and_counted(tmp_path: Path, mutate: Any, reason: str) -> None:
    shard, members = same_shard(2)
    sync = ConsentSync(tmp_path)
    with capture_logs() as logs:
        await sync.apply(raw_doc(mutate(shard, members)))
    assert sync.dropped == {reason: 1}
    assert sync.counts() == (0, 0)
    assert not any(p in repr(logs) for p in members)
    sync.close()


async def test_an_interrupted_purge_is_finished_at_the_next_start(tmp_path: Path, buffer: Buffer) -> None:
    shard, (gone,) = same_shard(1)
    state = tmp_path / "state"
    for i in range(4):
        await buffer.put(visit(gone, i))
    await buffer.flush()
    first = ConsentSync(state)  # no buffer bound: as if the daemon died before the purge
    await first.apply(consent_doc(shard, 1, [gone]))
    await first.apply(consent_doc(shard, 2, []))
    first.close()
    second = ConsentSync(state, buffer)
    assert gone not in second
    await second.resume()
    events = await stored(buffer)
    assert [e["data"] for e in events if e["type"] == "edge.consent_purged"] == [
        {"shard": shard, "rev": 2, "events": 4}]
    assert not any(e["data"].get("customer") == gone for e in events)
    await second.resume()  # done: nothing is purged (or reported) twice
    assert len([e for e in await stored(buffer) if e["type"] == "edge.consent_purged"]) == 1
    second.close()


def _build(seq: int, prev: bytes, events: list[StoredEvent]) -> SealedBatch:
    header = msgpack.packb({"seq": seq, "prev": prev})
    body = msgpack.packb([decode_body(e.body) for e in events])
    payload = msgpack.packb({"v": 1, "h": header, "b": body, "s": bytes(64)})
    return SealedBatch(seq, hashlib.sha256(header).digest(), payload, events[0].id, events[-1].id, len(events))


async def test_sealed_batches_are_left_and_counted(tmp_path: Path, buffer: Buffer) -> None:
    """Sealed batches are signed and chained: the purge leaves them (the cloud erases on its side)."""
    shard, (gone,) = same_shard(1)
    sync = ConsentSync(tmp_path / "state", buffer)
    await sync.apply(consent_doc(shard, 1, [gone]))
    for i in range(3):
        await buffer.put(visit(gone, i))
    await buffer.flush()
    batch = await buffer.seal(await buffer.unsealed(2, 1 << 20), _build)
    with capture_logs() as logs:
        await sync.apply(consent_doc(shard, 2, []))
    (entry,) = [e for e in logs if e["event"] == "consent_purged"]
    assert (entry["events"], entry["sealed_batches_kept"], entry["sealed_events_kept"]) == (1, 1, 2)
    assert [b.seq for b in await buffer.pending_batches()] == [batch.seq]
    sync.close()



class _FailingOnce:
    """The buffer's purge, failing the first time (a full disk)."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.calls = 0

    async def purge_carrying(self, needles: Any, report_type: str, report: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise OSError("disk full")
        return await self.buf.purge_carrying(needles, report_type, report)


async def test_a_failed_purge_stays_pending_and_is_retried(tmp_path: Path, buffer: Buffer) -> None:
    shard, (a, b) = same_shard(2)
    flaky = _FailingOnce(buffer)
    sync = ConsentSync(tmp_path / "state", flaky)
    await sync.apply(consent_doc(shard, 1, [a, b]))
    await buffer.put(visit(a, 1))
    await buffer.put(visit(b, 2))
    await buffer.flush()
    with capture_logs() as logs:
        await sync.apply(consent_doc(shard, 2, [b]))  # fails: a stays in the buffer, fallback applies
    assert a not in sync
    assert any(e["event"] == "consent_purge_failed" for e in logs)
    assert any(e["data"].get("customer") == a for e in await stored(buffer))
    await sync.apply(consent_doc(shard, 3, []))  # the next withdrawal retries the pending one too
    events = await stored(buffer)
    assert not any("customer" in e["data"] for e in events)
    assert [e["data"] for e in events if e["type"] == "edge.consent_purged"] == [
        {"shard": shard, "rev": 3, "events": 2}]
    sync.close()


async def test_an_unreadable_stored_shard_counts_as_empty(tmp_path: Path) -> None:
    import sqlite3

    shard, members = same_shard(2)
    sync = ConsentSync(tmp_path)
    await sync.apply(consent_doc(shard, 1, members))
    sync.close()
    with sqlite3.connect(tmp_path / "consent.db") as db:
        db.execute("UPDATE shards SET consented = x'c1c1'")  # 0xc1 is never valid MessagePack
    again = ConsentSync(tmp_path)
    assert again.counts() == (0, 0)
    assert members[0] not in again
    await again.apply(consent_doc(shard, 2, members[:1]))  # the next revision repairs it
    assert again.counts() == (1, 1)
    again.close()
