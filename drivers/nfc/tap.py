"""From what the reader saw to an `nfc.tap` reading: debounce, NDEF, rules (no I/O).

    {kind: product | loyalty | unknown, tag_type: "Type2", ndef: ok | empty | none |
     invalid | unreadable, records: [{type, ...shape}], rule?: <rule name>,
     gtin?, batch?, serial?   (a GS1 Digital Link on a product tap)
     gs1?: "invalid"          (a Digital Link-shaped URI failed its checks)
     tag?: <label>}           (a configured store tag: infrastructure, its UID is not personal)
    ids: card -> Ident(nfc_uid, UID hex) unless a store tag; loyalty -> Ident(loyalty_id, number)

Malformed NDEF and invalid Digital Links are counted and logged (reason and size only)
and the tap is still emitted: someone did tap something.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog

from drivers.nfc.config import Nfc
from drivers.nfc.ndef import NdefError, NdefRecord, parse_ndef
from drivers.nfc.rules import Classifier
from edge.events import Ident, Reading

MAX_SUMMARIES = 16  # records described in one event


@dataclass(slots=True, frozen=True)
class TagRead:
    """What the reader thread saw on one activation. Raw: kept in memory only."""

    tag_type: str  # nfcpy's name: Type1Tag .. Type4Tag
    uid: bytes
    ndef: bytes | None  # the NDEF message; None when the tag has no NDEF area
    ndef_failed: bool = False  # reading the NDEF area failed (tag moved away mid-read, garbage)

    def __repr__(self) -> str:
        return f"TagRead({self.tag_type}, uid=<redacted>, ndef={'?' if self.ndef is None else len(self.ndef)})"


class Debouncer:
    """A tag resting on the reader is one tap; back within `interval` seconds after it
    left (a flaky presence check, a hesitant hand) is still the same tap; later, a new one.

    Holds UIDs in memory only, at most `max_tags` of them (the oldest are forgotten).
    """

    def __init__(self, interval: float, max_tags: int = 4096) -> None:
        self._interval = interval
        self._max = max_tags
        self._present: set[bytes] = set()
        self._left: dict[bytes, float] = {}

    @property
    def resting(self) -> int:
        """Tags on the reader right now."""
        return len(self._present)

    def arrived(self, uid: bytes, now: float) -> bool:
        """True when this activation is a new tap."""
        if uid in self._present:
            return False
        self._present.add(uid)
        left = self._left.pop(uid, None)
        return left is None or now - left >= self._interval

    def left(self, uid: bytes, now: float) -> None:
        self._present.discard(uid)
        self._left[uid] = now
        if len(self._left) > self._max:
            for k in [k for k, t in self._left.items() if now - t >= self._interval]:
                del self._left[k]
            while len(self._left) > self._max:
                del self._left[next(iter(self._left))]

    def reader_restarted(self, now: float) -> None:
        """The reader went away: tags that were on it count as lifted now."""
        for uid in list(self._present):
            self.left(uid, now)


class TapBuilder:
    """Builds `nfc.tap` readings; `counters`: taps, ndef_rejected, gs1_rejected, ndef_unreadable."""

    def __init__(self, cfg: Nfc) -> None:
        self._store_tags = dict(cfg.store_tags)
        self._classifier = Classifier(cfg.rules)
        self.counters: Counter[str] = Counter()

    def build(self, read: TagRead, ts: int) -> Reading:
        log = structlog.get_logger()
        records: tuple[NdefRecord, ...] = ()
        if read.ndef_failed:
            state = "unreadable"
            self.counters["ndef_unreadable"] += 1
            log.warning("nfc_ndef_unreadable", tag_type=read.tag_type)
        elif read.ndef is None:
            state = "none"
        else:
            try:
                records = parse_ndef(read.ndef)
                state = "ok" if records else "empty"
            except NdefError as exc:
                state = "invalid"
                self.counters["ndef_rejected"] += 1
                log.warning("nfc_ndef_rejected", reason=exc.reason, bytes=len(read.ndef), tag_type=read.tag_type)
        found = self._classifier.classify(records)
        if found.gs1_error is not None:
            self.counters["gs1_rejected"] += 1
            log.warning("nfc_gs1_rejected", reason=found.gs1_error)
        data: dict[str, Any] = {
            "kind": found.kind,
            "tag_type": read.tag_type.removesuffix("Tag"),
            "ndef": state,
            "records": [r.summary() for r in records[:MAX_SUMMARIES]],
        }
        if found.rule is not None:
            data["rule"] = found.rule
        data.update(found.data)
        if found.gs1_error is not None and "gtin" not in data:
            data["gs1"] = "invalid"
        ids: dict[str, Ident] = {}
        uid = read.uid.hex().upper()
        label = self._store_tags.get(uid)
        if label is not None:
            data["tag"] = label
        elif uid:
            ids["card"] = Ident("nfc_uid", uid)
        if found.loyalty is not None:
            ids["loyalty"] = Ident("loyalty_id", found.loyalty)
        self.counters["taps"] += 1
        return Reading(src="nfc", type="nfc.tap", ts=ts, data=data, ids=ids)


class TapSession:
    """What a backend does with what its reader saw: `arrived()` per activation (a reading,
    or None when debounced), `left()` when the tag is gone, `restarted()` when the reader
    was reopened. The nfcpy backend and the sim backend both run this."""

    def __init__(self, cfg: Nfc) -> None:
        self.builder = TapBuilder(cfg)
        self.debounce = Debouncer(cfg.debounce)
        self.debounced = 0

    def arrived(self, read: TagRead, ts: int, at: float) -> Reading | None:
        if not self.debounce.arrived(read.uid, at):
            self.debounced += 1
            return None
        return self.builder.build(read, ts)

    def left(self, uid: bytes, at: float) -> None:
        self.debounce.left(uid, at)

    def restarted(self, now: float) -> None:
        self.debounce.reader_restarted(now)

    def stats(self) -> dict[str, int]:
        """Tags resting on the reader now, taps, debounced, rejections (no identifiers)."""
        c = self.builder.counters
        return {
            "resting": self.debounce.resting,
            "taps": c["taps"],
            "debounced": self.debounced,
            "ndef_rejected": c["ndef_rejected"],
            "ndef_unreadable": c["ndef_unreadable"],
            "gs1_rejected": c["gs1_rejected"],
        }
