"""Free-text scrubbing: card numbers, e-mails, phone numbers; identifier patterns for logs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import FakeClock
from edge.config import ClassPolicy, Privacy
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.scrub import (
    IDENTIFIER_PATTERNS,
    holds_card,
    looks_personal,
    luhn_ok,
    redact_identifiers,
    scrub_cards,
    scrub_text,
)

# Luhn-valid test card numbers (issuers' published test numbers and constructed ones)
CARDS = {
    13: "4222222222222",
    15: "378282246310005",
    16: "4111111111111111",
    19: "6220000000000000008",
}
MORE_CARDS = ["5555555555554444", "4012888888881881", "6011111111111117", "4000000000000000006"]
GTIN_NOT_LUHN = "4006381333931"  # valid EAN-13 check digit, fails Luhn: must stay
GTIN_AND_LUHN = "5901234123457"  # valid EAN-13 that passes Luhn too (a doubtful 13-digit Maestro shape)
NOT_LUHN_16 = "4111111111111112"


def grouped(num: str, sep: str, size: int = 4) -> str:
    return sep.join(num[i : i + size] for i in range(0, len(num), size))


@pytest.mark.parametrize("length", sorted(CARDS))
@pytest.mark.parametrize("sep", ["", " ", "-"])
def test_card_numbers_of_every_length_and_separator_are_scrubbed(length: int, sep: str) -> None:
    card = grouped(CARDS[length], sep)
    text = f"VISA {card} approved"
    assert scrub_cards(text) == ("VISA [card] approved", 1)


@pytest.mark.parametrize("card", MORE_CARDS)
def test_more_card_numbers(card: str) -> None:
    assert scrub_cards(f"x{card}x") == ("x[card]x", 1)
    assert scrub_cards(grouped(card, " ")) == ("[card]", 1)


def test_mixed_single_separators_are_one_card() -> None:
    assert scrub_cards("4111-1111 1111-1111") == ("[card]", 1)


def test_luhn_invalid_digit_runs_stay() -> None:
    for text in [NOT_LUHN_16, grouped(NOT_LUHN_16, " "), f"EAN {GTIN_NOT_LUHN} Milch 1,29", "123456789012"]:
        assert scrub_cards(text) == (text, 0)


def test_gtin_check_digit_differs_from_luhn() -> None:
    """EAN-13 is not Luhn: a GTIN failing Luhn stays; a Luhn-valid GTIN-13 (a doubtful
    13-digit card shape) stays where products stand (alone) and goes in free text."""
    assert not luhn_ok(GTIN_NOT_LUHN)
    assert luhn_ok(GTIN_AND_LUHN)
    assert scrub_cards(GTIN_NOT_LUHN) == (GTIN_NOT_LUHN, 0)
    assert scrub_cards(GTIN_AND_LUHN) == (GTIN_AND_LUHN, 0)
    assert scrub_cards(f"ref {GTIN_AND_LUHN} ok") == ("ref [card] ok", 1)


def test_card_next_to_other_numbers_is_found() -> None:
    """A quantity or a second card in the same digit run does not hide a card."""
    assert scrub_cards("2 4111 1111 1111 1111") == ("2 [card]", 1)
    assert scrub_cards("4111111111111111 2") == ("[card] 2", 1)
    # a quantity after a card is no part of it (a 16-digit group and a 1-digit group)
    assert scrub_cards("4111111111111111 3") == ("[card] 3", 1)
    assert scrub_cards("4111111111111111 5555555555554444") == ("[card] [card]", 2)
    assert scrub_cards("Karte: 4111111111111111, Betrag 12,00") == ("Karte: [card], Betrag 12,00", 1)


def test_dots_and_double_spaces_join_card_groupings_only() -> None:
    """Dotted and double-spaced cards are scrubbed; receipt columns ("12.99  3.49") never join."""
    for text in ("4111  1111  1111  1111", "4111.1111.1111.1111", "3782.822463.10005"):
        assert scrub_cards(text) == ("[card]", 1)
    for text in ("12.99  3.49  45.00  2.10  7.77", "4111.11 1111.11 1111.11", "1234.5678  9012.3456"):
        assert scrub_cards(text) == (text, 0)


@pytest.mark.parametrize(
    "spelling",
    [
        "4111\t1111\t1111\t1111",
        "4111\u00a01111\u00a01111\u00a01111",  # no-break spaces
        "4111\u202f1111\u202f1111\u202f1111",  # narrow no-break spaces
        "4111 - 1111 - 1111 - 1111",
        "4111\u20131111\u20131111\u20131111",  # en dashes
        "4111 \u2013 1111 \u2013 1111 \u2013 1111",
        "\uff14\uff11\uff11\uff11\uff0d" + "\uff11" * 4 + "\u3000" + "\uff11" * 4 + "\u2212" + "\uff11" * 4,
        "\uff14" + "\uff11" * 15,  # full-width digits
    ],
)
def test_cards_with_other_single_separators_and_wide_digits_are_scrubbed(spelling: str) -> None:
    assert scrub_cards(f"Karte {spelling} ok") == ("Karte [card] ok", 1)
    assert redact_identifiers(f"Karte {spelling} ok") == "Karte [redacted:card] ok"


@pytest.mark.parametrize(
    ("value", "card"),
    [
        ("4111111111111111", True),
        ("4111.1111.1111.1111", True),
        ("4111 / 1111 / 1111 / 1111", True),
        ("Member no: 4111  1111  1111  1111", True),
        ("loyalty 12 then 4111111111111111", True),  # 18 digits overall, not Luhn; holds one
        ("4006381333931", False),
        ("LOY-1234-5678-9012", False),
        ("", False),
    ],
)
def test_holds_card_reads_all_digits_of_an_identifier(value: str, card: bool) -> None:
    assert holds_card(value) is card


def test_short_text_is_returned_unchanged() -> None:
    s = "Total 12.99"
    out, n = scrub_cards(s)
    assert out is s
    assert n == 0


def test_long_hostile_input_is_linear() -> None:
    """No catastrophic backtracking on digit or separator soup."""
    inputs = [
        "1" * 200_000,
        "1 " * 100_000,
        "1-" * 100_000,
        "a" * 100_000 + "@",
        "0 " * 100_000,
        "+" * 100_000,
        "1." * 100_000,
        "4 " * 100_000,
        "41  " * 50_000,
        "4111." * 40_000,
    ]
    start = time.monotonic()
    for s in inputs:
        scrub_cards(s)
        redact_identifiers(s)
    assert time.monotonic() - start < 20.0


@pytest.fixture
def pz_drop(tmp_path: Path) -> Pseudonymizer:
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    return Pseudonymizer(Privacy(), keys, None)  # default: e-mail and phone dropped


@pytest.fixture
def pz_eph(tmp_path: Path) -> Pseudonymizer:
    keys = KeyStore(tmp_path / "keys2", FakeClock())
    keys.init()
    policy = Privacy(
        classes={"email": ClassPolicy(policy="ephemeral"), "phone": ClassPolicy(policy="ephemeral")}
    )
    return Pseudonymizer(policy, keys, None)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Mail: anna.muster@example.com danke", "Mail: [email] danke"),
        ("<Max+shop@mail.example.co.uk>", "<[email]>"),
        ("Tel +49 30 1234567.", "Tel [phone]."),
        ("Tel 0049 30 1234567", "Tel [phone]"),
        ("Tel 030 1234567", "Tel [phone]"),
        ("Tel 030/1234567-0", "Tel [phone]"),
        ("Tel +49 (0)30 123 45 67", "Tel [phone]"),
        ("(030) 1234567", "[phone]"),
        ("01-1-00 0000", "[phone]"),  # date-like start, but the number goes on
        ("Karte 4111 1111 1111 1111 Tel 0301234567", "Karte [card] Tel [phone]"),
    ],
)
def test_scrub_text_drops_contact_data(pz_drop: Pseudonymizer, text: str, want: str) -> None:
    assert scrub_text(text, pz_drop) == want


@pytest.mark.parametrize(
    "text",
    [
        "Datum 01.02.2026 10:30",
        "Datum 01-02-2026",
        "Datum 31/12/26",
        "01/02/2026 10:30 Kasse 3",
        "Summe 0,99 EUR",
        "Bon 1234",
        "MwSt 19% 12.34",
        "Filiale 0815",
        f"EAN {GTIN_NOT_LUHN}",
    ],
)
def test_scrub_text_leaves_ordinary_receipt_text(pz_drop: Pseudonymizer, text: str) -> None:
    assert scrub_text(text, pz_drop) == text


def test_scrub_text_uses_pseudonyms_when_policy_keeps_them(pz_eph: Pseudonymizer) -> None:
    """One pseudonym per address, whatever the spelling in the text."""
    out = scrub_text("a Anna@Example.com b anna@example.com c +49 30 1234567 d 0049-30-1234567", pz_eph)
    m = re.fullmatch(
        r"a (mail:e1:[a-z2-7]{26}) b (mail:e1:[a-z2-7]{26}) c (tel:e1:[a-z2-7]{26}) d (tel:e1:\S+)", out
    )
    assert m, out
    assert m.group(1) == m.group(2)
    assert m.group(3) == m.group(4)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("aa:bb:cc:dd:ee:ff", "mac"),
        ("AA-BB-CC-DD-EE-FF", "mac"),
        ("Aa:bB:00:11:22:33", "mac"),
        ("aabb.ccdd.eeff", "mac"),
        ("04:A2:3B:1C:5D:80:00", "nfc_uid"),
        ("04-a2-3b-1c-5d-80-00-11-22-33", "nfc_uid"),
        ("4111 1111 1111 1111", "card"),
        ("4111111111111112", "card"),  # logs: no Luhn check
        ("x@example.org", "email"),
        ("+49 30 1234567", "phone"),
    ],
)
def test_identifier_patterns_match_identifier_shapes(text: str, kind: str) -> None:
    assert IDENTIFIER_PATTERNS[kind].search(text)
    assert redact_identifiers(f"id {text};") == f"id [redacted:{kind}];"


@pytest.mark.parametrize(
    "text",
    ["connected", "seq=42 kid=21fe31dfa154a261", "10:30:00", "2026-01-01T00:00:00Z", "v1.2.3", "aa:bb:cc"],
)
def test_identifier_patterns_leave_ordinary_log_text(text: str) -> None:
    assert redact_identifiers(text) == text


# -- fuzz ---------------------------------------------------------------------------------

_luhn_cards = st.sampled_from([*CARDS.values(), *MORE_CARDS])
_boundary = st.sampled_from([" ", "-", "\n", ":", "x", "(", "/", " - "])


@st.composite
def card_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """(digits, spelling in groups of 2-8 digits with random single space/dash separators)."""
    card = draw(_luhn_cards)
    sizes: list[int] = []
    while sum(sizes) < len(card):
        sizes.append(min(draw(st.integers(2, 8)), len(card) - sum(sizes)))
    groups, at = [], 0
    for n in sizes:
        groups.append(card[at : at + n])
        at += n
    seps = draw(st.lists(st.sampled_from([" ", "-"]), min_size=len(groups) - 1, max_size=len(groups) - 1))
    return card, groups[0] + "".join(s + g for s, g in zip(seps, groups[1:], strict=True))


@settings(derandomize=True, max_examples=400, deadline=None)
@given(
    prefix=st.text(max_size=40),
    card=card_spellings(),
    b1=_boundary,
    b2=_boundary,
    suffix=st.text(max_size=40),
)
def test_fuzz_no_card_survives(prefix: str, card: tuple[str, str], b1: str, b2: str, suffix: str) -> None:
    """Whatever surrounds a Luhn-valid card number (not glued digit-to-digit), it is gone."""
    digits, spelled = card
    out, n = scrub_cards(prefix + b1 + spelled + b2 + suffix)
    assert n >= 1
    assert digits not in re.sub(r"[ -]", "", out)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_scrubbers_never_raise(pz_fuzz: Pseudonymizer, text: str) -> None:
    out, n = scrub_cards(text)
    assert n >= 0
    assert isinstance(out, str)
    assert isinstance(scrub_text(text, pz_fuzz), str)
    assert isinstance(redact_identifiers(text), str)


_safe_text = st.text(alphabet=st.characters(categories=["Lu", "Ll", "Zs"]), max_size=30)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(prefix=_safe_text, email=st.emails(), suffix=_safe_text)
def test_fuzz_no_email_survives(pz_fuzz: Pseudonymizer, prefix: str, email: str, suffix: str) -> None:
    out = scrub_text(f"{prefix} {email} {suffix}", pz_fuzz)
    assert email not in out
    assert email.lower() not in out.lower()


@st.composite
def phones(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["+", "00", "0"]))
    first = draw(st.sampled_from("123456789"))
    rest = draw(st.text(alphabet="0123456789", min_size=7, max_size=11))
    seps = draw(st.lists(st.sampled_from(["", "", " ", "-", "/"]), min_size=len(rest), max_size=len(rest)))
    return prefix + first + "".join(s + d for s, d in zip(seps, rest, strict=True))


@settings(derandomize=True, max_examples=200, deadline=None)
@given(prefix=_safe_text, phone=phones(), suffix=_safe_text)
def test_fuzz_no_phone_survives(pz_fuzz: Pseudonymizer, prefix: str, phone: str, suffix: str) -> None:
    out = scrub_text(f"{prefix} {phone} {suffix}", pz_fuzz)
    digits = re.sub(r"[^0-9]", "", phone)
    assert digits not in re.sub(r"[^0-9]", "", out)


@pytest.fixture(scope="module")
def pz_fuzz(tmp_path_factory: pytest.TempPathFactory) -> Pseudonymizer:
    """Drop-by-default pseudonymizer shared by fuzz examples."""
    keys = KeyStore(tmp_path_factory.mktemp("scrubkeys") / "keys", FakeClock())
    keys.init()
    return Pseudonymizer(Privacy(), keys, None)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Type2Tag 'NXP NTAG215' ID=04A1B2C3D4E5F6", "tag_id"),
        ("Type1Tag ID=A1B2C3D4", "tag_id"),  # a 4-byte UID
        ("Type3Tag IDm=01010501B00AC30B", "tag_id"),
        ("uid 04a1b2c3d4e5f6a7b8c9 read", "tag_id"),
        ("uid 0x04a1b2c3d4e5f6 read", "tag_id"),
        ("mac AABBCCDDEEFF seen", "hex_id"),
        ("tag 04a1b2c3d4e5f6 seen", "hex_id"),
        ("read 0x04a1b2c3 ok", "hex_id"),
        ("uid 04 a1 b2 c3 d4 e5 f6 read", "hex_bytes"),
        ("got b'\\x04\\xa1B\\xc3' from reader", "bytes"),
        ("got b'\\x04\\xa1" + "\\x00" * 300 + "' from reader", "bytes"),  # long: no cap
        ("cut b'\\x04\\xa1\\xb2", "bytes"),  # no closing quote
    ],
)
def test_separatorless_hex_ids_dumps_and_bytes_literals_are_redacted(text: str, kind: str) -> None:
    out = redact_identifiers(text)
    assert f"[redacted:{kind}]" in out
    assert not re.search(r"(?i)04A1B2|AABBCC|A1B2C3D4|B00AC30B|a1 b2 c3|xa1", out)


@pytest.mark.parametrize(
    "text",
    [
        "batch 3f9a1c0e2b7d4c5a9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d",  # a hash
        "batch_id 550e8400-e29b-41d4-a716-44665544abcd",  # UUID pieces stay
        "events 123456789012 bytes 52428800",  # all-digit runs under 13 digits are numbers
        "kid 21fe31dfa154a261",
        "ble:e3:abcdefghijklmnopqrstuvwxyz",  # a pseudonym
        "lat 12 34 56 78 90 12",  # numbers in a list, not a hex dump
        "from 2026-01-01 - 2026-01-31",
        "ids 1000000 - 2000000 and 1000000\t2000001",  # ranges stay (the card pre-pass checks Luhn)
        "last id 1000000 with uid 1000",
    ],
)
def test_long_hex_tokens_and_numbers_stay_in_logs(text: str) -> None:
    assert redact_identifiers(text) == text


def test_bluez_object_paths_lose_the_address_in_logs() -> None:
    """bleak and dbus-fast name devices by D-Bus path: dev_ plus the address with underscores."""
    assert redact_identifiers("/org/bluez/hci0/dev_D4_21_8B_70_F3_5C") == "/org/bluez/hci0/dev_[redacted:mac]"


@pytest.mark.parametrize(
    ("value", "personal"),
    [
        ("+49 30 1234567", True),
        ("jane@example.org", True),
        ("4111 1111 1111 1111", True),
        ("dev_D4_21_8B_70_F3_5C", True),
        ("4006381333931", False),  # a GTIN (Luhn-invalid, not a phone shape)
        ("LOT-2026-11", False),
        ("SKU-99812", False),
    ],
)
def test_looks_personal_flags_identifier_shapes_not_product_codes(value: str, personal: bool) -> None:
    assert looks_personal(value) is personal
