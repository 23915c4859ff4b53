"""The two privacy stages of the pipeline, plain callables built once.

- `CardScrubStage` runs first: no later stage (nor a log line about a reading) ever sees
  a payment card number. It scrubs `text`, every string (and bytes) value in `data`, and
  drops `ids` of class card_number, and any loyalty number, phone number or e-mail whose
  value is or holds a card number (a card swiped or typed where a loyalty number was
  expected must not be pseudonymized: card numbers are never stored, not even hashed).
  A phone number written with its "+", "00" or trunk "0" prefix is a phone number, never a
  card (no card number starts with 0 or "+"), so ~10 % of them are not lost to Luhn; a
  loyalty number is dropped when its digits are a card number
  (`edge.privacy.cards.is_card_number`: any Luhn-valid 13-19 digits, whatever the issuer
  range, except a valid EAN-13/GTIN-14 that is no certain card: loyalty cards carry
  EAN-13s; docs/privacy.md says which numbers stay doubtful).
- `PrivacyStage` runs last before the buffer: identifiers become pseudonyms (or vanish),
  free text is scrubbed of e-mails and phone numbers, and the result is a `Pending` event,
  safe to store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from edge.events import Ident, IdentClass, Pending, Reading
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.scrub import holds_card, scrub_cards, scrub_text

MAX_DEPTH = 4  # containers nested deeper than this in `data` are replaced, not scanned
TOO_DEEP = "[too-deep]"
_MIN_CARD = 13
_SCALARS = frozenset({int, float, bool, type(None)})
# classes whose raw value people type or present: checked for a card number in disguise
# (BLE addresses and NFC UIDs are hardware hex ids; a 14-digit UID passing Luhn is not a card)
_CARD_CHECKED = frozenset({"loyalty_id", "phone", "email"})


class CardScrubStage:
    """Reading -> Reading with every card number removed.

    `cards_removed` counts card numbers scrubbed from text/data plus card_number idents
    dropped; `too_deep` counts containers replaced because they were nested too deeply
    (they could not be scanned, so they are not passed on).
    """

    def __init__(self) -> None:
        self.cards_removed = 0
        self.too_deep = 0

    def __call__(self, r: Reading) -> Reading:
        text = r.text
        new_text: dict[str, str] | None = None
        if text:
            for k, v in text.items():
                if len(v) >= _MIN_CARD:
                    s, n = scrub_cards(v)
                    if n:
                        if new_text is None:
                            new_text = dict(text)
                        new_text[k] = s
                        self.cards_removed += n
        data = r.data
        new_data = data
        for v in data.values():
            # the common case inline (numbers, short strings); anything else gets a full scan
            t = type(v)
            if t in _SCALARS or (t is str and len(v) < _MIN_CARD):
                continue
            new_data = self._mapping(data, 1)
            break
        ids = r.ids
        new_ids = None
        if ids:
            for ident in ids.values():
                cls = ident.cls  # _is_card inline: this runs for nearly every reading
                if cls == "card_number" or (cls in _CARD_CHECKED and _holds_card(ident)):
                    new_ids = {k: i for k, i in ids.items() if not _is_card(i)}
                    self.cards_removed += len(ids) - len(new_ids)
                    break
        if new_text is None and new_data is data and new_ids is None:
            return r
        return Reading(
            r.src,
            r.type,
            r.ts,
            new_data,
            ids if new_ids is None else new_ids,
            text if new_text is None else new_text,
        )

    def _value(self, v: Any, depth: int) -> Any:
        if type(v) in _SCALARS:  # the common case, without ABC isinstance checks
            return v
        if isinstance(v, str):
            return self._str(v) if len(v) >= _MIN_CARD else v
        if isinstance(v, (bytes, bytearray)):
            return self._bytes(v) if len(v) >= _MIN_CARD else v
        if isinstance(v, (Mapping, list, tuple)):
            return self._container(v, depth)
        return v

    def _str(self, v: str) -> str:
        s, n = scrub_cards(v)
        self.cards_removed += n
        return s

    def _bytes(self, v: bytes | bytearray) -> bytes | bytearray:
        s, n = scrub_cards(bytes(v).decode("latin-1"))
        if not n:
            return v
        self.cards_removed += n
        return s.encode("latin-1")

    def _container(self, v: Mapping[str, Any] | list[Any] | tuple[Any, ...], depth: int) -> Any:
        if depth >= MAX_DEPTH:
            self.too_deep += 1
            return TOO_DEEP
        if isinstance(v, Mapping):
            return self._mapping(v, depth + 1)
        items = [self._value(x, depth + 1) for x in v]
        if all(a is b for a, b in zip(items, v, strict=True)):
            return v
        return items if isinstance(v, list) else tuple(items)

    def _mapping(self, m: Mapping[str, Any], depth: int) -> Mapping[str, Any]:
        out: dict[str, Any] | None = None
        for k, v in m.items():
            nv = self._value(v, depth)
            if nv is not v:
                if out is None:
                    out = dict(m)
                out[k] = nv
        return m if out is None else out


def _is_card(ident: Ident) -> bool:
    cls = ident.cls
    return cls == "card_number" or (cls in _CARD_CHECKED and _holds_card(ident))


def _holds_card(ident: Ident) -> bool:
    raw = ident.raw
    if ident.cls == "phone" and raw.lstrip(" (").startswith(("+", "0")):
        return False
    return holds_card(raw)


class PrivacyStage:
    """Reading -> Pending: pseudonyms in, raw identifiers and contact data out.

    Order of fields in the result: `data`, then scrubbed `text` values under their keys,
    then each identifier's pseudonym under its field name. A dropped identifier removes
    its field (counted in `dropped[cls]`).
    """

    def __init__(self, pz: Pseudonymizer) -> None:
        self._pz = pz
        self._pseudonym = pz.pseudonym
        self.dropped: Counter[IdentClass] = Counter()

    def __call__(self, r: Reading) -> Pending:
        data = dict(r.data)
        text = r.text
        if text:
            pz = self._pz
            for k, v in text.items():
                data[k] = scrub_text(v, pz)
        ids = r.ids
        if ids:
            pseudonym = self._pseudonym
            for field, ident in ids.items():
                p = pseudonym(ident)
                if p is None:
                    data.pop(field, None)
                    self.dropped[ident.cls] += 1
                else:
                    data[field] = p
        return Pending(r.ts, r.src, r.type, data)
