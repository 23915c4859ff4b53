"""The store seam: where the ingest core keeps batches, events, chain state and rejections.

Design. The core (cloud/core.py) handles a *group* of messages (whatever the transport
delivered together) inside ONE store transaction: for each batch it reads the chain state
(`device`, `at_seq`), decides (cloud/chain.py), and writes (`add`, `relink`, `detach`,
`reject`). The transaction commits when the `transaction()` block exits normally, and only
then does the core hand the acks to the transport: an `ok: true` ack promises the batch is
stored, so acks never precede the commit. On an exception the block rolls back and the core
sends only acks that claim nothing new ("already stored").

Exactly-once. `add` writes a batch's dedupe row (tenant, store, device, seq, hh) and its events
in the same transaction, so after a crash either both are there or neither is, and the resend
is deduplicated by the row. A store of record must enforce uniqueness of (tenant, store,
device, seq, hh) itself (a primary key), so two workers racing on one batch cannot both commit.

Concurrency. The core calls a store from one worker thread at a time (blocking calls are fine:
SQLite, psycopg). A store shared by several workers must serialize chain decisions per device:
`device(ids)` is the first call the core makes for a batch's identity in a transaction, so a
PostgreSQL store takes the device row lock there (`SELECT ... FOR UPDATE`, inserting the row
first when it is missing) and holds it until commit.

Per-message isolation. `message()` wraps one message's reads and writes (SQL SAVEPOINT): when
the core hits a bug on one message it rolls back to the savepoint, counts the error, and the
rest of the group still commits.

Epochs and links (see cloud/chain.py). A device that lost its state starts over at seq 1: the
store keeps every batch with the `epoch` (chain) it was accepted into. `linked` says the batch
is anchored to its epoch's seq 1 through held batches; `detached` says it was moved out of its
epoch's chain because a batch that links displaced it (an old-epoch batch replayed into a new
epoch). Detached batches stay stored (they are genuine, signed data) and stay deduplicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from edge.wire.uplink import Batch

Ids = tuple[str, str, str]  # (tenant, store, device)


@dataclass(slots=True, frozen=True)
class DeviceState:
    """A device's current chain: its epoch and the highest seq accepted in it."""

    epoch: int
    highest: int


@dataclass(slots=True, frozen=True)
class StoredBatch:
    """What the chain check needs of a stored batch."""

    epoch: int
    hh: bytes  # SHA-256 of the header bytes
    prev: bytes  # the header's prev
    linked: bool  # anchored to its epoch's seq 1 through held batches
    detached: bool  # moved out of its epoch's chain (kept, deduplicated, never linked again)


@dataclass(slots=True, frozen=True)
class Accepted:
    """A verified batch to store, with the chain position the core decided for it."""

    batch: Batch
    events: Sequence[Mapping[str, Any]]  # as decoded from the body, unknown keys kept
    epoch: int
    highest: int  # the device's highest seq in `epoch` after this batch
    linked: bool
    received_ms: int


@dataclass(slots=True, frozen=True)
class Rejected:
    """A refused, AUTHENTICATED batch, for the quarantine record (unauthenticated input is never
    recorded: anybody can publish it, and its hh is not reliable)."""

    ids: Ids  # from the topic
    seq: int | None
    hh: bytes | None
    kid: str | None
    reason: str  # an uplink-v1 reason (or "deferred")
    detail: str
    received_ms: int


class StoreTxn(Protocol):
    """One transaction of a `Store` (see the module doc for the call order)."""

    def lock(self, identities: Sequence[Ids]) -> None:
        """Lock every device of the group up front, in the order given (sorted by the core), so two
        transactions holding batches of the same devices never wait on each other in a cycle."""
        ...

    def device(self, ids: Ids) -> DeviceState | None:
        """The device's chain state; None for a device never seen. Lock the device here."""
        ...

    def at_seq(self, ids: Ids, seq: int) -> list[StoredBatch]:
        """Every stored batch of this device with this seq, in any epoch, detached ones included."""
        ...

    def add(self, accepted: Accepted) -> None:
        """Store the batch row, its events and the device state (epoch, highest) together."""
        ...

    def relink(self, ids: Ids, seq: int, hh: bytes) -> None:
        """Mark a held batch as linked (a batch that fills the gap before it arrived)."""
        ...

    def detach(self, ids: Ids, seq: int, hh: bytes) -> None:
        """Move a held batch out of its epoch's chain (kept and deduplicated, never linked)."""
        ...

    def reject(self, rejected: Rejected) -> None:
        """Record a refused, AUTHENTICATED batch (quarantine: reason, detail, kid, hh). The core never
        calls it for unauthenticated input (anybody can publish that; it is counted and logged)."""
        ...

    def message(self) -> AbstractContextManager[None]:
        """A savepoint around one message: rolled back (and re-raised) when the block raises."""
        ...


class Store(Protocol):
    """A store of record. `open` before the first transaction, `close` after the last."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def transaction(self) -> AbstractContextManager[StoreTxn]:
        """Begin; commit (durably) when the block exits normally, roll back when it raises."""
        ...
