"""Receipt parsing: receipt text (or a JSON receipt) -> structured, non-personal fields.

Called by the pipeline's normalize stage on `pos.receipt_text` AFTER card numbers were
scrubbed (they read `[card]`). It extracts only what analytics needs and never copies
free text: item names, addresses, e-mail addresses and phone numbers are not read at all.

    data = {register, receipt_id, total_cents, currency, items, payment}
    items = [{"gtin" | "sku": code, "qty": int | float, "price_cents": int}, ...]
    ids = {"loyalty": Ident("loyalty_id", digits)} when a loyalty line is present

Every key of `data` is always present (None / [] when not found). What is recognised is
configurable per link with regular expressions (`drivers.pos[].receipt`, see
`drivers.pos.config.ReceiptRules`); the defaults read a typical receipt: items
`<GTIN or [SKU|PLU|ART] code>  <qty> [kg] x <unit price>`, `TOTAL [currency] <amount>`,
`Loyalty|Member|Club [card|no|number|id|#]: <digits>`, `Receipt|Bon|Transaction [no|#]:
<id>`, and a payment scheme (VISA, MASTERCARD, ..., CASH) after the TOTAL line.

Whatever the rules match, the output is sanitized: a code is a GTIN only with a valid
check digit, a Luhn-valid 13-19 digit run never becomes a SKU or receipt id (defence in
depth, should a card number slip past the scrubber), payment is a short lowercase word,
currency an ISO code. Garbage yields empty fields; the parser never raises on any `str`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from drivers.base import gtin_valid, luhn_valid
from drivers.pos.config import PosLink, ReceiptRules, compile_rule
from edge.events import Ident

MAX_TEXT = 256 * 1024  # longer input is truncated: receipts are a few KiB
MAX_ITEMS = 500

_NON_DIGITS = re.compile(r"\D", re.ASCII)
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9./_-]{0,39}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9/_-]{0,39}$")
_METHOD = re.compile(r"^[a-z][a-z_]{0,19}$")
_ISO = re.compile(r"^[A-Z]{3}$")
_CENTS = re.compile(r"[.,](\d{2})$")
_MAX_QTY = 1_000_000


def looks_like_card(code: str) -> bool:
    """13-19 digits (ignoring separators) passing the Luhn check."""
    digits = _NON_DIGITS.sub("", code)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def cents(amount: str) -> int | None:
    """`1.234,97` -> 123497, `-0.50` -> -50, `12` -> 1200 (no decimals: whole units)."""
    amount = amount.strip()
    sign = -1 if amount.startswith("-") else 1
    digits = _NON_DIGITS.sub("", amount)
    if not digits or len(digits) > 12:
        return None
    value = int(digits) if _CENTS.search(amount) else int(digits) * 100
    return sign * value


def _qty(s: str | None) -> int | float | None:
    if s is None:
        return 1
    s = s.strip().replace(",", ".")
    try:
        q: int | float = float(s) if "." in s else int(s)
    except ValueError:
        return None
    return q if 0 <= q < _MAX_QTY else None


def _group(m: re.Match[str], name: str) -> str | None:
    """A named group's text, or None when the rule has no such group or it did not take part."""
    return m.groupdict().get(name)


class ReceiptParser:
    """Parses receipts with one link's compiled rules; build once, call per receipt."""

    def __init__(self, rules: ReceiptRules | None = None) -> None:
        r = rules if rules is not None else ReceiptRules()
        self._item = compile_rule("item", r.item)
        self._total = compile_rule("total", r.total)
        self._currency = compile_rule("currency", r.currency)
        self._loyalty = compile_rule("loyalty", r.loyalty)
        self._receipt_id = compile_rule("receipt_id", r.receipt_id)
        self._payment = compile_rule("payment", r.payment)
        self._symbols = dict(r.currency_symbols)
        self._currency_default = r.currency_default
        self._names = {" ".join(k.lower().split()): v for k, v in r.payment_names.items()}

    def __call__(self, text: str, register: str) -> tuple[dict[str, Any], dict[str, Ident]]:
        """Structured fields and identifiers of one receipt (see the module docstring)."""
        text = text[:MAX_TEXT]
        data: dict[str, Any] = {
            "register": register,
            "receipt_id": None,
            "total_cents": None,
            "currency": None,
            "items": self._items(text),
            "payment": None,
        }
        ids: dict[str, Ident] = {}
        total = self._total.search(text)
        if total is not None:
            data["total_cents"] = cents(total["amount"])
            data["currency"] = self._currency_of(total[0])
        if data["currency"] is None and data["total_cents"] is not None:
            data["currency"] = self._currency_default
        data["payment"] = self.payment(text[total.end() :] if total is not None else text)
        rid = self._receipt_id.search(text)
        if rid is not None:
            data["receipt_id"] = self.receipt_id(rid["id"])
        loyalty = self._loyalty.search(text)
        if loyalty is not None:
            number = self.loyalty_number(loyalty["number"])
            if number is not None:
                ids["loyalty"] = Ident("loyalty_id", number)
        return data, ids

    # -- field helpers (also used for JSON receipts) --------------------------------------

    def _items(self, text: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for m in self._item.finditer(text):
            if len(items) >= MAX_ITEMS:
                break
            item = self.item(_group(m, "code"), _group(m, "qty"), cents(m["price"]), sku=bool(_group(m, "kw")))
            if item is not None:
                items.append(item)
        return items

    @staticmethod
    def item(code: str | None, qty: str | None, price_cents: int | None, *, sku: bool = False) -> dict[str, Any] | None:
        """One item, or None when quantity or price are unreadable. A code that is a
        scrubbed card, looks like a card number or has odd characters is left out."""
        q, p = _qty(qty), price_cents
        if q is None or p is None:
            return None
        item: dict[str, Any] = {}
        code = (code or "").strip()
        if code and _CODE.match(code):
            if not sku and gtin_valid(code):  # a GTIN first: product codes can pass Luhn too
                item["gtin"] = code
            elif not looks_like_card(code):
                item["sku"] = code
        item["qty"] = q
        item["price_cents"] = p
        return item

    def _currency_of(self, s: str) -> str | None:
        m = self._currency.search(s)
        if m is None:
            return None
        found = _group(m, "code") or m[0]
        code = self._symbols.get(found, found.upper())
        return code if _ISO.match(code) else None

    def payment(self, s: str) -> str | None:
        """The payment method the `payment` rule finds in `s`, as a short lowercase word."""
        m = self._payment.search(s)
        if m is None:
            return None
        word = " ".join((_group(m, "method") or m[0]).lower().split())
        name = self._names.get(word, word)
        return name if _METHOD.match(name) else None

    @staticmethod
    def receipt_id(s: str) -> str | None:
        s = s.strip()
        ok = _ID.match(s) and any(ch.isdigit() for ch in s) and not looks_like_card(s)
        return s if ok else None

    @staticmethod
    def loyalty_number(s: str) -> str | None:
        digits = _NON_DIGITS.sub("", s)
        return digits if 6 <= len(digits) <= 20 else None

    def from_json(self, obj: Mapping[str, Any], register: str) -> tuple[dict[str, Any], dict[str, Ident]]:
        """A structured receipt from a jsonl link, whitelisted field by field:
        {receipt_id, total_cents | total, currency, items: [{gtin | sku | code, qty,
        price_cents | price}], payment, loyalty}. Other keys are ignored; a field of the
        wrong type is left empty. Never raises on any JSON object."""
        data: dict[str, Any] = {
            "register": register,
            "receipt_id": None,
            "total_cents": _json_cents(obj, "total_cents", "total"),
            "currency": None,
            "items": [],
            "payment": None,
        }
        ids: dict[str, Ident] = {}
        rid, cur, pay, loyalty = (obj.get(k) for k in ("receipt_id", "currency", "payment", "loyalty"))
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            data["receipt_id"] = self.receipt_id(str(rid)[:64])
        if isinstance(cur, str):
            data["currency"] = self._currency_of(cur[:16])
        if data["currency"] is None and data["total_cents"] is not None:
            data["currency"] = self._currency_default
        if isinstance(pay, str):
            data["payment"] = self.payment(pay[:64])
        if isinstance(loyalty, str | int) and not isinstance(loyalty, bool):
            number = self.loyalty_number(str(loyalty)[:64])
            if number is not None:
                ids["loyalty"] = Ident("loyalty_id", number)
        items = obj.get("items")
        if isinstance(items, list):
            for raw in items[:MAX_ITEMS]:
                item = _json_item(raw) if isinstance(raw, dict) else None
                if item is not None:
                    data["items"].append(item)
        return data, ids


def _json_cents(obj: Mapping[str, Any], cents_key: str, amount_key: str) -> int | None:
    v = obj.get(cents_key)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**12:
        return v
    a = obj.get(amount_key)
    if isinstance(a, int | float) and not isinstance(a, bool) and abs(a) < 10**10:  # NaN and inf fail
        return round(a * 100)
    if isinstance(a, str):
        return cents(a[:32])
    return None


def _json_item(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    qty = raw.get("qty", 1)
    if isinstance(qty, bool) or not isinstance(qty, int | float | str):
        return None
    code, kind = None, None
    for key in ("gtin", "sku", "code"):
        v = raw.get(key)
        if isinstance(v, str | int) and not isinstance(v, bool):
            code, kind = str(v)[:64], key
            break
    price = _json_cents(raw, "price_cents", "price")
    return ReceiptParser.item(code, str(qty)[:16], price, sku=kind == "sku")


@cache
def _default_parser() -> ReceiptParser:
    return ReceiptParser()


def parse_receipt(
    text: str, register: str, parser: ReceiptParser | None = None
) -> tuple[dict[str, Any], dict[str, Ident]]:
    """Structured fields and identifiers of one receipt (see the module docstring), with
    `parser`'s rules or the default ones."""
    return (parser or _default_parser())(text, register)


def receipt_parsers(links: Iterable[PosLink]) -> dict[str, ReceiptParser]:
    """One parser per POS link, keyed by link name (= the `register` of its readings)."""
    return {link.name: ReceiptParser(link.receipt) for link in links}
