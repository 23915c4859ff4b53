"""Simulated POS link: receipts as synthetic serial bytes through the real link path.

One `PosSim` per configured link (register). Each receipt is composed as text, encoded
as the bytes the link's `framing` carries, fed in random chunks (as reads off a serial
port come) to the same `LinkDecoder` as the serial backend (framer, bad-input counts,
frame -> reading), so readings are exactly the serial backend's:
`Reading(src="pos", type="pos.receipt_text", data={"register": <link name>},
text={"receipt": <receipt text>})`. The bytes per framing:

- lines: the text's lines, each ended by `terminator`, then a form feed;
- stx_etx: STX, the text, ETX, LRC (replies, with `ack`, go nowhere);
- escpos: ESC @, ESC t 0, the header centred and bold (ESC a, ESC E), the lines with LF,
  a paper cut (GS V 66 0);
- jsonl: one JSON object per line, `{"receipt": <text>}`.

A receipt has a store header, the register and receipt number, item pairs (a name line,
then `<GTIN or "SKU nnnn">  <qty> x <price>  <line total>`), SUBTOTAL/TOTAL, VAT, often a
`Loyalty: <12 digits>` line, and a payment: cash, or a card scheme with a masked PAN
(`VISA ************1234`). Like real, misconfigured printers, now and then (~5 %) it
prints the full Luhn-valid card number instead, and sometimes an e-mail address
(`Receipt sent to ...`, ~5 %) or a phone number (`Delivery contact: ...`, ~3 %). Those are
what the pipeline's scrubbers must catch.
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from drivers.base import (
    Product,
    SimPacer,
    Sleep,
    classify_injected,
    customer_pool,
    store_catalogue,
)
from drivers.pos.config import PosLink
from drivers.pos.framing import lrc
from drivers.pos.link import LinkDecoder
from edge.clock import Clock
from edge.events import Reading
from edge.privacy.cards import luhn_complete

WIDTH = 42
_P_LOYALTY = 0.4
_P_CASH = 0.25
_P_FULL_PAN = 0.05
_P_EMAIL = 0.05
_P_PHONE = 0.03
_SCHEMES = (("VISA", 45), ("MASTERCARD", 35), ("MAESTRO", 10), ("AMEX", 5), ("GIROCARD", 5))
_FIRST = ("jane", "john", "maria", "li", "amir", "sofia", "lukas", "emma", "noah", "fatima")
_LAST = ("doe", "smith", "muller", "garcia", "chen", "khan", "rossi", "novak", "berg", "silva")
_DOMAINS = ("example.com", "example.org", "example.net", "mail.example")


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _row(left: str, right: str) -> str:
    return f"{left:<{WIDTH - len(right) - 1}} {right}"


def _scheme_of(pan: str) -> str:
    if pan.startswith("4"):
        return "VISA"
    if pan.startswith(("34", "37")):
        return "AMEX"
    if pan.startswith(("51", "52", "53", "54", "55", "22", "23", "24", "25", "26", "27")):
        return "MASTERCARD"
    return "CARD"


def random_pan(rng: random.Random, scheme: str) -> str:
    """A Luhn-valid card number of the scheme's usual shape (test-card style)."""
    if scheme == "AMEX":
        body = rng.choice(("34", "37")) + "".join(str(rng.randrange(10)) for _ in range(12))
    elif scheme == "MASTERCARD":
        body = f"5{rng.randint(1, 5)}" + "".join(str(rng.randrange(10)) for _ in range(13))
    elif scheme == "VISA":
        body = "4" + "".join(str(rng.randrange(10)) for _ in range(14))
    else:  # maestro / girocard-style debit
        body = "6759" + "".join(str(rng.randrange(10)) for _ in range(11))
    return luhn_complete(body)


def encode_receipt(link: PosLink, text: str) -> bytes:
    """A receipt's text as the bytes `link.framing` carries (see the module docstring)."""
    enc = link.text_encoding
    term = link.terminator.encode("ascii")
    if link.framing == "lines":
        return b"".join(line.encode(enc, "replace") + term for line in text.split("\n")) + b"\f"
    if link.framing == "stx_etx":
        body = text.encode(enc, "replace")
        return b"\x02" + body + b"\x03" + bytes([lrc(body)])
    if link.framing == "jsonl":
        return json.dumps({"receipt": text}).encode() + term
    lines = text.split("\n")
    out = bytearray(b"\x1b@\x1bt\x00\x1ba\x01\x1bE\x01")
    header = next((i for i, ln in enumerate(lines) if not ln.strip()), 0)
    for i, line in enumerate(lines):
        if i == header:
            out += b"\x1bE\x00\x1ba\x00"  # header done: plain, left-aligned
        out += line.strip().encode(enc, "replace") if i < header else line.encode(enc, "replace")
        out += b"\n"
    out += b"\x1dVB\x00"  # feed and cut
    return bytes(out)


class PosSim:
    """Simulated POS backend for one link (see the module docstring for what it yields).

    `inject`: raw identifiers for the leak test (see `drivers.base.classify_injected`).
    The k-th receipt (k = 1, 2, ...) contains the k-th injected card number (printed in
    full on the payment line, verbatim), e-mail (`Receipt sent to <email>`), phone
    (`Delivery contact: <phone>`) and loyalty number (`Loyalty: <number>`), for as long as
    any class still has injected values. `limit`: stop after that many readings.
    """

    name = "sim"

    def __init__(
        self,
        link: PosLink,
        clock: Clock,
        *,
        inject: Sequence[str] | None = None,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        seed = link.sim.seed
        # the same seed on two links must still give two different tills
        self._rng = random.Random(None if seed is None else seed ^ zlib.crc32(link.name.encode()))
        self._link = link
        self._clock = clock
        self._limit = limit
        self._count = 0
        self._pacer = SimPacer(link.sim.rate, clock, sleep, self._rng)
        self._chunks = random.Random(self._rng.getrandbits(64))  # own stream: chunking changes no receipt
        self._decoder = LinkDecoder(link, clock)
        digits = "".join(ch for ch in link.name if ch.isdigit())
        self._register_no = int(digits[-2:]) if digits else zlib.crc32(link.name.encode()) % 90 + 1
        self._receipt_no = self._rng.randrange(1, 5000)
        self._store_no = random.Random(0x5704E).randrange(1, 9999)
        self._catalogue = store_catalogue()
        self._customers = customer_pool()
        inj = classify_injected(inject)
        self._inj_card: deque[str] = inj["card_number"]
        self._inj_email: deque[str] = inj["email"]
        self._inj_phone: deque[str] = inj["phone"]
        self._inj_loyalty: deque[str] = inj["loyalty_id"]

    async def open(self) -> None:
        """Nothing to open: the simulated till is always there."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def status(self) -> dict[str, Any]:
        """The serial backend's status keys (no content)."""
        return {"problems": dict(self._decoder.problems), "port_open": True,
                "buffered": self._decoder.framer.buffered, "queued": len(self._decoder.frames)}

    async def readings(self) -> AsyncIterator[Reading]:
        pacer, dec = self._pacer, self._decoder
        while self._limit is None or self._count < self._limit:
            delay = pacer.next_delay()
            if delay is not None:
                await pacer.sleep(delay)
            data = self.wire(self._clock.wall_ms())
            i = 0
            while i < len(data):  # reads off a port come in chunks of any size
                n = self._chunks.randint(1, 512)
                dec.feed(data[i : i + n])
                i += n
            while dec.frames and (self._limit is None or self._count < self._limit):
                reading = dec.reading(dec.frames.popleft())
                if reading is not None:
                    self._count += 1
                    yield reading

    def wire(self, ts: int) -> bytes:
        """The bytes of the next receipt, printed at wall time `ts` (ms), in the link's framing."""
        return encode_receipt(self._link, self.compose(ts))

    def compose(self, ts: int) -> str:
        """One receipt's text, printed at wall time `ts` (ms)."""
        rng = self._rng
        self._receipt_no += 1
        when = datetime.fromtimestamp(ts / 1000, tz=UTC)
        lines = [
            "FRESHMART".center(WIDTH),
            f"Store #{self._store_no:04d}".center(WIDTH),
            "12 Market Street, Springfield".center(WIDTH),
            "Tel 0800 555 0100".center(WIDTH),
            "",
            _row(f"Register: {self._link.name}", f"Cashier: {rng.randint(1, 40):02d}"),
            f"Receipt: {self._store_no:04d}-{self._register_no:02d}-{self._receipt_no:06d}",
            f"{when:%Y-%m-%d %H:%M:%S}",
            "-" * WIDTH,
        ]
        total = 0
        n_items = min(40, 1 + int(rng.expovariate(1 / 5.0)))
        for _ in range(n_items):
            p = rng.choice(self._catalogue)
            item_lines, cents = self._item(p)
            lines.extend(item_lines)
            total += cents
        lines += [
            "-" * WIDTH,
            _row("SUBTOTAL", _money(total)),
            _row("TOTAL EUR", _money(total)),
            _row("  incl. VAT 7%", _money(total * 7 // 107)),
        ]
        loyalty = self._inj_loyalty.popleft() if self._inj_loyalty else None
        if loyalty is None and rng.random() < _P_LOYALTY:
            loyalty = rng.choice(self._customers).loyalty
        if loyalty is not None:
            lines += [f"Loyalty: {loyalty}", f"Points earned: {total // 100}"]
        lines += self._payment(total)
        email = self._inj_email.popleft() if self._inj_email else None
        if email is None and rng.random() < _P_EMAIL:
            email = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}@{rng.choice(_DOMAINS)}"
        if email is not None:
            lines.append(f"Receipt sent to {email}")
        phone = self._inj_phone.popleft() if self._inj_phone else None
        if phone is None and rng.random() < _P_PHONE:
            phone = rng.choice(
                (
                    f"+44 7700 900{rng.randrange(1000):03d}",
                    f"+1 555-01{rng.randrange(100):02d}",
                    f"+49 151 {rng.randrange(10**8):08d}",
                )
            )
        if phone is not None:
            lines.append(f"Delivery contact: {phone}")
        lines += ["", "Thank you for shopping with us!".center(WIDTH), ""]
        return "\n".join(lines)

    def _item(self, p: Product) -> tuple[list[str], int]:
        rng = self._rng
        code = p.code if p.code_kind == "gtin" else f"SKU {p.code}"
        if p.by_weight:
            grams = rng.randint(150, 2500)
            cents = (grams * p.price_cents + 500) // 1000
            qty = f"{grams // 1000}.{grams % 1000:03d} kg"
        else:
            n = 1 if rng.random() < 0.8 else rng.randint(2, 4)
            cents = n * p.price_cents
            qty = str(n)
        return [p.name, _row(f"  {code:<14}{qty:>9} x {_money(p.price_cents):>6}", _money(cents))], cents

    def _payment(self, total: int) -> list[str]:
        rng = self._rng
        pan = self._inj_card.popleft() if self._inj_card else None
        if pan is None and rng.random() < _P_CASH:
            given = -(-total // 500) * 500  # rounded up to the next 5.00
            return [_row("CASH", _money(given)), _row("CHANGE", _money(given - total))]
        names = [s for s, _ in _SCHEMES]
        scheme = rng.choices(names, weights=[w for _, w in _SCHEMES])[0] if pan is None else _scheme_of(pan)
        if pan is None and rng.random() < _P_FULL_PAN:
            pan = random_pan(rng, scheme)
            if rng.random() < 0.5:
                pan = " ".join(pan[i : i + 4] for i in range(0, len(pan), 4))
        if pan is not None:
            card = f"{scheme} {pan}"
        else:
            stars = 11 if scheme == "AMEX" else 12
            card = f"{scheme} {'*' * stars}{rng.randrange(10000):04d}"
        return [
            _row(card, _money(total)),
            "CONTACTLESS" if rng.random() < 0.8 else "CHIP & PIN",
            f"AUTH CODE {rng.randrange(10**6):06d}",
        ]
