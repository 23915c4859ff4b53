"""The pipeline's privacy stages: no card number past the first, no raw identifier past the last."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edge.clock import FakeClock
from edge.config import ClassPolicy, Privacy
from edge.events import Ident, Pending, Reading
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import CardScrubStage, PrivacyStage

CARD = "4111111111111111"
CARD_SPACED = "4111 1111 1111 1111"
MAC = "aa:bb:cc:dd:ee:ff"


@pytest.fixture
def pz(tmp_path: Path) -> Pseudonymizer:
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    return Pseudonymizer(Privacy(), keys, None)


def test_card_scrub_leaves_clean_readings_untouched() -> None:
    """Fast path: nothing to scrub, the very same Reading comes back."""
    stage = CardScrubStage()
    r = Reading(
        "ble",
        "presence.seen",
        1,
        data={"rssi": -60, "name": "Shelf 12"},
        ids={"device": Ident("ble_address", MAC)},
    )
    assert stage(r) is r
    assert stage.cards_removed == 0


def test_card_scrub_covers_text_data_and_ids() -> None:
    stage = CardScrubStage()
    r = Reading(
        "pos",
        "pos.receipt",
        1,
        data={
            "note": f"paid with {CARD_SPACED}",
            "lines": [{"sku": "4006381333931", "memo": f"ref {CARD}"}, "plain", 3],
            "raw": f"\x02{CARD}\x03".encode(),
            "tags": ("a", f"x{CARD}x"),
            "total": 1299,
        },
        ids={"card": Ident("card_number", CARD), "loyalty": Ident("loyalty_id", "LOY12345")},
        text={"receipt": f"VISA {CARD_SPACED}\nTotal 12,99", "footer": "Danke"},
    )
    out = stage(r)
    assert out.text == {"receipt": "VISA [card]\nTotal 12,99", "footer": "Danke"}
    assert out.data == {
        "note": "paid with [card]",
        "lines": [{"sku": "4006381333931", "memo": "ref [card]"}, "plain", 3],
        "raw": b"\x02[card]\x03",
        "tags": ("a", "x[card]x"),
        "total": 1299,
    }
    assert list(out.ids) == ["loyalty"]
    assert stage.cards_removed == 6
    assert r.data["note"] == f"paid with {CARD_SPACED}"  # the input is not mutated


@pytest.mark.parametrize(
    ("cls", "raw"),
    [
        ("loyalty_id", CARD),
        ("loyalty_id", "4111.1111.1111.1111"),
        ("loyalty_id", "4111  1111  1111  1111"),
        ("loyalty_id", "\uff14" + "\uff11" * 15),  # full-width digits
        ("loyalty_id", f"member {CARD} 2"),
        ("phone", "4111 1111 1111 1111"),
        ("email", f"{CARD}@example.org"),
    ],
)
def test_a_card_number_given_as_another_identifier_is_dropped(cls: Any, raw: str, pz: Pseudonymizer) -> None:
    """A card swiped where a loyalty number was expected (a JSON POS field, an NFC loyalty
    rule, a customer rule) is never pseudonymized: card numbers are not stored, not even hashed."""
    cards = CardScrubStage()
    r = Reading("pos", "pos.receipt", 1, {"total_cents": 100}, {"loyalty": Ident(cls, raw)})
    out = PrivacyStage(pz)(cards(r))
    assert out.data == {"total_cents": 100}
    assert cards.cards_removed == 1


@pytest.mark.parametrize(
    ("cls", "raw"),
    [
        ("loyalty_id", "4006381333931"),  # 13 digits, not Luhn-valid
        ("loyalty_id", "LOY-1234-5678-9012"),  # 12 digits
        ("phone", "+49 30 1234567"),
        ("phone", "+49 157 36625851"),  # 13 digits and Luhn-valid, but a phone number by its "+"
        ("phone", "0049 157 36625 00"),  # Luhn-valid digits too
        ("phone", "(0157) 366258505"),  # Luhn-valid digits too
        ("nfc_uid", "04123456789012"),  # a hardware id: digits only, and Luhn-valid; not a card
        ("ble_address", MAC),
    ],
)
def test_other_identifiers_are_kept_for_pseudonymization(cls: Any, raw: str, pz: Pseudonymizer) -> None:
    cards = CardScrubStage()
    r = Reading("pos", "pos.receipt", 1, {}, {"who": Ident(cls, raw)})
    assert cards(r) is r  # on to the privacy stage and its policy for the class
    assert cards.cards_removed == 0


def test_card_scrub_replaces_containers_nested_too_deep() -> None:
    """Data nested deeper than the scan bound is not passed on unscanned."""
    stage = CardScrubStage()
    deep: dict[str, Any] = {"a": {"b": {"c": {"d": {"card": CARD}}}}}
    out = stage(Reading("pos", "pos.x", 1, data=deep))
    assert CARD not in json.dumps(out.data)
    assert stage.too_deep == 1
    shallow = {"a": {"b": {"c": ["ok"]}}}
    assert stage(Reading("pos", "pos.x", 1, data=shallow)).data == shallow


def test_privacy_stage_pseudonymizes_and_drops(pz: Pseudonymizer) -> None:
    stage = PrivacyStage(pz)
    r = Reading(
        "nfc",
        "nfc.tap",
        1_767_225_600_123,
        data={"reader": "door", "customer_email": "placeholder"},
        ids={
            "device": Ident("ble_address", MAC),
            "customer_email": Ident("email", "anna@example.com"),
            "card": Ident("card_number", CARD),
        },
        text={"comment": "call me at +49 30 1234567 or anna@example.com"},
    )
    p = stage(r)
    assert isinstance(p, Pending)
    assert (p.ts, p.src, p.type) == (1_767_225_600_123, "nfc", "nfc.tap")
    assert set(p.data) == {"reader", "device", "comment"}
    assert re.fullmatch(r"ble:e1:[a-z2-7]{26}", p.data["device"])
    assert p.data["comment"] == "call me at [phone] or [email]"
    assert stage.dropped == {"email": 1, "card_number": 1}
    wire = json.dumps(p.data)
    for raw in (MAC, "AABBCCDDEEFF", "anna@example.com", "1234567", CARD):
        assert raw not in wire


def test_privacy_stage_same_identifier_same_field_value(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    policy = Privacy(classes={"email": ClassPolicy(policy="ephemeral")})
    stage = PrivacyStage(Pseudonymizer(policy, keys, None))
    a = stage(Reading("pos", "pos.receipt", 1, ids={"who": Ident("email", "Anna@Example.com")}))
    b = stage(Reading("pos", "pos.receipt", 2, text={"t": "mail anna@example.com"}))
    assert b.data["t"] == f"mail {a.data['who']}"
