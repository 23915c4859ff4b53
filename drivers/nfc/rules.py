"""Which kind of tap this is: `product`, `loyalty` or `unknown`, by the configured rules
(`drivers.nfc.rules`, see `drivers.nfc.config.NfcRule`). Pure: records in, a
`Classification` out; raises nothing on any records.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from drivers.nfc.config import NfcRule
from drivers.nfc.gs1 import DigitalLink, Gs1Error, parse_digital_link
from drivers.nfc.ndef import NdefRecord
from edge.privacy.scrub import looks_personal

Kind = Literal["product", "loyalty", "unknown"]

# a number written on a tag: digits, single spaces or dashes between them
_NUMBER = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){0,39}(?![0-9])", re.ASCII)
_MAX_SCAN = 4096  # characters of one text/payload searched for numbers


@dataclass(slots=True, frozen=True)
class Classification:
    kind: Kind
    rule: str | None = None  # name of the rule that matched
    data: Mapping[str, Any] = field(default_factory=dict)  # gtin, batch, serial (non-personal)
    loyalty: str | None = None  # raw loyalty number: an identifier, never data
    gs1_error: str | None = None  # a Digital Link-shaped URI was invalid (reason)

    def __repr__(self) -> str:
        return f"Classification({self.kind}, rule={self.rule})"


class Classifier:
    """Applies the rules in order; the first match decides (see `NfcRule`)."""

    def __init__(self, rules: Sequence[NfcRule]) -> None:
        self._rules = tuple(rules)

    def classify(self, records: Sequence[NdefRecord]) -> Classification:
        link, gs1_error = _first_digital_link(records)
        for rule in self._rules:
            hit = _match(rule, records, link)
            if hit is None:
                continue
            data: dict[str, Any] = {}
            if rule.kind == "product" and link is not None:
                data["gtin"] = link.gtin
                # batch and serial are free-form on the tag: left out when identifier-shaped
                if link.batch is not None and not looks_personal(link.batch):
                    data["batch"] = link.batch
                if link.serial is not None and not looks_personal(link.serial):
                    data["serial"] = link.serial
            loyalty = (hit or None) if rule.kind == "loyalty" else None
            return Classification(rule.kind, rule.name, data, loyalty, gs1_error)
        return Classification("unknown", gs1_error=gs1_error)


def _first_digital_link(records: Sequence[NdefRecord]) -> tuple[DigitalLink | None, str | None]:
    error = None
    for rec in records:
        if rec.uri is None:
            continue
        try:
            link = parse_digital_link(rec.uri)
        except Gs1Error as exc:
            error = error or exc.reason
            continue
        if link is not None:
            return link, error
    return None, error


def _match(rule: NfcRule, records: Sequence[NdefRecord], link: DigitalLink | None) -> str | None:
    """None: no match; otherwise the number found for the rule ("" when none applies)."""
    if rule.gs1_digital_link and link is None:
        return None
    sources: list[str] = []
    if rule.uri_prefix is not None:
        prefix = rule.uri_prefix.lower()
        tails = [r.uri[len(prefix) :] for r in records if r.uri is not None and r.uri.lower().startswith(prefix)]
        if not tails:
            return None
        sources = tails
    if rule.mime_type is not None:
        payloads = [_text(r.payload) for r in records if r.kind == "mime" and r.type_name == rule.mime_type]
        if not payloads:
            return None
        if rule.uri_prefix is None:
            sources = payloads
    if rule.uri_prefix is None and rule.mime_type is None:
        sources = list(_everything(records))
    number = _number(sources, rule)
    if rule.number_prefix is not None and number is None:
        return None
    return number or ""


def _everything(records: Sequence[NdefRecord]) -> Iterator[str]:
    for r in records:
        if r.uri is not None:
            yield r.uri
        if r.text is not None:
            yield r.text
        if r.kind == "mime":
            yield _text(r.payload)


def _text(payload: bytes) -> str:
    return payload[:_MAX_SCAN].decode("utf-8", errors="replace")


def _number(sources: Sequence[str], rule: NfcRule) -> str | None:
    lo, hi = rule.number_length
    prefix = rule.number_prefix or ""
    for s in sources:
        for m in _NUMBER.finditer(s[:_MAX_SCAN]):
            digits = m.group().replace(" ", "").replace("-", "")
            if lo <= len(digits) <= hi and digits.startswith(prefix):
                return digits
    return None
