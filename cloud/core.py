"""The ingest core: parse/verify -> identity -> chain/dedupe -> store -> signed ack, for a group.

Design. One object, `IngestCore`, runs the stages for a group of messages inside one store
transaction, and is the same whatever delivered the group (MQTT, NATS JetStream, a file from
a USB stick) and whatever stores it (SQLite, PostgreSQL): the transport and the store are
seams (cloud/transport.py, cloud/store.py). For each message, in order:

1. topic: `{prefix}/{tenant}/{store}/{device}/batch`, else dropped (no identity to answer);
2. parse, once and bounded (cloud/verify.py); unparseable input is unauthenticated: no ack;
3. already stored (same identity, seq and hh, any epoch): ack ok, before any other check, at
   most once per (identity, seq) every few seconds (cloud/ack.py `DuplicateAcks`: anybody can
   replay a stored batch), the rest counted (`duplicate_acks_suppressed`);
4. authenticate (key bound to the topic's identity, signature, body hash): failures get NO ack,
   they are counted (`unauthenticated`) and logged, and nothing of them is stored;
5. check (topic match, body) and chain (cloud/chain.py): a signed rejection, recorded in the
   store's quarantine; `deferred` gets no ack (the device resends later), until the same batch
   has come back often or long enough (`Deferrals`), then it is settled: accepted, counted
   (`settled`) and logged (`batch_settled`);
6. store (`add`, `relink`, `detach`).

Then the transaction commits, and only then are the acks released (`GroupResult.acks`). If the
commit fails, only acks that claim nothing new go out (duplicates of batches stored earlier,
and rejections); the transport then leaves the group unsettled (JetStream redelivers it).
`process` is synchronous (blocking store calls): run it in a worker thread. A bug while
handling one message rolls back that message only (savepoint), counts an error and goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from cloud import chain, verify
from cloud.ack import AckSigner, DuplicateAcks
from cloud.identity import DeviceKeys
from cloud.store import Accepted, Ids, Rejected, Store, StoreTxn
from cloud.transport import Inbound, Outbound
from edge.clock import Clock
from edge.errors import WireError
from edge.wire.uplink import Batch, Limits, parse_topic

log = structlog.get_logger()


@dataclass(slots=True)
class GroupResult:
    """What one group produced; stats and logs are applied by the caller once it is known."""

    acks: list[Outbound] = field(default_factory=list)
    committed: bool = True
    accepted: list[Accepted] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Work:
    result: GroupResult = field(default_factory=GroupResult)
    claims: list[bool] = field(default_factory=list)  # per ack: does it claim data of this group?
    stored_here: set[tuple[Ids, int, bytes]] = field(default_factory=set)


class IngestCore:
    def __init__(self, *, store: Store, keys: DeviceKeys, signer: AckSigner, limits: Limits, prefix: str,
                 clock: Clock, duplicate_acks: DuplicateAcks | None = None,
                 deferrals: chain.Deferrals | None = None) -> None:  # fmt: skip
        self._store = store
        self._deferrals = deferrals or chain.Deferrals()
        self._dup_acks = duplicate_acks or DuplicateAcks()
        self._keys = keys
        self._signer = signer
        self._limits = limits
        self._prefix = prefix
        self._clock = clock

    def process(self, items: Sequence[Inbound]) -> GroupResult:
        """Run a group through every stage in one transaction; see the module doc."""
        now = self._clock.wall_ms()
        w = _Work()
        try:
            with self._store.transaction() as txn:
                txn.lock(self._identities(items))
                for item in items:
                    try:
                        with txn.message():
                            self._handle(txn, item, now, w)
                    except Exception:  # a bug must not stall every batch behind this one
                        w.result.counts["errors"] += 1
                        log.exception("receiver_message_failed", topic=item.topic[:200])
        except Exception as exc:
            log.error("receiver_store_failed", error=str(exc), batches=len(items), hint="disk full? database down?")
            r = w.result
            r.acks = [a for a, claims in zip(r.acks, w.claims, strict=True) if not claims]
            r.committed = False
            r.accepted = []
            r.counts = Counter({"errors": 1})
            r.rejected = Counter()
            r.notes = []
            return w.result
        return w.result

    def _identities(self, items: Sequence[Inbound]) -> list[Ids]:
        """The group's batch identities, sorted: the order every transaction locks them in."""
        found: set[Ids] = set()
        for item in items:
            try:
                tenant, st, device, kind = parse_topic(item.topic, self._prefix)
            except WireError:
                continue
            if kind == "batch":
                found.add((tenant, st, device))
        return sorted(found)

    # ------------------------------------------------------------------ one message

    def _handle(self, txn: StoreTxn, item: Inbound, now: int, w: _Work) -> None:  # noqa: PLR0911 - one exit per stage
        r = w.result
        try:
            tenant, st, device, kind = parse_topic(item.topic, self._prefix)
        except WireError as exc:
            r.rejected["malformed"] += 1
            r.counts["unacked"] += 1
            log.warning("batch_rejected", reason="malformed", detail=f"unusable topic: {exc}")
            return
        if kind != "batch":
            return
        ids: Ids = (tenant, st, device)
        try:
            batch = verify.parse(item.payload, self._limits)
        except verify.Refusal as ref:
            self._unauthenticated(ids, None, ref, w)
            return
        if chain.is_duplicate(txn, ids, batch.seq, batch.hh):
            r.counts["duplicate"] += 1
            here = (ids, batch.seq, batch.hh) in w.stored_here  # its own ok ack is in this group already
            if here or not self._dup_acks.allow(ids, batch.seq, self._clock.monotonic()):
                r.counts["duplicate_acks_suppressed"] += 1
                return
            self._ack(w, ids, batch, ok=True, claims=False)
            return
        try:
            verify.authenticate(batch, ids, self._keys)
        except verify.Refusal as ref:
            self._unauthenticated(ids, batch, ref, w)
            return
        try:
            events = verify.check(batch, ids, self._limits)
        except verify.Refusal as ref:
            self._reject(txn, ids, batch, ref.reason, ref.detail, now, w)
            return
        d = chain.decide(txn, batch)
        if d.verdict == "deferred":
            why = self._deferrals.note(ids, batch.seq, batch.hh, self._clock.monotonic())
            if why is None:
                r.counts["deferred"] += 1
                log.warning("batch_deferred", tenant=ids[0], store=ids[1], device=ids[2], seq=batch.seq,
                            detail=d.detail)  # fmt: skip
                return
            deferred_for = d.detail
            d = chain.decide(txn, batch, settle=True)
            if d.verdict == "accepted":
                r.counts["settled"] += 1
                log.warning("batch_settled", tenant=ids[0], store=ids[1], device=ids[2], seq=batch.seq,
                            after=why, detail=deferred_for, detached=[s for s, _ in d.detach],
                            hint="a gap that never filled: accepted unlinked, a conflicting unlinked batch "
                            "detached")  # fmt: skip
        else:
            self._deferrals.forget(ids, batch.seq, batch.hh)
        if d.verdict != "accepted":
            self._reject(txn, ids, batch, d.verdict, d.detail, now, w)
            return
        self._accept(txn, ids, batch, events, d, now, w)

    def _accept(  # noqa: PLR0917 - internal, one call site
        self, txn: StoreTxn, ids: Ids, batch: Batch, events: list[dict[str, Any]], d: chain.Decision,
                now: int, w: _Work) -> None:  # fmt: skip
        r = w.result
        who = {"tenant": ids[0], "store": ids[1], "device": ids[2]}
        for seq, hh in d.detach:
            txn.detach(ids, seq, hh)
        for seq, hh in d.relink:
            txn.relink(ids, seq, hh)
        acc = Accepted(batch=batch, events=events, epoch=d.epoch, highest=d.highest, linked=d.linked,
                       received_ms=now)  # fmt: skip
        txn.add(acc)
        r.accepted.append(acc)
        w.stored_here.add((ids, batch.seq, batch.hh))
        r.counts["accepted"] += 1
        r.counts["events"] += len(events)
        if d.reset:
            r.counts["resets"] += 1
            r.notes.append(("uplink_reset", {**who, "epoch": d.epoch}))
        if d.gap is not None:
            r.counts["gaps"] += 1
            r.notes.append(("uplink_gap", {**who, "missing_from": d.gap[0], "missing_to": d.gap[1]}))
        if d.detach:
            r.counts["detached"] += len(d.detach)
            hint = "batches of an older chain, replayed; kept out of it"
            r.notes.append(("uplink_detached", {**who, "seqs": [s for s, _ in d.detach], "hint": hint}))
        self._ack(w, ids, batch, ok=True, claims=True)

    def _ack(self, w: _Work, ids: Ids, batch: Batch, *, ok: bool, claims: bool, err: str | None = None) -> None:
        w.result.acks.append(self._signer.ack(ids, batch.seq, batch.hh, ok=ok, err=err))
        w.claims.append(claims)

    def _reject(  # noqa: PLR0917 - internal, two call sites
        self, txn: StoreTxn, ids: Ids, batch: Batch, reason: str, detail: str, now: int, w: _Work
    ) -> None:
        """An authenticated batch refused: quarantined, and answered with a signed rejection."""
        w.result.rejected[reason] += 1
        log.warning("batch_rejected", tenant=ids[0], store=ids[1], device=ids[2], seq=batch.seq, reason=reason,
                    detail=detail)  # fmt: skip
        txn.reject(Rejected(ids=ids, seq=batch.seq, hh=batch.hh, kid=batch.kid, reason=reason, detail=detail,
                            received_ms=now))  # fmt: skip
        self._ack(w, ids, batch, ok=False, claims=False, err=reason)

    def _unauthenticated(self, ids: Ids, batch: Batch | None, ref: verify.Refusal, w: _Work) -> None:
        """Input we could not authenticate: counted and logged, never answered, never stored."""
        r = w.result
        r.rejected[ref.reason] += 1
        r.counts["unauthenticated"] += 1
        r.counts["unacked"] += 1
        log.warning("batch_unauthenticated", tenant=ids[0], store=ids[1], device=ids[2],
                    seq=None if batch is None else batch.seq, reason=ref.reason, detail=ref.detail[:200],
                    hint="not answered: anybody on the broker can publish this")  # fmt: skip
