"""Card numbers as networks issue and print them (ISO/IEC 7812 ranges, lengths, groupings),
and GS1 product numbers that must survive the card scrub (issue 18 point 9)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import FakeClock
from edge.config import Privacy
from edge.events import Ident, Reading
from edge.pipeline import build_pipeline
from edge.privacy.cards import CERTAIN, DOUBTFUL, NOT_A_CARD, card_kind, gtin_ok, luhn_ok
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.scrub import holds_card, scrub_cards
from edge.privacy.stage import CardScrubStage, PrivacyStage


def luhn(body: str) -> str:
    """`body` plus its Luhn check digit (written independently of the code under test)."""
    for c in "0123456789":
        d = body + c
        t = sum(
            int(x) if i % 2 == 0 else (2 * int(x) - 9 if int(x) > 4 else 2 * int(x)) for i, x in enumerate(reversed(d))
        )
        if t % 10 == 0:
            return d
    raise AssertionError


def gtin(body: str) -> str:
    s = sum(int(x) * (3 if i % 2 == 0 else 1) for i, x in enumerate(reversed(body)))
    return body + str((10 - s % 10) % 10)


def pan(prefix: str, length: int, fill: str = "3") -> str:
    return luhn((prefix + fill * length)[: length - 1])


# (network, leading digits, length): one certain PAN shape per range edge
ISSUED = [
    ("visa", "4", 16), ("visa", "4", 19),
    ("mastercard", "51", 16), ("mastercard", "55", 16), ("mastercard", "2221", 16), ("mastercard", "2720", 16),
    ("amex", "34", 15), ("amex", "37", 15),
    ("discover", "6011", 16), ("discover", "644", 16), ("discover", "65", 19), ("discover", "622126", 16),
    ("jcb", "3528", 16), ("jcb", "3589", 19),
    ("diners", "36", 14), ("diners", "300", 14), ("diners", "305", 16), ("diners", "3095", 14), ("diners", "38", 14),
    ("unionpay", "62", 16), ("unionpay", "62", 19), ("unionpay", "81", 16),
    ("maestro", "50", 16), ("maestro", "6759", 19), ("maestro", "56", 18),
    ("mir", "2200", 16), ("uatp", "1", 15), ("troy", "9792", 16), ("rupay", "82", 16),
]  # fmt: skip


@pytest.mark.parametrize(("network", "prefix", "length"), ISSUED)
def test_every_network_range_and_issued_length_is_a_certain_card(network: str, prefix: str, length: int) -> None:
    number = pan(prefix, length)
    assert len(number) == length
    assert card_kind(number) == CERTAIN, network
    assert scrub_cards(f"paid {number} ok") == ("paid [card] ok", 1)


@pytest.mark.parametrize(
    ("prefix", "length", "kind"),
    [
        ("4", 13, DOUBTFUL),  # the retired 13-digit Visa
        ("4", 17, DOUBTFUL),
        ("6", 13, DOUBTFUL),  # 13-digit Maestro: allowed by the scheme
        ("54", 13, DOUBTFUL),  # Mastercard issues 16 only
        # outside the table's ranges: doubtful too (privacy first, the table is not every issuer)
        ("2219", 16, DOUBTFUL),  # between Mir and Mastercard's 2-series
        ("2721", 16, DOUBTFUL),
        ("33", 16, DOUBTFUL),
        ("3527", 16, DOUBTFUL),
        ("7", 16, DOUBTFUL),
        ("0", 16, DOUBTFUL),
        ("9791", 16, DOUBTFUL),
        ("0", 13, DOUBTFUL),
        ("9", 14, DOUBTFUL),
        ("4", 12, NOT_A_CARD),  # shorter than 13 and longer than 19 digits: no card scanned for
        ("4", 20, NOT_A_CARD),
    ],
)
def test_lengths_a_network_does_not_issue_and_ranges_outside_the_table_are_doubtful(
    prefix: str, length: int, kind: int
) -> None:
    assert card_kind(pan(prefix, length)) == kind


@pytest.mark.parametrize(
    ("number", "groups"),
    [
        (pan("4", 16), (4, 4, 4, 4)),
        (pan("37", 15), (4, 6, 5)),
        (pan("36", 14), (4, 6, 4)),
        (pan("62", 19), (4, 4, 4, 4, 3)),
        (pan("62", 19), (6, 13)),
        (pan("50", 19), (5, 5, 5, 4)),
        (pan("4", 13), (4, 3, 3, 3)),
    ],
)
@pytest.mark.parametrize("sep", [" ", "-", ".", "\t", "  ", " - ", "\u00a0", "\u2013"])
def test_printed_groupings_with_every_separator_are_scrubbed(number: str, groups: tuple[int, ...], sep: str) -> None:
    parts, at = [], 0
    for n in groups:
        parts.append(number[at : at + n])
        at += n
    printed = sep.join(parts)
    if sep in (".", "  ") and groups == (6, 13):
        pytest.skip("dotted and double-spaced forms are the 3-6-digit card groupings only")
    assert scrub_cards(f"Karte {printed} ok") == ("Karte [card] ok", 1)


def test_a_gtin_followed_by_its_quantity_keeps_its_item() -> None:
    """The reported regression: the GTIN and its quantity are no card number."""
    assert scrub_cards("5401234567898 1 x 1.25") == ("5401234567898 1 x 1.25", 0)
    for sep in (" ", "\t", "  "):
        assert scrub_cards(f"5401234567898{sep}1") == (f"5401234567898{sep}1", 0)


def test_gs1_context_keeps_valid_gtins_and_free_text_does_not() -> None:
    """A Luhn-valid GTIN-13 with a card network's leading digit (a doubtful 13-digit shape)."""
    g = next(x for x in (gtin(f"40{i:010d}") for i in range(1000)) if luhn_ok(x))
    for kept in (g, f"  {g}  2 x 1.49   2.98", f"OAT {g} 2 x 1.49", f"EAN: {g}", f"(01)0{g}", f"Loyalty: {g}"):
        assert scrub_cards(kept) == (kept, 0), kept
    for scrubbed in (f"Karte {g}", f"{g} approved", f"paid with\n{g}\n"):
        assert scrub_cards(scrubbed)[1] == 1, scrubbed


def test_a_gtin_14_that_is_a_certain_diners_number_is_scrubbed_anyway() -> None:
    """Privacy first: of GTIN lengths only 14-digit Diners Club numbers are issued cards."""
    g = next(x for x in (gtin(f"36{i:011d}") for i in range(1000)) if luhn_ok(x))
    assert gtin_ok(g)
    assert card_kind(g) == CERTAIN
    assert scrub_cards(f"{g} 1 x 1.00") == ("[card] 1 x 1.00", 1)


def test_ean13_loyalty_numbers_are_not_cards_but_certain_cards_are() -> None:
    g = next(x for x in (gtin(f"59{i:010d}") for i in range(1000)) if luhn_ok(x))
    assert not holds_card(g)
    assert holds_card(pan("4", 16))
    assert holds_card(pan("4", 13) if not gtin_ok(pan("4", 13)) else pan("4", 13, "7"))


def test_a_receipt_through_the_pipeline_keeps_its_items(tmp_path: Path) -> None:
    """Through the daemon's pipeline the receipt of the report keeps its item and loyalty."""
    clock = FakeClock()
    keys = KeyStore(tmp_path / "keys", clock)
    keys.init()
    got = []

    class Sink:
        async def put(self, p: object) -> None: ...

        def put_nowait(self, p: object) -> bool:
            got.append(p)
            return True

    pipeline, cards = build_pipeline(clock, PrivacyStage(Pseudonymizer(Privacy(), keys, None)), Sink())
    text = (
        "5401234567898 1 x 1.25\n4006381333931  2 x 1.49\nTOTAL EUR 4.23\n"
        "Loyalty: 5901234123457\nVISA 4111 1111 1111 1111\n"
    )
    p = pipeline.process(
        Reading("pos", "pos.receipt_text", 1_767_225_600_000, {"register": "t1"}, text={"receipt": text})
    )
    assert p is not None
    assert p.data["items"] == [
        {"gtin": "5401234567898", "qty": 1, "price_cents": 125},
        {"gtin": "4006381333931", "qty": 2, "price_cents": 149},
    ]
    assert p.data["loyalty"].startswith("loy:")
    assert cards.cards_removed == 1
    assert "4111" not in repr(p.data)


# -- properties ---------------------------------------------------------------------------

NETWORK_SHAPES = st.sampled_from(ISSUED)
FORMS = st.sampled_from(["plain", "4s", "4d", "4.", "amex", "diners"])


def printed(number: str, form: str) -> str:
    if form == "plain":
        return number
    if form == "amex" and len(number) == 15:
        return f"{number[:4]} {number[4:10]} {number[10:]}"
    if form == "diners" and len(number) == 14:
        return f"{number[:4]}-{number[4:10]}-{number[10:]}"
    sep = {"4s": " ", "4d": "-", "4.": "."}.get(form, " ")
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


@settings(derandomize=True, max_examples=400, deadline=None)
@given(
    shape=NETWORK_SHAPES,
    seed=st.integers(0, 2**32),
    form=FORMS,
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    glue=st.sampled_from([" ", "\n", ": ", "(", "=", "^", "\x1d", ";"]),
)
def test_any_issued_pan_in_any_printed_form_inside_random_text_is_removed(  # noqa: PLR0917 - hypothesis arguments
    shape: tuple[str, str, int], seed: int, form: str, before: str, after: str, glue: str
) -> None:
    _, prefix, length = shape
    rng = random.Random(seed)
    number = luhn(prefix + "".join(str(rng.randrange(10)) for _ in range(length - 1 - len(prefix))))
    spelled = printed(number, form)
    out, n = scrub_cards(before + glue + spelled + glue + after)
    assert n >= 1
    assert number not in re.sub(r"[^0-9]", "", out.replace(before, "").replace(after, ""))


GS1_PREFIXES = [
    "00",
    "03",
    "06",
    "30",
    "37",
    "40",
    "44",
    "45",
    "49",
    "50",
    "54",
    "57",
    "59",
    "64",
    "69",
    "76",
    "80",
    "84",
    "87",
    "90",
    "93",
]


@settings(derandomize=True, max_examples=400, deadline=None)
@given(
    prefix=st.sampled_from(GS1_PREFIXES),
    rest=st.text(alphabet="0123456789", min_size=10, max_size=10),
    length=st.sampled_from([8, 12, 13]),
    sep=st.sampled_from([" ", "\t", "  "]),
    qty=st.integers(1, 999),
)
def test_valid_gtins_followed_by_quantities_survive(prefix: str, rest: str, length: int, sep: str, qty: int) -> None:
    code = gtin((prefix + rest)[: length - 1])
    line = f"{code}{sep}{qty} x 1.25"
    assert scrub_cards(line) == (line, 0)
    assert scrub_cards(code) == (code, 0)


def test_loyalty_ean13_through_the_stages_is_pseudonymized(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    g = next(x for x in (gtin(f"40{i:010d}") for i in range(1000)) if luhn_ok(x))
    cards = CardScrubStage()
    out = PrivacyStage(Pseudonymizer(Privacy(), keys, None))(
        cards(Reading("pos", "pos.receipt", 1, {}, {"loyalty": Ident("loyalty_id", g)}))
    )
    assert "loyalty" in out.data
    assert cards.cards_removed == 0


def test_gtin_fields_in_data_keep_their_codes() -> None:
    """An NFC Digital Link GTIN (zero-padded to 14) and a JSON receipt's item GTIN that are
    Luhn-valid stay: a product field is GS1 context (the previous scrub turned them to [card])."""
    g13 = next(x for x in (gtin(f"69{i:010d}") for i in range(1000)) if luhn_ok(x))
    g14 = next(x for x in ("0" + gtin(f"40{i:010d}") for i in range(1000)) if luhn_ok(x))
    stage = CardScrubStage()
    data = {"kind": "product", "gtin": g14, "items": [{"gtin": g13, "qty": 1, "price_cents": 125}]}
    r = Reading("nfc", "nfc.tap", 1, data)
    assert stage(r) is r
    assert stage.cards_removed == 0


# -- issuers outside the table (privacy first: at least doubtful, never a loyalty number) --

OUTSIDE_TABLE = [
    ("uzcard", "8600", 16),
    ("humo", "9860", 16),
    ("borica", "2205", 16),
    ("belkart", "9112", 16),
    ("china t-union", "31", 19),
    ("fuel / private label", "7", 16),
    ("fuel / private label", "7", 19),
    ("35xx below jcb", "3500", 16),
    ("35xx above jcb", "3590", 16),
]


def spaced(number: str) -> str:
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


@pytest.mark.parametrize(("issuer", "prefix", "length"), OUTSIDE_TABLE)
def test_cards_of_issuers_outside_the_table_are_scrubbed_plain_spaced_and_in_text(
    issuer: str, prefix: str, length: int
) -> None:
    """The review's regression: a Luhn-valid 15-19-digit number is a card whatever its range."""
    number = pan(prefix, length)
    assert len(number) == length
    assert card_kind(number) == DOUBTFUL, issuer
    assert scrub_cards(number) == ("[card]", 1)
    assert scrub_cards(spaced(number)) == ("[card]", 1)
    assert scrub_cards(f"Karte {number} ok") == ("Karte [card] ok", 1)
    assert scrub_cards(f"paid with {spaced(number)}, thank you") == ("paid with [card], thank you", 1)
    # GS1 labels and item-line shapes do not save it: no GTIN has 15-19 digits
    assert scrub_cards(f"EAN: {number}") == ("EAN: [card]", 1)
    assert scrub_cards(f"Loyalty: {number}") == ("Loyalty: [card]", 1)
    assert scrub_cards(f"{number} 1 x 1.25") == ("[card] 1 x 1.25", 1)
    assert holds_card(number)
    assert holds_card(spaced(number))


@pytest.mark.parametrize(("issuer", "prefix", "length"), OUTSIDE_TABLE)
def test_a_card_outside_the_table_given_as_loyalty_number_is_dropped_not_pseudonymized(
    issuer: str, prefix: str, length: int, tmp_path: Path
) -> None:
    """A hashed card number must never be stored: the card stage drops the identifier."""
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    number = pan(prefix, length)
    cards = CardScrubStage()
    privacy = PrivacyStage(Pseudonymizer(Privacy(), keys, None))
    for raw in (number, spaced(number)):
        out = privacy(cards(Reading("pos", "pos.receipt", 1, {}, {"loyalty": Ident("loyalty_id", raw)})))
        assert "loyalty" not in out.data, issuer
    assert cards.cards_removed == 2
    assert privacy.dropped["loyalty_id"] == 0  # never reached the pseudonymizer


@pytest.mark.parametrize(("prefix", "length"), [("0", 13), ("7", 13), ("8", 13), ("9", 14), ("0", 14)])
def test_13_and_14_digit_numbers_outside_the_table_are_scrubbed_unless_gtins_in_gs1_context(
    prefix: str, length: int
) -> None:
    """Luhn-valid 13/14 digits outside every range: a valid GTIN keeps its product and
    loyalty positions; anything else (free text, or not a valid GTIN) is a card."""
    both = next(x for x in (luhn(f"{prefix}{i:0{length - 2}d}") for i in range(1000)) if gtin_ok(x))
    card_only = next(x for x in (luhn(f"{prefix}{i:0{length - 2}d}") for i in range(1000)) if not gtin_ok(x))
    assert card_kind(both) == card_kind(card_only) == DOUBTFUL
    for kept in (both, f"{both} 2 x 1.49", f"EAN: {both}", f"Loyalty: {both}"):
        assert scrub_cards(kept) == (kept, 0), kept
    assert not holds_card(both)  # an EAN-13 / GTIN-14 loyalty number stays pseudonymizable
    for text in (f"Karte {both} ok", f"ref {card_only} ok"):
        assert scrub_cards(text)[1] == 1, text
    for text in (card_only, f"{card_only} 2 x 1.49", f"EAN: {card_only}", f"Loyalty: {card_only}"):
        assert scrub_cards(text)[1] == 1, text
    assert holds_card(card_only)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(body=st.text(alphabet="0123456789", min_size=14, max_size=18))
def test_every_luhn_valid_15_to_19_digit_number_is_a_card_wherever_it_stands(body: str) -> None:
    number = luhn(body)
    assert holds_card(number)
    for text in (number, f"EAN {number}", f"{number}  2", f"x {number} y"):
        assert scrub_cards(text)[1] == 1, text
