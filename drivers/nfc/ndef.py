"""NDEF messages read from a tag -> typed records (pure parsing with ndeflib, no I/O).

`parse_ndef(octets)` decodes strictly with ndeflib, recognizing URI, Text and Smart
Poster records; any record whose type is a MIME type (`text/plain`,
`application/vnd.acme.loyalty`, ...) is a `mime` record with its payload. It returns the
records, or raises `NdefError` (a ValueError with a `reason`) for anything malformed:
it raises nothing else, whatever the bytes.

`NdefRecord.summary()` is what an event may carry about a record: its kind and shape
(URI scheme, text language and length, MIME type, payload size), never its content,
which may be personal (a name on a business card, a member number in a URL).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Literal

import ndef as ndeflib

from edge.privacy.scrub import looks_personal

MAX_OCTETS = 64 * 1024  # larger than any tag's NDEF area
MAX_RECORDS = 64
RecordKind = Literal["uri", "text", "smartposter", "mime", "external", "empty", "other"]

# only these record types are decoded into classes; everything else stays a plain Record
_KNOWN_TYPES: dict[str, type[Any]] = {
    "urn:nfc:wkt:U": ndeflib.UriRecord,
    "urn:nfc:wkt:T": ndeflib.TextRecord,
    "urn:nfc:wkt:Sp": ndeflib.SmartposterRecord,
}
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]{0,15}):")
# a BCP 47-like language tag: a 2-3 letter language, then up to three subtags of 2-8 letters
# or digits (script, region, variant: "en", "de-DE", "zh-Hant-TW", "es-419"); see _language
_LANG = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,3}$")
_LANG_MAX_DIGITS = 3  # a UN M.49 region ("es-419"); registered 4-digit variants ("de-1996",
# "de-CH-1901") become "?" too: the safe side, as a tag's author may write any digits there
_EXTERNAL = re.compile(r"^[a-z0-9.:_-]{1,64}$")


class NdefError(ValueError):
    """Malformed NDEF data. `reason`: `too_large`, `too_many_records`, `malformed`."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed NDEF message: {reason}")
        self.reason = reason


@dataclass(slots=True, frozen=True)
class NdefRecord:
    """One decoded record. Content fields may hold personal data: keep them in memory."""

    kind: RecordKind
    uri: str | None = None  # uri, smartposter
    text: str | None = None  # text; a smart poster's title
    lang: str | None = None  # text
    type_name: str | None = None  # mime: the MIME type (lower case); external: its name
    payload: bytes = b""  # mime, external, other

    def __repr__(self) -> str:  # content may be personal: never in a traceback
        return f"NdefRecord({self.kind})"

    def summary(self) -> dict[str, Any]:
        """Kind and shape only (see the module docstring)."""
        out: dict[str, Any] = {"type": self.kind}
        if self.kind in ("uri", "smartposter"):
            m = _SCHEME.match((self.uri or "").lower())
            out["scheme"] = m.group(1) if m else "?"
        if self.kind == "text":
            out["lang"] = _language(self.lang)
            out["chars"] = len(self.text or "")
        if self.kind == "mime":
            out["mime"] = _type_name(self.type_name, _MIME)
        if self.kind == "external":
            out["name"] = _type_name(self.type_name, _EXTERNAL)
        if self.kind in ("mime", "external", "other"):
            out["bytes"] = len(self.payload)
        return out


_DIGIT_RUN = re.compile(r"[0-9]{6}")


def _type_name(name: str | None, shape: re.Pattern[str]) -> str:
    """A record's type name as written on the tag, or "?" when it is malformed or could
    carry a number of a person (whoever wrote the tag chose it)."""
    if not name or not shape.fullmatch(name) or _DIGIT_RUN.search(name) or looks_personal(name):
        return "?"
    return name


def _language(lang: str | None) -> str:
    """A Text record's language as written on the tag, or "?" like a type name: unless it is
    shaped like a BCP 47 tag (`_LANG`), has at most 3 digits in all (so no run of 4 or more:
    "x-91234567-8901" is a number, not a language) and does not look personal."""
    if (
        not lang
        or not _LANG.fullmatch(lang)  # not match(): "$" would let a trailing newline through
        or sum(c.isdigit() for c in lang) > _LANG_MAX_DIGITS
        or looks_personal(lang)
    ):
        return "?"
    return lang


def parse_ndef(octets: bytes | bytearray) -> tuple[NdefRecord, ...]:
    """Decode an NDEF message; `()` for no bytes at all. See the module docstring."""
    if len(octets) > MAX_OCTETS:
        raise NdefError("too_large")
    if not octets:
        return ()
    try:
        decoded = itertools.islice(
            ndeflib.message_decoder(bytes(octets), errors="strict", known_types=_KNOWN_TYPES), MAX_RECORDS + 1
        )
        out = tuple(_record(rec) for rec in decoded)
    except Exception as exc:  # ndeflib raises DecodeError, and on hostile bytes sometimes others
        raise NdefError("malformed") from exc
    if len(out) > MAX_RECORDS:
        raise NdefError("too_many_records")
    return out


def _record(rec: Any) -> NdefRecord:
    if isinstance(rec, ndeflib.UriRecord):
        return NdefRecord("uri", uri=str(rec.iri))
    if isinstance(rec, ndeflib.TextRecord):
        return NdefRecord("text", text=str(rec.text), lang=str(rec.language))
    if isinstance(rec, ndeflib.SmartposterRecord):
        resource = rec.resource
        title = rec.title
        return NdefRecord(
            "smartposter",
            uri=None if resource is None else str(resource.iri),
            text=None if title is None else str(title),
        )
    return _generic(rec)


def _generic(rec: Any) -> NdefRecord:
    rtype = str(rec.type or "")
    payload = bytes(rec.data or b"")
    if not rtype:
        return NdefRecord("empty")
    if rtype.startswith("urn:nfc:ext:"):
        return NdefRecord("external", type_name=rtype.removeprefix("urn:nfc:ext:").lower(), payload=payload)
    if "/" in rtype and "://" not in rtype and not rtype.startswith("urn:"):
        return NdefRecord("mime", type_name=rtype.lower(), payload=payload)
    return NdefRecord("other", type_name=rtype, payload=payload)
