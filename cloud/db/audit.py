"""What the store of record holds, checked from PostgreSQL alone: the fleet demo's summary and
the end-to-end tests' verdict.

Per device: its events (and whether any (epoch, id) is there twice), its batches per epoch
(seq 1..k without a hole, every batch's `prev` the `hh` of the one before, every batch linked,
the batches' event counts adding up to the events stored), and its quarantined batches.

Over all events: raw identifiers, found by shape with edge.privacy.scrub's patterns (MAC
addresses, NFC UIDs with or without separators, card numbers, e-mail addresses, phone numbers;
a whole value of digits with a GS1 check digit is a product code, not a phone) in every key and
value of the stored event data, plus known raw identifiers (edge.leakscan needles) if given. A
finding names the device, event id and kind, never the value (it may be personal).

Only read here: every query is one SELECT, so an audit can run while workers store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from edge.leakscan import Needle
from edge.privacy.cards import gtin_ok
from edge.privacy.scrub import IDENTIFIER_PATTERNS, scrub_cards

Key = tuple[str, str, str]  # (tenant, store, device)


# every query is limited to the audited tenant and stores (NULL: all)
_EVENTS = """
SELECT tenant, store, device, count(*), count(DISTINCT (epoch, id)) FROM events
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s) AND (%(stores)s::text[] IS NULL OR store = ANY(%(stores)s))
GROUP BY 1, 2, 3"""
_EPOCHS = """
SELECT tenant, store, device, epoch, count(*), min(seq), max(seq), bool_and(linked), sum(n) FROM batches
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s) AND (%(stores)s::text[] IS NULL OR store = ANY(%(stores)s))
  AND NOT detached
GROUP BY 1, 2, 3, 4"""
# a batch after seq 1 whose prev is not the hh of its epoch's previous batch (or that has none)
_BROKEN = """
SELECT b.tenant, b.store, b.device, count(*) FROM batches b
LEFT JOIN batches p ON (p.tenant, p.store, p.device, p.epoch, p.seq) = (b.tenant, b.store, b.device, b.epoch, b.seq - 1)
  AND NOT p.detached
WHERE (%(tenant)s::text IS NULL OR b.tenant = %(tenant)s) AND (%(stores)s::text[] IS NULL OR b.store = ANY(%(stores)s))
  AND NOT b.detached AND b.seq > 1 AND (p.hh IS NULL OR p.hh <> b.prev)
GROUP BY 1, 2, 3"""
_REJECTED = """
SELECT tenant, store, device, count(*) FROM rejected_batches
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s) AND (%(stores)s::text[] IS NULL OR store = ANY(%(stores)s))
GROUP BY 1, 2, 3"""
_DATA = """
SELECT tenant, store, device, id, data::text FROM events
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s) AND (%(stores)s::text[] IS NULL OR store = ANY(%(stores)s))"""


@dataclass(slots=True)
class DeviceAudit:
    tenant: str
    store: str
    device: str
    events: int = 0
    distinct: int = 0  # distinct (epoch, id)
    batches: int = 0
    batch_events: int = 0  # sum of the batches' n
    epochs: int = 0
    chain_problems: list[str] = field(default_factory=list)
    rejected: int = 0

    @property
    def duplicates(self) -> int:
        return self.events - self.distinct

    @property
    def chain_intact(self) -> bool:
        return not self.chain_problems and self.batch_events == self.events


@dataclass(slots=True, frozen=True)
class Finding:
    """An identifier-shaped string in a stored event: where and what kind, never the value."""

    tenant: str
    store: str
    device: str
    id: int
    kind: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.store}/{self.device} event {self.id}: {self.kind}"


@dataclass(slots=True, frozen=True)
class Audit:
    devices: dict[Key, DeviceAudit]
    findings: list[Finding]

    @property
    def events(self) -> int:
        return sum(d.events for d in self.devices.values())

    @property
    def duplicates(self) -> int:
        return sum(d.duplicates for d in self.devices.values())

    @property
    def batches(self) -> int:
        return sum(d.batches for d in self.devices.values())

    @property
    def rejected(self) -> int:
        return sum(d.rejected for d in self.devices.values())

    @property
    def chains_intact(self) -> bool:
        return all(d.chain_intact for d in self.devices.values())

    def stored(self, key: Key) -> int:
        d = self.devices.get(key)
        return 0 if d is None else d.events


def identifier_kinds(text: str) -> list[str]:
    """The kinds of raw identifier `text` looks like it holds ([] for none)."""
    kinds = [k for k in ("mac", "nfc_uid", "email") if IDENTIFIER_PATTERNS[k].search(text)]
    # a whole value of digits with a GS1 check digit is a product code (GTIN-14s start with 0,
    # as national phone numbers do); scrub's rule for GTINs where products stand
    if IDENTIFIER_PATTERNS["phone"].search(text) and not (text.isascii() and text.isdigit() and gtin_ok(text)):
        kinds.append("phone")
    hex_id = IDENTIFIER_PATTERNS["hex_id"].search(text)  # a bare UID/MAC: only with a letter a-f
    if hex_id is not None and any(c in "abcdefABCDEF" for c in hex_id.group().removeprefix("0x")):
        kinds.append("hex_id")
    if scrub_cards(text)[1]:  # a card number as edge.privacy.scrub finds them (Luhn, GS1 context)
        kinds.append("card")
    return kinds


def _strings(value: Any) -> Iterator[str]:
    """Every key and scalar value of a JSON document, as text."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def audit(conn: psycopg.Connection[Any], *, tenant: str | None = None, stores: Sequence[str] | None = None,
          scan: bool = True, needles: Sequence[Needle] = ()) -> Audit:  # fmt: skip
    """Audit the events and batches of `tenant` (all tenants: None), of `stores` only if given.

    `needles` (edge.leakscan): known raw identifiers looked for too, in every encoding given;
    `scan=False` skips the raw identifier scan (it reads every event's data)."""
    params = {"tenant": tenant, "stores": list(stores) if stores is not None else None}
    devices: dict[Key, DeviceAudit] = {}

    def dev(row: Sequence[Any]) -> DeviceAudit:
        key = (str(row[0]), str(row[1]), str(row[2]))
        return devices.setdefault(key, DeviceAudit(*key))

    for row in conn.execute(_EVENTS.encode(), params):
        d = dev(row)
        d.events, d.distinct = int(row[3]), int(row[4])
    for row in conn.execute(_EPOCHS.encode(), params):
        d = dev(row)
        epoch, n, lo, hi, linked, events = row[3:]
        d.epochs += 1
        d.batches += int(n)
        d.batch_events += int(events)
        if (lo, hi) != (1, n):
            d.chain_problems.append(f"epoch {epoch}: {n} batches with seq {lo}..{hi}")
        if not linked:
            d.chain_problems.append(f"epoch {epoch}: a batch is not linked to seq 1")
    for row in conn.execute(_BROKEN.encode(), params):
        dev(row).chain_problems.append(f"{row[3]} batch(es) whose prev is not the previous batch's hash")
    for row in conn.execute(_REJECTED.encode(), params):
        dev(row).rejected = int(row[3])
    findings: list[Finding] = []
    if scan:
        # a server-side cursor (it needs a transaction): bounded memory on a big table
        with conn.transaction(), conn.cursor(name="edge_audit_scan") as cur:
            cur.itersize = 2000
            cur.execute(_DATA.encode(), params)
            for t, s, d_, eid, text in cur:
                raw = text.encode()
                kinds = [n.label for n in needles if n.pattern and n.pattern in raw]
                kinds += [k for value in _strings(json.loads(text)) for k in identifier_kinds(value)]
                findings.extend(Finding(t, s, d_, int(eid), k) for k in kinds)
    return Audit(devices, findings)
