"""Simulated NFC reader: synthetic tags (UID + NDEF bytes) through the real tap path.

    made-up activations (TagRead: tag type, UID, NDEF octets) -> TapSession -> nfc.tap
                                                 (debounce, NDEF parsing, GS1, rules)

The tags are what a store's reader meets, written as real tags are:

- shelf tags (NTAG, Type 2): a GS1 Digital Link URI record `https://id.gs1.org/01/<GTIN>`,
  now and then with a batch (`/10/<lot>`) or as a Smart Poster with a title. Their UIDs are
  the configured `store_tags` (one per product, in order), the rest fixed made-up ones
  (which the real path treats as any unknown tag's UID: a `card` identifier);
- loyalty cards (Type 4 ~70 %, else Type 2) of the shared customer pool
  (`drivers.base.customer_pool`, the same customers as on POS receipts), carrying the
  member number the way the first configured loyalty rule reads it: after its
  `uri_prefix` in a URI record, in a `mime_type` record's payload, or as a Text record
  starting with its `number_prefix`, fitted to its `number_length`. Without a loyalty
  rule they carry `https://club.freshmart.example/card/<number>` (the real path then
  says `kind: unknown`, as a real store without that rule would);
- now and then a bank card (Type 4, no NDEF), a blank sticker (empty NDEF), a tag moved
  away mid-read (unreadable) and a damaged tag (malformed NDEF, counted as rejected);
- a hesitant hand: ~3 % of taps are lifted and put back within the debounce interval
  (debounced: no second reading).

The reader sees one tag at a time; activations are paced at `drivers.nfc.sim.rate` taps
per second (Poisson) on the injected clock, each resting 0.3-1.5 s on the reader.

`tags`: a source of tags (TagRead) the sim reads in order instead of making them up, as a
replay or a parity test does (tests/test_drivers_sim_parity.py puts the same NDEF bytes on an
emulated tag read by nfcpy). The messages are made by `shelf_message` and `loyalty_message`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
from collections.abc import AsyncIterator, Iterable, Sequence

import ndef as ndeflib

from drivers.base import Customer, SimPacer, Sleep, classify_injected, customer_pool, random_nfc_uid, store_catalogue
from drivers.nfc.config import Nfc, NfcRule
from drivers.nfc.tap import TagRead, TapSession
from edge.clock import Clock
from edge.events import Reading

DEFAULT_LOYALTY_PREFIX = "https://club.freshmart.example/card/"
_P_LOYALTY = 0.3
_P_BANK_CARD = 0.03
_P_BLANK = 0.01
_P_UNREADABLE = 0.01
_P_DAMAGED = 0.005
_P_BOUNCE = 0.03
_TAGS_SEED = 0x7A65
DAMAGED_NDEF = b"\xd1\x01\x40U\x04broken"  # a damaged tag: a record claiming 64 payload bytes, holding 7
# (probability, tag type, NDEF octets, read failed): a bank card (no NDEF), a blank sticker,
# a tag moved away mid-read, a damaged tag (a record claiming 64 payload bytes, holding 7)
_ODD_TAGS: tuple[tuple[float, str, bytes | None, bool], ...] = (
    (_P_BANK_CARD, "Type4Tag", None, False),
    (_P_BLANK, "Type2Tag", b"", False),
    (_P_UNREADABLE, "Type2Tag", None, True),
    (_P_DAMAGED, "Type2Tag", DAMAGED_NDEF, False),
)


def encode(*records: ndeflib.Record) -> bytes:
    """An NDEF message of ndeflib records (what a tag's NDEF area holds)."""
    return b"".join(ndeflib.message_encoder(list(records)))


def shelf_tag_uids(count: int) -> list[str]:
    """The made-up UIDs of the simulated shelf tags (fixed, whatever the seed), upper hex."""
    rng = random.Random(_TAGS_SEED)
    return [random_nfc_uid(rng) for _ in range(count)]


def _fit(number: str, rule: NfcRule | None) -> str:
    """The customer's number shaped as `rule` expects it (prefix, length)."""
    if rule is None:
        return number
    prefix = rule.number_prefix or ""
    lo, hi = rule.number_length
    digits = prefix + number[len(prefix):] if prefix and not number.startswith(prefix) else number
    length = max(lo, min(hi, len(digits)))
    return (digits + "0" * length)[:length]


def shelf_message(gtin: str, lot: str | None = None, title: str | None = None) -> bytes:
    """The NDEF message of a shelf tag: a GS1 Digital Link URI (with `/10/<lot>`), as a Smart Poster
    with `title` when one is given."""
    link = f"https://id.gs1.org/01/{gtin}" + (f"/10/{lot}" if lot else "")
    return encode(ndeflib.SmartposterRecord(link, title)) if title else encode(ndeflib.UriRecord(link))


def loyalty_message(number: str, rule: NfcRule | None) -> bytes:
    """The NDEF message of a loyalty card as `rule` reads it (see the module docstring)."""
    if rule is None:
        return encode(ndeflib.UriRecord(DEFAULT_LOYALTY_PREFIX + number))
    if rule.uri_prefix is not None:
        return encode(ndeflib.UriRecord(rule.uri_prefix + number))
    if rule.mime_type is not None:
        return encode(ndeflib.Record(rule.mime_type, "", f'{{"member": "{number}"}}'.encode()))
    return encode(ndeflib.TextRecord(f"Member {number}", "en"))


class NfcSim:
    """Simulated NFC backend (see the module docstring for what it reads).

    `inject`: raw identifiers for the leak test (see `drivers.base.classify_injected`).
    The first taps are loyalty cards with the injected NFC UIDs and loyalty numbers,
    paired in order (the k-th injected UID with the k-th injected loyalty number; where
    one list is shorter, a pool customer's value fills in). `limit`: stop after that
    many readings. `sleep`: used for pacing.
    """

    name = "sim"

    def __init__(
        self,
        cfg: Nfc,
        clock: Clock,
        *,
        inject: Sequence[str] | None = None,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
        tags: Iterable[TagRead] | None = None,
    ) -> None:
        self._rng = random.Random(cfg.sim.seed)
        self._clock = clock
        self._limit = limit
        self._count = 0
        self._pacer = SimPacer(cfg.sim.rate, clock, sleep, self._rng)
        self._session = TapSession(cfg)
        self._rule = next((r for r in cfg.rules if r.kind == "loyalty"), None)
        self._shelf = self._shelf_tags(cfg)
        self._cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self._shelf))))
        self._order = list(range(len(self._shelf)))
        self._rng.shuffle(self._order)  # which products are popular depends on the seed
        self._customers = customer_pool()
        self._cards: dict[int, TagRead] = {}
        inj = classify_injected(inject)
        uids, numbers = inj["nfc_uid"], inj["loyalty_id"]
        self._injected: list[TagRead] = []
        for k in range(max(len(uids), len(numbers))):
            c = self._customers[k]
            uid = uids[k] if k < len(uids) else c.card_uid
            number = numbers[k] if k < len(numbers) else c.loyalty
            self._injected.append(self._card(c, uid, number))
        self._injected.reverse()
        self._source = None if tags is None else iter(tags)

    async def open(self) -> None:
        """Nothing to open: the simulated reader is always there."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, int]:
        """The nfcpy backend's counters (no identifiers)."""
        return {**self._session.stats(), "dropped": 0}

    async def readings(self) -> AsyncIterator[Reading]:
        pacer, session, clock, rng = self._pacer, self._session, self._clock, self._rng
        lifted: tuple[bytes, float] | None = None  # the last tag and when it leaves the reader
        while self._limit is None or self._count < self._limit:
            delay = pacer.next_delay()
            if delay is not None:
                await pacer.sleep(delay)
            read = self._next_tag() if self._source is None else next(self._source, None)
            if read is None:
                return  # the source ran out
            at, ts = clock.monotonic(), clock.wall_ms()
            if lifted is not None:  # one reader: the previous tag is gone by now
                session.left(lifted[0], min(lifted[1], at))
            hold = rng.uniform(0.3, 1.5)
            got = [session.arrived(read, ts, at)]
            if rng.random() < _P_BOUNCE:  # lifted and put back at once: the same tap
                session.left(read.uid, at + 0.2)
                again = at + 0.2 + rng.uniform(0.05, 0.3)
                got.append(session.arrived(read, ts + round((again - at) * 1000), again))
            lifted = (read.uid, at + hold)
            for reading in got:
                if reading is not None and (self._limit is None or self._count < self._limit):
                    self._count += 1
                    yield reading

    # -- the tags -------------------------------------------------------------------------

    def _shelf_tags(self, cfg: Nfc) -> list[TagRead]:
        products = [p for p in store_catalogue() if p.code_kind == "gtin"]
        configured = list(cfg.store_tags)
        made = shelf_tag_uids(len(products))
        uids = [configured[i] if i < len(configured) else made[i] for i in range(len(products))]
        rng = random.Random(_TAGS_SEED + 1)
        out = []
        for i, p in enumerate(products):
            lot = f"L{rng.randrange(10**5):05d}" if rng.random() < 0.2 else None
            title = p.name.title() if rng.random() < 0.2 else None
            out.append(TagRead("Type2Tag", bytes.fromhex(uids[i]), shelf_message(p.code, lot, title)))
        return out

    def _card(self, c: Customer, uid: str, number: str) -> TagRead:
        kind = "Type4Tag" if c.tag_type == "Type4" else "Type2Tag"
        return TagRead(kind, bytes.fromhex(uid), loyalty_message(_fit(number, self._rule), self._rule))

    def _next_tag(self) -> TagRead:
        rng = self._rng
        if self._injected:
            return self._injected.pop()
        r = rng.random()
        if r < _P_LOYALTY:
            k = int(rng.random() * len(self._customers))
            if k not in self._cards:
                c = self._customers[k]
                self._cards[k] = self._card(c, c.card_uid, c.loyalty)
            return self._cards[k]
        r -= _P_LOYALTY
        for p, tag_type, ndef, failed in _ODD_TAGS:
            if r < p:
                return TagRead(tag_type, bytes.fromhex(random_nfc_uid(rng)), ndef, ndef_failed=failed)
            r -= p
        rank = bisect.bisect(self._cum_weights, rng.random() * self._cum_weights[-1])
        return self._shelf[self._order[min(rank, len(self._order) - 1)]]
