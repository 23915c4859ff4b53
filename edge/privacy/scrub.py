"""Scrubbing personal data out of free text (receipt lines, device strings, log lines).

- `scrub_cards`: payment card numbers become `[card]`. A card number is what
  `edge.privacy.cards` says one looks like: an issuer range and a length of a network
  (ISO/IEC 7812), a Luhn check digit, printed plain or in a card grouping (4-4-4-4,
  4-6-5, 4-6-4, 19-digit forms) with spaces, tabs, dashes, " - ", dots, double spaces or
  their Unicode spellings (no-break and thin spaces, Unicode dashes; full-width digits
  count as digits). A digit run longer than a card and not split by separators stays
  (nothing in it is a card as printed). Every Luhn-valid 13-19-digit number so printed is
  a card, whatever its issuer range (privacy first: the network table is not every
  issuer), with one exception. GS1 context: a plain number that is a valid GTIN-13/14
  where products stand (the whole text; a receipt item line "<code> <qty> [x price]";
  after EAN/GTIN/UPC/SKU/PLU/ART, a GS1 "(01)" or Digital Link "/01/"; after a loyalty
  label: loyalty cards carry EAN-13s) is a product, unless it is a certain card (a
  network's range at a length it issues): of GTIN lengths only a 14-digit Diners Club
  number is. No GTIN has 15-19 digits. docs/privacy.md lists what stays doubtful.
- `scrub_text`: card scrub, then e-mail addresses and phone numbers become their
  pseudonym (per the privacy policy) or `[email]` / `[phone]` when the policy drops them.
- `holds_card`: whether an identifier's value is or contains a card number, however its
  digits are separated (a card number given as a loyalty number must not be pseudonymized);
  a valid EAN-13 loyalty number is not one unless it is a certain card
  (`edge.privacy.cards.is_card_number`).
- `IDENTIFIER_PATTERNS`: identifier-shaped strings for the log scrubber (defence in depth;
  deliberately greedy, no Luhn check).

All patterns are linear-time (bounded quantifiers, anchored starts) on hostile input.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from edge.events import Ident
from edge.privacy.cards import (
    CERTAIN,
    DOUBTFUL,
    MAX_DIGITS,
    MIN_DIGITS,
    NOT_A_CARD,
    card_kind,
    grouping_ok,
    gtin_ok,
    is_card_number,
    luhn_ok,
)

if TYPE_CHECKING:
    from edge.privacy.pseudonym import Pseudonymizer

__all__ = ["CARD", "holds_card", "looks_personal", "luhn_ok", "redact_identifiers", "scrub_cards", "scrub_text"]

CARD = "[card]"

# A maximal run of ASCII digits with separators, >= 13 digits (after `_TO_ASCII`). One
# separator between two digits: " - ", two spaces, a space, tab, dash or dot.
_CARD_RUN = re.compile(r"(?<![0-9])[0-9](?:(?: - |  |[ \t.-])?[0-9]){12,}")
_DIGIT_GROUP = re.compile(r"[0-9]+")
_NON_DIGITS = re.compile(r"[^0-9]+")
# Unicode spellings of card digits and separators, one character for one (offsets keep):
# full-width digits; no-break, figure, thin, narrow no-break and ideographic spaces; Unicode
# hyphens, dashes, the minus sign and the full-width hyphen-minus; the full-width full stop
_TO_ASCII = {
    **{0xFF10 + d: chr(48 + d) for d in range(10)},
    **dict.fromkeys((0x00A0, 0x2007, 0x2009, 0x202F, 0x3000), " "),
    **dict.fromkeys((0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2212, 0xFF0D), "-"),
    0xFF0E: ".",
}
_WIDE = re.compile("[" + "".join(map(chr, _TO_ASCII)) + "]")  # does a text need _TO_ASCII?

# GS1 context around a plain valid GTIN (probe text, ASCII spelling), see the module docstring
_GS1_AFTER = re.compile(r"[ \t]{1,40}[0-9]{1,6}(?:[.,][0-9]{1,3})?[ \t]*(?:kg[ \t]*)?[x*@\u00d7]", re.IGNORECASE)
_GS1_LINE_START = re.compile(r"[ \t]{0,40}(?:(?:SKU|PLU|ART|EAN|GTIN|UPC)[ \t]*[:#.]?[ \t]*)?", re.IGNORECASE)
_WS_DIGIT = re.compile(r"[ \t]{1,40}[0-9]")
_GS1_BEFORE = re.compile(
    r"(?:\b(?:EAN|GTIN|UPC)(?:-?(?:8|12|13|14))?|\bART(?:\.?-?NR)?\.?|\bSKU|\bPLU|\(0[12]\)|/0[12]/"
    r"|\b(?:loyalty|member(?:ship)?|club|payback|bonus)[ \t]*(?:card|no\.?|nr\.?|number|id|#)?)"
    r"[ \t]*[:#]?[ \t]*$",
    re.IGNORECASE,
)
_BEFORE_MAX = 48  # characters of the line before a number read for its label

_EMAIL = re.compile(
    # no lookbehind on purpose: a local part longer than 64 still loses its last 64 and domain
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,126}"
    r"[A-Za-z][A-Za-z0-9-]{0,61}[A-Za-z0-9](?![A-Za-z0-9-])"
)
# International (+49 ..., 0049 ...) or national with trunk prefix (030 ...), 8-17 digits,
# separators: space, dash, slash, parentheses ("+49 (0)30 1234567"). Dates (dd-mm-yyyy,
# dd/mm/yy) are not phones.
# a date ends the number, or is followed by a time ("01/02/26 10:30"); "01-1-00 0000" is a phone
_DATE = (
    r"(?:0?[1-9]|[12][0-9]|3[01])([-/.])(?:0?[1-9]|1[0-2])\1(?:(?:19|20)[0-9]{2}|[0-9]{2})"
    r"(?=$|[^0-9 ()/-]|[ ()/-](?![0-9])|[ T][0-9]{1,2}:)"
)
_PHONE = re.compile(
    rf"(?<![0-9A-Za-z+])(?<![0-9][-/.])\(?(?!{_DATE})"
    r"(?:\+|0)[0-9](?:[ ()/-]{0,2}[0-9]){6,15}(?![0-9])"
)


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: digit d doubled, digits summed


class _LuhnWindows:
    """O(1) Luhn check of any window of a digit string, from two prefix sums.

    In a window ending at index b-1, position p is doubled when (b-1-p) is odd. `even[k]`
    sums positions < k with even p taken plain and odd p doubled; `odd[k]` the reverse.
    A window ending at an even index uses `even`, one ending at an odd index `odd`.
    """

    __slots__ = ("even", "odd")

    def __init__(self, digits: str) -> None:
        even = [0]
        odd = [0]
        e = o = 0
        for p, ch in enumerate(digits):
            d = ord(ch) - 48
            if p & 1:
                e += _DOUBLED[d]
                o += d
            else:
                e += d
                o += _DOUBLED[d]
            even.append(e)
            odd.append(o)
        self.even = even
        self.odd = odd

    def ok(self, a: int, b: int) -> bool:
        sums = self.odd if (b - 1) & 1 else self.even
        return (sums[b] - sums[a]) % 10 == 0


def _card_spans(run: str, base: int, probe: str) -> list[tuple[int, int]]:
    """Spans of card numbers within one digit run found at `base` in `probe` (spans relative
    to the run). Contiguous groups aligned on separators, longest first from each group."""
    if run.isdigit():  # the common case: one plain number (a GTIN, an id, a PAN)
        n = len(run)
        if n <= MAX_DIGITS and luhn_ok(run) and _is_card(run, base, base + n, probe):
            return [(0, n)]
        return []
    return _group_spans(run, base, probe)


def _group_spans(run: str, base: int, probe: str) -> list[tuple[int, int]]:
    """`_card_spans` of a run with separators. Linear time (windows of <= 19 digits)."""
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(run)]
    digits = "".join(run[a:b] for a, b in groups)
    starts = [0]  # digit index where each group starts; starts[-1] = total digits
    for g0, g1 in groups:
        starts.append(starts[-1] + g1 - g0)
    luhn = _LuhnWindows(digits)
    spans = []
    count = len(groups)
    i = 0
    while i < count:
        if groups[i][1] - groups[i][0] < 2:  # no card grouping starts with a 1-digit group
            i += 1
            continue
        found = 0
        j = i
        while j < count and starts[j + 1] - starts[i] <= MAX_DIGITS:
            j += 1
        # groups i..j-1 fit in 19 digits; try the longest window of >= 13 digits first
        for k in range(j, i, -1):
            if starts[k] - starts[i] < MIN_DIGITS:
                break
            if not luhn.ok(starts[i], starts[k]):
                continue
            number = digits[starts[i] : starts[k]]
            if k - i == 1:
                ok = _is_card(number, base + groups[i][0], base + groups[i][1], probe)
            else:
                ok = _grouped_card(run, groups, i, k, number)
            if ok:
                found = k
                break
        if found:
            spans.append((groups[i][0], groups[found - 1][1]))
            i = found
        else:
            i += 1
    return spans


def _grouped_card(run: str, groups: list[tuple[int, int]], i: int, k: int, number: str) -> bool:
    """Whether the Luhn-valid `number` spelled by groups i..k-1 (k - i >= 2) of a run is a
    card number as printed: 13-19 digits (the caller's window) in a card grouping, whatever
    its issuer range (a GTIN is printed plain, so no GS1 exception applies)."""
    sizes = [b - a for a, b in groups[i:k]]
    seps = [run[groups[t][1] : groups[t + 1][0]] for t in range(i, k - 1)]
    return card_kind(number) != NOT_A_CARD and grouping_ok(sizes, seps)


def _is_card(digits: str, a: int, b: int, probe: str) -> bool:
    """A plain Luhn-valid number at probe[a:b]: a card when certain; when doubtful (any other
    13-19 digits), unless it is a valid GTIN in GS1 context."""
    kind = card_kind(digits)
    if kind == DOUBTFUL:
        return not (gtin_ok(digits) and _gs1_context(probe, a, b))
    return kind == CERTAIN


def _gs1_context(probe: str, a: int, b: int) -> bool:
    """Whether the number at probe[a:b] stands where products (or EAN-coded loyalty numbers)
    stand: the whole text; an item line; after a GS1 or loyalty label."""
    size = len(probe)
    if size - (b - a) <= 80 and not probe[:a].strip() and not probe[b:].strip():
        return True
    ls = probe.rfind("\n", max(0, a - _BEFORE_MAX - 1), a) + 1
    le = probe.find("\n", b, b + 64)
    after = probe[b : le if le >= 0 else b + 64]
    if _GS1_AFTER.match(after):
        return True
    if _GS1_BEFORE.search(probe, max(ls, a - _BEFORE_MAX), a):
        return True
    line_start = ls > 0 or a <= _BEFORE_MAX  # rfind looked back to the text's start
    return line_start and bool(_GS1_LINE_START.fullmatch(probe, ls, a)) and bool(_WS_DIGIT.match(after))


# Prefilter: a card number spans >= 13 consecutive characters that are digits, spaces,
# dashes or dots. Mapping those bytes to 1 and all others to 0 and looking for thirteen 1s is
# two C loops, ~10x cheaper than the regex on a text without one (UUIDs, names, hex ids).
_RUN_CHARS = bytes(1 if chr(b) in "0123456789 \t-." else 0 for b in range(256))
_RUN13 = b"\x01" * 13


def scrub_cards(text: str) -> tuple[str, int]:
    """Replace every card number in `text` by `[card]` (see the module docstring); return the count."""
    if len(text) < MIN_DIGITS:
        return text, 0
    probe = text if text.isascii() or not _WIDE.search(text) else text.translate(_TO_ASCII)  # same length
    if _RUN13 not in probe.encode("utf-8", "surrogatepass").translate(_RUN_CHARS):
        return text, 0
    pos = 0
    out: list[str] | None = None
    count = 0
    for m in _CARD_RUN.finditer(probe):
        base = m.start()
        spans = _card_spans(m.group(), base, probe)
        if not spans:
            continue
        if out is None:
            out = []
        for a, b in spans:
            out.append(text[pos : base + a])
            out.append(CARD)
            pos = base + b
        count += len(spans)
    if out is None:
        return text, 0
    out.append(text[pos:])
    return "".join(out), count


def holds_card(value: str) -> bool:
    """True when `value` is or contains a payment card number: its digits, whatever separates
    them ("4111.1111.1111.1111", "4111 / 1111 ..."), are a card number (`is_card_number`:
    any Luhn-valid 13-19 digits, a valid EAN-13 or GTIN-14 only when certain: loyalty cards
    carry EAN-13s), or `scrub_cards` finds one in it."""
    digits = _NON_DIGITS.sub("", value.translate(_TO_ASCII))
    if len(digits) < MIN_DIGITS:
        return False
    return is_card_number(digits) or scrub_cards(value)[1] > 0


def scrub_text(text: str, pz: Pseudonymizer) -> str:
    """Cards removed; e-mails and phone numbers replaced by pseudonyms or `[email]`/`[phone]`."""
    text, _ = scrub_cards(text)
    if "@" in text:
        text = _EMAIL.sub(lambda m: pz.pseudonym(Ident("email", m.group())) or "[email]", text)
    if len(text) >= 8:
        text = _PHONE.sub(lambda m: pz.pseudonym(Ident("phone", m.group())) or "[phone]", text)
    return text


_HEX2 = "[0-9A-Fa-f]{2}"
_HEXY = frozenset({"hex_id", "hex_bytes"})  # redacted only with a letter a-f beyond "0x"
_HEX_LETTER = re.compile(r"[A-Fa-f]")
IDENTIFIER_PATTERNS: dict[str, re.Pattern[str]] = {
    # a bytes literal in a message or traceback (b'\x04\xa1...'): device bytes, shown raw; to
    # its closing quote, or to the end of the line when it has none (a repr cut short)
    "bytes": re.compile(r"""(?<![A-Za-z0-9_])b(?:'(?:[^'\\\n]|\\.)*'?|"(?:[^"\\\n]|\\.)*"?)"""),
    # a tag or device id after its label, as nfcpy and other libraries print them
    # ("Type2Tag 'NTAG215' ID=04A1B2C3", "IDm=01010501B00AC30B", "uid 0x04a1b2c3"): 4-10 bytes
    "tag_id": re.compile(
        r"(?<![A-Za-z0-9_])(?:ID|UID|uid|IDm|PMm|NFCID[0-9]?|nfcid[0-9]?)(?:=| ?: ?| )(?:0x)?"
        r"[0-9A-Fa-f]{8,20}(?![0-9A-Za-z])"
    ),
    # 7- or 10-byte NFC UID written with separators (before "mac": longer wins)
    "nfc_uid": re.compile(
        rf"(?<![0-9A-Fa-f]){_HEX2}([:-]){_HEX2}(?:\1{_HEX2}){{8}}(?![0-9A-Fa-f])"
        rf"|(?<![0-9A-Fa-f]){_HEX2}([:-]){_HEX2}(?:\2{_HEX2}){{5}}(?![0-9A-Fa-f])"
    ),
    # MAC address with colons or dashes, any case; Cisco style aabb.ccdd.eeff; BlueZ object
    # paths write it with underscores (/org/bluez/hci0/dev_AA_BB_CC_DD_EE_FF)
    "mac": re.compile(
        rf"(?<![0-9A-Fa-f]){_HEX2}([:-]){_HEX2}(?:\1{_HEX2}){{4}}(?![0-9A-Fa-f])"
        rf"|(?<![0-9A-Fa-f]){_HEX2}_{_HEX2}(?:_{_HEX2}){{4}}(?![0-9A-Fa-f])"
        r"|(?<![0-9A-Fa-f.])[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}(?![0-9A-Fa-f.])"
    ),
    # a MAC (6 bytes) or NFC UID (7 or 10 bytes) without separators ("04A1B2C3D4E5F6"):
    # exactly 12, 14 or 20 hex digits, or 8-20 after "0x"; pieces of longer tokens (hashes,
    # UUIDs) stay, and so does a run without a letter a-f (a number: counts, times; see _HEXY)
    "hex_id": re.compile(
        r"(?<![0-9A-Za-z_-])(?:[0-9A-Fa-f]{20}|[0-9A-Fa-f]{14}|[0-9A-Fa-f]{12}|0x[0-9A-Fa-f]{8,20})"
        r"(?![0-9A-Za-z_-])"
    ),
    # six or more hex bytes separated by single spaces ("04 a1 b2 c3 d4 e5 f6": a hex dump;
    # with a letter a-f, see _HEXY: "12 34 56 78 90 12" is a list of numbers)
    "hex_bytes": re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{2}(?: [0-9A-Fa-f]{2}){5,}(?![0-9A-Fa-f])"),
    # 13 or more ASCII digits with optional single space/dash separators, no Luhn check
    # (defence in depth: a longer run may hide a card number next to other digits); the other
    # spellings `scrub_cards` reads (tabs, " - ", Unicode spaces, full-width digits) are
    # redacted by it, Luhn-checked, before these patterns run: date and id ranges stay readable
    "card": re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,}"),
    "email": _EMAIL,
    "phone": _PHONE,
}


def looks_personal(value: str) -> bool:
    """True when `value` holds a phone number, e-mail, MAC or UID shape, or a Luhn-valid card
    number: drivers leave such a free-form value out of `Reading.data`. (Unlike the log
    redactor, a long digit run alone is not enough: product codes and receipt numbers are.)"""
    if scrub_cards(value)[1]:
        return True
    return any(IDENTIFIER_PATTERNS[k].search(value) for k in ("email", "phone", "mac", "nfc_uid"))


def redact_identifiers(text: str) -> str:
    """Every identifier-shaped substring becomes `[redacted:<kind>]` (for log lines)."""
    if len(text) < 6:  # shorter than the shortest pattern ("a@b.de")
        return text
    text, cards = scrub_cards(text)
    if cards:
        text = text.replace(CARD, "[redacted:card]")
    for kind, pattern in IDENTIFIER_PATTERNS.items():
        marker = f"[redacted:{kind}]"
        text = pattern.sub(_HexIfLetter(marker) if kind in _HEXY else marker, text)
    return text


class _HexIfLetter:
    """Replacement that redacts a hex match only when it holds a letter a-f (after "0x")."""

    __slots__ = ("marker",)

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, m: re.Match[str]) -> str:
        found = m.group()
        return self.marker if _HEX_LETTER.search(found.removeprefix("0x")) else found
