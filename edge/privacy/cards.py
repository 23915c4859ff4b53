"""What a payment card number looks like, and what a GS1 product number looks like.

Card numbers (PANs) per ISO/IEC 7812: an issuer range (IIN/BIN, the leading digits), a
length the network issues, a Luhn check digit. `card_kind` sorts a Luhn-valid digit string:

- `CERTAIN`: in a network's range of the table below, at a length that network issues;
- `DOUBTFUL`: any other 13-19 digits, whatever the range. Privacy first: the table is not
  every issuer there is (UzCard 8600, Humo 9860, BORICA 2205, Belkart 9112, China T-Union
  31, fuel and private-label cards 7..., ...), so a range outside it proves nothing. The
  scrubber treats a doubtful number as a card everywhere, except a valid GTIN-13/14 where
  GS1 context says product or EAN-13 loyalty number (see `edge.privacy.scrub`,
  docs/privacy.md). No GTIN has 15-19 digits, so a doubtful 15-19-digit number is always a
  card; of GTIN lengths the table only makes 14-digit Diners Club numbers certain;
- `NOT_A_CARD`: shorter than 13 or longer than 19 digits.

    network        ranges (leading digits)                      issued lengths
    Visa           4                                            16, 19
    Mastercard     2221-2720, 51-55                             16
    Amex           34, 37                                       15
    Discover       6011, 622126-622925, 644-649, 65             16-19
    JCB            3528-3589                                    16-19
    Diners Club    300-305, 3095, 36, 38-39                     14-19
    UnionPay       62, 81                                       16-19
    Maestro        50, 56-69                                    16-19
    Mir            2200-2204                                    16-19
    UATP           1                                            15
    RuPay          60, 65, 81, 82, 508, 353, 356                16
    Troy           9792                                         16

Overlaps are on purpose (Maestro's 56-69 holds Discover's and UnionPay's ranges): a number
is as certain as the most certain network whose range holds it.

Printed groupings (`grouping_ok`): plain, or groups of 2-8 digits (the last may be 1)
joined by single separators (4-4-4-4, Amex 4-6-5, Diners 4-6-4, 4-4-4-4-3 and the other 19-digit forms,
5-5-5-4, ...), or the 19-digit 6-13 form; with dots or double spaces only one separator
throughout, a first group of 4-6 digits, inner groups of 3-6, a last one of 1-6 (price
columns "12.99  3.49" never qualify). A GTIN is printed plain: a GTIN followed by its
quantity ("5401234567898 1") is a 13-digit group and a 1-digit group, no card grouping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

NOT_A_CARD: Final = 0
DOUBTFUL: Final = 1
CERTAIN: Final = 2
CardKind = Literal[0, 1, 2]

MIN_DIGITS = 13  # shortest PAN scanned for (12-digit Maestro is allowed by the scheme; see docs/privacy.md)
MAX_DIGITS = 19


@dataclass(slots=True, frozen=True)
class Network:
    """One card network: its issuer ranges (inclusive, equal-width prefixes) and lengths."""

    name: str
    ranges: tuple[tuple[str, str], ...]
    lengths: frozenset[int]


def _r(*spans: str) -> tuple[tuple[str, str], ...]:
    """ "2221-2720" -> ("2221", "2720"); "4" -> ("4", "4")."""
    out = []
    for s in spans:
        lo, _, hi = s.partition("-")
        out.append((lo, hi or lo))
    return tuple(out)


_16_19 = frozenset(range(16, 20))
NETWORKS: Final = (
    Network("visa", _r("4"), frozenset({16, 19})),
    Network("mastercard", _r("2221-2720", "51-55"), frozenset({16})),
    Network("amex", _r("34", "37"), frozenset({15})),
    Network("discover", _r("6011", "622126-622925", "644-649", "65"), _16_19),
    Network("jcb", _r("3528-3589"), _16_19),
    Network("diners", _r("300-305", "3095", "36", "38-39"), frozenset(range(14, 20))),
    Network("unionpay", _r("62", "81"), _16_19),
    Network("maestro", _r("50", "56-69"), _16_19),
    Network("mir", _r("2200-2204"), _16_19),
    Network("uatp", _r("1"), frozenset({15})),
    Network("rupay", _r("60", "65", "81", "82", "508", "353", "356"), frozenset({16})),
    Network("troy", _r("9792"), frozenset({16})),
)


def _prefix_table(networks: tuple[Network, ...]) -> dict[str, int]:
    """Leading digits -> bit mask of issued lengths (bit L set: length L issued), merged over
    networks; a key with mask 0 never occurs (every network issues some length)."""
    table: dict[str, int] = {}
    for net in networks:
        mask = 0
        for n in net.lengths:
            mask |= 1 << n
        for lo, hi in net.ranges:
            for p in range(int(lo), int(hi) + 1):
                key = str(p).zfill(len(lo))
                table[key] = table.get(key, 0) | mask
    return table


_PREFIX = _prefix_table(NETWORKS)
_WIDTHS = tuple(sorted({len(k) for k in _PREFIX}))


def issued_lengths(digits: str) -> int:
    """Bit mask of the lengths issued in the ranges holding `digits`' leading digits (0: none)."""
    mask = 0
    get = _PREFIX.get
    for w in _WIDTHS:
        m = get(digits[:w])
        if m is not None:
            mask |= m
    return mask


def card_kind(digits: str) -> CardKind:
    """How much an all-digit, Luhn-valid string looks like a PAN (the caller checks Luhn)."""
    n = len(digits)
    if n < MIN_DIGITS or n > MAX_DIGITS:
        return NOT_A_CARD
    return CERTAIN if issued_lengths(digits) >> n & 1 else DOUBTFUL


def is_card_number(digits: str) -> bool:
    """Whether an all-digit string given on its own (an identifier, an injected value) is a
    card number: Luhn-valid, 13-19 digits, and certain or not a valid GTIN (a valid
    EAN-13/GTIN-14 that is only doubtful is a loyalty number or product code, as a plain
    number standing alone is in `edge.privacy.scrub`)."""
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS or not luhn_ok(digits):
        return False
    return card_kind(digits) == CERTAIN or not gtin_ok(digits)


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of an all-digit string."""
    total = 0
    double = False
    for ch in reversed(digits):
        n = ord(ch) - 48
        if double:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
        double = not double
    return total % 10 == 0


def luhn_complete(body: str) -> str:
    """`body` (all digits) plus the Luhn check digit that makes it valid."""
    for check in "0123456789":
        if luhn_ok(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always fits")


def gtin_check_digit(body: str) -> str:
    """The GS1 check digit for a GTIN body (all digits: the code without its last digit)."""
    total = 0
    n = len(body)
    for i in range(n):  # weights 3, 1, 3, ... from the last digit of the body
        d = ord(body[n - 1 - i]) - 48
        total += d * 3 if i % 2 == 0 else d
    return chr(48 + (10 - total % 10) % 10)


def gtin_ok(digits: str) -> bool:
    """A GTIN-8/12/13/14 with a correct GS1 check digit (all-digit input)."""
    if len(digits) not in (8, 12, 13, 14):
        return False
    return gtin_check_digit(digits[:-1]) == digits[-1]


SINGLE_SEPARATORS: Final = frozenset({" ", "\t", "-", " - "})
_ODD: Final = (6, 13)


def grouping_ok(sizes: list[int], seps: list[str]) -> bool:
    """Whether digit groups of `sizes` joined by `seps` (one fewer) are a printed card form.
    Separators are in their ASCII spelling (see `edge.privacy.scrub`)."""
    if len(sizes) == 1:
        return True
    if all(s in SINGLE_SEPARATORS for s in seps):
        # the last group may be a single digit (a 13-digit Visa printed 4-4-4-1)
        return (all(2 <= n <= 8 for n in sizes[:-1]) and 1 <= sizes[-1] <= 8) or tuple(sizes) == _ODD
    return len(set(seps)) == 1 and 4 <= sizes[0] <= 6 and all(3 <= n <= 6 for n in sizes[1:-1]) and 1 <= sizes[-1] <= 6
