"""The default receipt parser: receipt text -> structured, non-personal fields.

Called by the pipeline's normalize stage on `pos.receipt_text` AFTER card numbers were
scrubbed (they read `[card]`). It extracts only what analytics needs and never copies
free text: item names, addresses, e-mail addresses and phone numbers are not read at all.

    data = {register, receipt_id, total_cents, currency, items, payment}
    items = [{"gtin" | "sku": code, "qty": int | float, "price_cents": int}, ...]
    ids = {"loyalty": Ident("loyalty_id", digits)} when a loyalty line is present

Every key of `data` is always present (None / [] when not found). Recognised lines:
items `<GTIN or [SKU|PLU] code>  <qty> [kg] x <unit price>`, `TOTAL [currency] <amount>`,
`Loyalty|Member|Club [card|no|number|id|#]: <digits>`, `Receipt|Bon|Transaction [no|#]:
<id>`, and a payment scheme (VISA, MASTERCARD, ..., CASH) after the TOTAL line. Garbage
yields empty fields; the parser never raises on any `str`.
"""

from __future__ import annotations

import re
from typing import Any

from drivers.base import gtin_valid, luhn_valid
from edge.events import Ident

MAX_TEXT = 256 * 1024  # longer input is truncated: receipts are a few KiB
MAX_ITEMS = 500

_FLAGS = re.ASCII | re.MULTILINE | re.IGNORECASE
_ITEM = re.compile(
    r"^[ \t]*(?:(?P<kw>SKU|PLU|ART)[ \t]*[:#.]?[ \t]*)?(?P<code>\d[\d-]{2,19}|\[card\])[ \t]+"
    r"(?P<qty>\d{1,6}(?:[.,]\d{1,3})?)[ \t]*(?:kg[ \t]*)?[x*@][ \t]*(?P<price>\d{1,7}[.,]\d{2})(?!\d)",
    _FLAGS,
)
_AMOUNT = r"-?(?:\d{1,3}(?:[,.' ]\d{3})+|\d{1,9})[.,]\d{2}"
_TOTAL = re.compile(rf"^[ \t]*TOTAL\b(?P<mid>[^\n\d]{{0,40}}?)(?P<amt>{_AMOUNT})(?!\d)", _FLAGS)
_CURRENCY = re.compile(
    r"\b(EUR|USD|GBP|CHF|SEK|NOK|DKK|PLN|CZK|HUF|CAD|AUD|NZD|JPY)\b|([\u20ac$\u00a3])", re.I
)
_SYMBOLS = {"\u20ac": "EUR", "$": "USD", "\u00a3": "GBP"}
_LOYALTY = re.compile(
    r"^[ \t]*(?:loyalty|member(?:ship)?|club|payback|bonus)[ \t]*(?:card|no\.?|nr\.?|number|id|#)?"
    r"[ \t]*[:#]?[ \t]*(?P<num>\d(?:[ -]?\d){5,19})(?![\d])",
    _FLAGS,
)
_RECEIPT_ID = re.compile(
    r"^[ \t]*(?:receipt|rcpt|bon|beleg|trans(?:action)?|ticket|invoice)[ \t.-]*(?:no\.?|nr\.?|number|id|#)?"
    r"[ \t]*[:#][ \t]*(?P<id>[A-Z0-9][A-Z0-9/_-]{0,39})",
    _FLAGS,
)
_PAYMENT = re.compile(
    r"\b(VISA|MASTER ?CARD|AMEX|AMERICAN EXPRESS|MAESTRO|GIROCARD|DISCOVER|JCB|DINERS|UNIONPAY"
    r"|DEBIT|CREDIT|CASH)\b|\[card\]",
    _FLAGS,
)
_SCHEME_NAMES = {
    "mastercard": "mastercard",
    "master card": "mastercard",
    "american express": "amex",
    "debit": "card",
    "credit": "card",
    "[card]": "card",
}
_NON_DIGITS = re.compile(r"\D", re.ASCII)


def _looks_like_card(code: str) -> bool:
    digits = _NON_DIGITS.sub("", code)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _cents(amount: str) -> int:
    sign = -1 if amount.startswith("-") else 1
    return sign * int(_NON_DIGITS.sub("", amount))


def _qty(s: str) -> int | float:
    s = s.replace(",", ".")
    return float(s) if "." in s else int(s)


def _items(text: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for m in _ITEM.finditer(text):
        if len(items) >= MAX_ITEMS:
            break
        item: dict[str, Any] = {}
        code, kw = m["code"], m["kw"]
        if code != "[card]":
            if kw is None and gtin_valid(code):
                item["gtin"] = code
            elif not _looks_like_card(code):  # never turn an unscrubbed card number into a SKU
                item["sku"] = code
        item["qty"] = _qty(m["qty"])
        item["price_cents"] = _cents(m["price"])
        items.append(item)
    return items


def _payment(text: str) -> str | None:
    m = _PAYMENT.search(text)
    if m is None:
        return None
    word = " ".join(m[0].lower().split())
    return _SCHEME_NAMES.get(word, word)


def parse_receipt(text: str, register: str) -> tuple[dict[str, Any], dict[str, Ident]]:
    """Structured fields and identifiers of one receipt (see the module docstring)."""
    text = text[:MAX_TEXT]
    data: dict[str, Any] = {
        "register": register,
        "receipt_id": None,
        "total_cents": None,
        "currency": None,
        "items": _items(text),
        "payment": None,
    }
    ids: dict[str, Ident] = {}

    total = _TOTAL.search(text)
    if total is not None:
        data["total_cents"] = _cents(total["amt"])
        cur = _CURRENCY.search(total["mid"])
        if cur is not None:
            data["currency"] = cur[1].upper() if cur[1] else _SYMBOLS[cur[2]]
    data["payment"] = _payment(text[total.end() :] if total is not None else text)

    rid = _RECEIPT_ID.search(text)
    if rid is not None and any(ch.isdigit() for ch in rid["id"]) and not _looks_like_card(rid["id"]):
        data["receipt_id"] = rid["id"]

    loyalty = _LOYALTY.search(text)
    if loyalty is not None:
        ids["loyalty"] = Ident("loyalty_id", _NON_DIGITS.sub("", loyalty["num"]))
    return data, ids
