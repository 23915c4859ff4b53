"""GS1 Digital Link URIs -> GTIN, batch/lot and serial (pure parsing, no I/O).

Accepted (any host, optional path prefix before the primary key, query and fragment
ignored; scheme http or https):

    https://<host>[/<prefix>]/01/<GTIN>[/22/<cpv>][/10/<batch>][/21/<serial>]

and the short names of the same keys: `gtin` for 01, `cpv` for 22, `lot` for 10, `ser`
for 21. The GTIN may be written with 8, 12, 13 or 14 digits; its check digit is verified
and it is returned zero-padded to 14 digits (GS1's canonical form, as resolvers use it).
Batch and serial are percent-decoded and must be 1-20 characters of GS1's character set
82 (the characters allowed in AI 10 / AI 21).

`parse_digital_link` returns None for a URI that is not a Digital Link, a `DigitalLink`
for a valid one, and raises `Gs1Error` (a ValueError with a `reason`) for a URI that is
one by its shape (a `/01/` or `/gtin/` segment followed by 8-14 digits) but is invalid.
It raises nothing else, whatever the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from drivers.base import gtin_valid

MAX_URI = 2048  # longer URIs are not parsed (not a Digital Link a tag would carry)
_GTIN_KEYS = frozenset({"01", "gtin"})
# qualifier path segments, in the order GS1 requires them
_QUALIFIERS: dict[str, tuple[int, str]] = {
    "22": (0, "cpv"), "cpv": (0, "cpv"),
    "10": (1, "batch"), "lot": (1, "batch"),
    "21": (2, "serial"), "ser": (2, "serial"),
}
_SCHEME = re.compile(r"^(?i:https?)://([^/?#]*)(/[^?#]*)?")
_CSET82 = re.compile(r"^[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}$")
_GTIN_LENGTHS = (8, 12, 13, 14)


class Gs1Error(ValueError):
    """A URI shaped like a GS1 Digital Link that is not a valid one. `reason` is one of
    `check_digit`, `gtin_length`, `qualifier`, `batch`, `serial`, `cpv`."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid GS1 Digital Link: {reason}")
        self.reason = reason


@dataclass(slots=True, frozen=True)
class DigitalLink:
    gtin: str  # 14 digits, check digit verified
    batch: str | None = None
    serial: str | None = None


def parse_digital_link(uri: str) -> DigitalLink | None:
    """See the module docstring."""
    if len(uri) > MAX_URI:
        return None
    m = _SCHEME.match(uri)
    if m is None or not m.group(1) or not m.group(2):
        return None
    segments = m.group(2).split("/")[1:]
    for i in range(len(segments) - 1):
        if segments[i].lower() in _GTIN_KEYS and _digits(segments[i + 1], 8, 14):
            return _link(segments[i + 1], segments[i + 2 :])
    return None


def _digits(s: str, lo: int, hi: int) -> bool:
    return lo <= len(s) <= hi and s.isascii() and s.isdigit()


def _link(gtin: str, rest: list[str]) -> DigitalLink:
    if len(gtin) not in _GTIN_LENGTHS:
        raise Gs1Error("gtin_length")
    if not gtin_valid(gtin):
        raise Gs1Error("check_digit")
    if rest and rest[-1] == "":
        rest = rest[:-1]  # a trailing slash
    if len(rest) % 2:
        raise Gs1Error("qualifier")
    found: dict[str, str] = {}
    last = -1
    for key, raw in zip(rest[::2], rest[1::2], strict=True):
        q = _QUALIFIERS.get(key.lower())
        if q is None or q[0] <= last:
            raise Gs1Error("qualifier")  # unknown, repeated, or out of GS1's order
        last, name = q
        value = unquote(raw, encoding="latin-1") if "%" in raw else raw  # non-ASCII fails CSET 82
        if not _CSET82.match(value):
            raise Gs1Error(name)
        found[name] = value
    return DigitalLink(gtin.zfill(14), found.get("batch"), found.get("serial"))
