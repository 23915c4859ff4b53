"""Configuration of one POS serial link (an entry of `drivers.pos` in the YAML).

A link is a serial line (port and line settings), a framing (how bytes become messages)
and the receipt rules (how a receipt's text becomes structured fields, applied by the
pipeline after card numbers were scrubbed). Regular expressions are compiled here, so a
typo is a config error with its position, not a crash at the first receipt.
"""

from __future__ import annotations

import codecs
import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from edge.configbase import Model, SimRate, SpecId
from edge.units import Duration, Size

# every receipt rule is compiled with these flags: \d, \w, \s and \b match ASCII only
RULE_FLAGS = re.ASCII | re.MULTILINE | re.IGNORECASE

_AMOUNT = r"-?(?:\d{1,3}(?:[,.' ]\d{3})+|\d{1,9})[.,]\d{2}"
DEFAULT_ITEM = (
    r"^[ \t]*(?:(?P<kw>SKU|PLU|ART)[ \t]*[:#.]?[ \t]*)?(?P<code>\d[\d-]{2,19}|\[card\])[ \t]+"
    r"(?P<qty>\d{1,6}(?:[.,]\d{1,3})?)[ \t]*(?:kg[ \t]*)?[x*@][ \t]*(?P<price>\d{1,7}[.,]\d{2})(?!\d)"
)
DEFAULT_TOTAL = rf"^[ \t]*TOTAL\b[^\n\d]{{0,40}}?(?P<amount>{_AMOUNT})(?!\d)"
DEFAULT_CURRENCY = r"\b(?P<code>EUR|USD|GBP|CHF|SEK|NOK|DKK|PLN|CZK|HUF|CAD|AUD|NZD|JPY)\b|[\u20ac$\u00a3]"
DEFAULT_LOYALTY = (
    r"^[ \t]*(?:loyalty|member(?:ship)?|club|payback|bonus)[ \t]*(?:card|no\.?|nr\.?|number|id|#)?"
    r"[ \t]*[:#]?[ \t]*(?P<number>\d(?:[ -]?\d){5,19})(?!\d)"
)
DEFAULT_RECEIPT_ID = (
    r"^[ \t]*(?:receipt|rcpt|bon|beleg|trans(?:action)?|ticket|invoice)[ \t.-]*(?:no\.?|nr\.?|number|id|#)?"
    r"[ \t]*[:#][ \t]*(?P<id>[A-Z0-9][A-Z0-9/_-]{0,39})"
)
DEFAULT_PAYMENT = (
    r"\b(?:VISA|MASTER ?CARD|AMEX|AMERICAN EXPRESS|MAESTRO|GIROCARD|DISCOVER|JCB|DINERS|UNIONPAY"
    r"|DEBIT|CREDIT|CASH)\b|\[card\]"
)
DEFAULT_PAYMENT_NAMES = {
    "mastercard": "mastercard",
    "master card": "mastercard",
    "american express": "amex",
    "debit": "card",
    "credit": "card",
    "[card]": "card",
}
DEFAULT_CURRENCY_SYMBOLS = {"\u20ac": "EUR", "$": "USD", "\u00a3": "GBP"}

# the named groups each rule must / may have
RULE_GROUPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "item": (frozenset({"price"}), frozenset({"code", "qty", "kw"})),
    "total": (frozenset({"amount"}), frozenset()),
    "currency": (frozenset(), frozenset({"code"})),
    "loyalty": (frozenset({"number"}), frozenset()),
    "receipt_id": (frozenset({"id"}), frozenset()),
    "payment": (frozenset(), frozenset({"method"})),
}
_PAYMENT_NAME = re.compile(r"^[a-z][a-z_]{0,19}$")
_ISO_CURRENCY = re.compile(r"^[A-Z]{3}$")

Framing = Literal["lines", "stx_etx", "escpos", "jsonl"]
FRAMING_ENCODING: dict[str, str] = {"lines": "utf-8", "stx_etx": "utf-8", "escpos": "cp437", "jsonl": "utf-8"}


def compile_rule(field: str, pattern: str) -> re.Pattern[str]:
    """Compile one receipt rule; ValueError names the problem (never a receipt's text)."""
    try:
        rx = re.compile(pattern, RULE_FLAGS)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    required, optional = RULE_GROUPS[field]
    groups = set(rx.groupindex)
    if missing := required - groups:
        raise ValueError(f"needs the named group(s) {', '.join(sorted(missing))}, e.g. (?P<{min(missing)}>...)")
    if unknown := groups - required - optional:
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise ValueError(f"unknown named group(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
    return rx


class ReceiptRules(Model):
    """How receipt text becomes `pos.receipt` fields: one regular expression per field.

    Rules are compiled with IGNORECASE, MULTILINE and ASCII (\\d is 0-9 only). Named groups:
    item: price (required), code, qty (default 1), kw (when it matched, the code is a SKU
    even if it looks like a GTIN); total: amount; currency (searched in the total's match):
    code, else the whole match, mapped by currency_symbols; loyalty: number; receipt_id: id;
    payment (searched after the total): method, else the whole match, mapped by
    payment_names.
    """

    item: str = DEFAULT_ITEM
    total: str = DEFAULT_TOTAL
    currency: str = DEFAULT_CURRENCY
    currency_symbols: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CURRENCY_SYMBOLS))
    currency_default: str | None = None
    loyalty: str = DEFAULT_LOYALTY
    receipt_id: str = DEFAULT_RECEIPT_ID
    payment: str = DEFAULT_PAYMENT
    payment_names: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PAYMENT_NAMES))

    @field_validator("item", "total", "currency", "loyalty", "receipt_id", "payment")
    @classmethod
    def _compiles(cls, v: str, info: ValidationInfo) -> str:
        compile_rule(str(info.field_name), v)
        return v

    @field_validator("currency_symbols")
    @classmethod
    def _iso_codes(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k, code in v.items() if not _ISO_CURRENCY.match(code)]
        if bad:
            raise ValueError("values must be ISO 4217 codes such as EUR (three capital letters)")
        return v

    @field_validator("currency_default")
    @classmethod
    def _iso_default(cls, v: str | None) -> str | None:
        if v is not None and not _ISO_CURRENCY.match(v):
            raise ValueError("must be an ISO 4217 code such as EUR (three capital letters), or null")
        return v

    @field_validator("payment_names")
    @classmethod
    def _method_names(cls, v: dict[str, str]) -> dict[str, str]:
        if any(not _PAYMENT_NAME.match(name) for name in v.values()):
            raise ValueError("values must be lowercase method names such as visa, card or cash (a-z, _)")
        return v


class PosLink(Model):
    name: SpecId
    backend: Literal["sim", "serial"] = "sim"
    port: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = 1
    flow_control: Literal["none", "rtscts", "dsrdtr", "xonxoff"] = "none"
    framing: Framing = "lines"
    encoding: str | None = None  # None: the framing's usual one (FRAMING_ENCODING)
    terminator: str = "\n"
    max_frame: Size = 64 * 1024
    ack: bool = False
    receipt_end: str | None = None
    receipt_gap: Duration | None = None
    receipt: ReceiptRules = Field(default_factory=ReceiptRules)
    sim: SimRate = Field(default_factory=lambda: SimRate(rate=0.2))

    @field_validator("encoding")
    @classmethod
    def _ascii_compatible(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            info = codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r} (e.g. utf-8, cp437, cp858, latin-1)") from None
        probe = "\n\r TOTAL 0123456789.,:{}\"[]"
        if not getattr(info, "_is_text_encoding", True) or probe.encode(v, "replace") != probe.encode("ascii"):
            raise ValueError(f"encoding {v!r} is not ASCII-compatible; framing needs one (utf-8, cp437, ...)")
        return info.name

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, v: float) -> float:
        if v not in (1, 1.5, 2):
            raise ValueError("must be 1, 1.5 or 2")
        return v

    @field_validator("terminator")
    @classmethod
    def _short_ascii(cls, v: str) -> str:
        if not 1 <= len(v) <= 4 or not v.isascii():
            raise ValueError('must be 1 to 4 ASCII characters, e.g. "\\n" or "\\r\\n" (double-quoted in YAML)')
        return v

    @field_validator("max_frame")
    @classmethod
    def _frame_bounds(cls, v: int) -> int:
        if not 64 <= v <= 16 * 1024 * 1024:
            raise ValueError("must be between 64B and 16MiB")
        return v

    @field_validator("receipt_end")
    @classmethod
    def _end_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v, RULE_FLAGS)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PosLink:
        if self.backend == "serial" and not self.port:
            raise ValueError("backend serial needs port (e.g. /dev/serial/by-id/usb-FTDI_...)")
        if self.ack and self.framing != "stx_etx":
            raise ValueError("ack applies to framing stx_etx only (a tap must never talk on the line)")
        if self.receipt_end is not None and self.framing != "lines":
            raise ValueError("receipt_end applies to framing lines only")
        return self

    @property
    def text_encoding(self) -> str:
        """The encoding in effect: `encoding`, or the framing's usual one."""
        return self.encoding or FRAMING_ENCODING[self.framing]

    @property
    def gap_s(self) -> float:
        """Silence (seconds) that ends a partial receipt; 0 = never (lines: 2 s, escpos: off)."""
        if self.receipt_gap is not None:
            return self.receipt_gap
        return 2.0 if self.framing == "lines" else 0.0
