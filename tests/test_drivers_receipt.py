"""The default receipt parser: extracts items, total, currency, payment, receipt id and the
loyalty number (as an identifier); never copies free text (names, e-mail, phone, card
text) into data; never raises on garbage (hypothesis, derandomized)."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.pos.receipt import parse_receipt
from edge.events import Ident

DATA_KEYS = {"register", "receipt_id", "total_cents", "currency", "items", "payment"}

SAMPLE = """\
                FRESHMART
               Store #0042
      12 Market Street, Springfield
            Tel 0800 555 0100

Register: till-1               Cashier: 07
Receipt: 0042-01-000123
2026-01-01 10:15:03
------------------------------------------
OAT DRINK 1L
  4006381333931         2 x   1.49    2.98
DARK CHOC 85%
  4012345678902         1 x   2.19    2.19
BANANAS
  SKU 4011       0.732 kg x   1.99    1.46
------------------------------------------
SUBTOTAL                              6.63
TOTAL EUR                             6.63
  incl. VAT 7%                        0.43
Loyalty: 123456789012
Points earned: 6
VISA [card]                           6.63
CONTACTLESS
AUTH CODE 947821
Receipt sent to jane.doe@example.com
Delivery contact: +44 7700 900123

     Thank you for shopping with us!
"""


def test_sample_receipt_is_fully_structured() -> None:
    data, ids = parse_receipt(SAMPLE, "till-1")
    assert data == {
        "register": "till-1",
        "receipt_id": "0042-01-000123",
        "total_cents": 663,
        "currency": "EUR",
        "items": [
            {"gtin": "4006381333931", "qty": 2, "price_cents": 149},
            {"sku": "4012345678902", "qty": 1, "price_cents": 219},  # bad GTIN check digit: a SKU
            {"sku": "4011", "qty": 0.732, "price_cents": 199},
        ],
        "payment": "visa",
    }
    assert ids == {"loyalty": Ident("loyalty_id", "123456789012")}


def test_free_text_never_reaches_data() -> None:
    """Item names (with digits), the address, e-mail, phone, card text: none in data."""
    data, _ = parse_receipt(SAMPLE, "till-1")
    flat = repr(data)
    for needle in ("OAT", "85%", "Market", "jane", "@", "7700", "900123", "[card]", "947821", "0800"):
        assert needle not in flat


def test_other_layouts_cash_symbol_and_spaced_member_number() -> None:
    text = (
        "Bon-Nr: 7781\n"
        "PLU 4133  3 x 0,99\n"
        "ART 12345 1 @ 12,50\n"
        "TOTAL \u20ac 1.234,97\n"
        "Member No: 9123 4567 8901\n"
        "CASH 1,250.00\n"
    )
    data, ids = parse_receipt(text, "r2")
    assert data["items"] == [
        {"sku": "4133", "qty": 3, "price_cents": 99},
        {"sku": "12345", "qty": 1, "price_cents": 1250},
    ]
    assert (data["total_cents"], data["currency"], data["payment"]) == (123497, "EUR", "cash")
    assert ids == {"loyalty": Ident("loyalty_id", "912345678901")}
    assert data["receipt_id"] == "7781"


def test_unscrubbed_card_numbers_never_become_skus_or_receipt_ids() -> None:
    """Defence in depth: if a card number slipped past the scrubber, the parser drops it."""
    text = "Receipt: 4111111111111111\n4000056655665556  1 x 1.00\nTOTAL 1.00\n"
    data, _ = parse_receipt(text, "till-1")
    assert data["receipt_id"] is None
    assert data["items"] == [{"qty": 1, "price_cents": 100}]
    assert "4111" not in repr(data)
    assert "4000" not in repr(data)


def test_scrubbed_item_code_keeps_the_item_without_a_code() -> None:
    data, _ = parse_receipt("[card]  2 x 1.50\nTOTAL 3.00", "t")
    assert data["items"] == [{"qty": 2, "price_cents": 150}]
    assert data["payment"] is None


def test_receipt_sent_to_is_not_a_receipt_id_and_subtotal_is_not_the_total() -> None:
    data, _ = parse_receipt(
        "SUBTOTAL 9.99\nReceipt sent to a1@example.com\nTOTAL USD 10.49\nMASTER CARD\n", "t"
    )
    assert (data["receipt_id"], data["total_cents"], data["currency"], data["payment"]) == (
        None,
        1049,
        "USD",
        "mastercard",
    )


def test_empty_and_garbage_input_give_empty_fields() -> None:
    for text in ("", "TOTAL", "\x00\xff\ud800", "x" * 300_000, "1 x 1.00\n" * 10, "TOTAL 1.2.3.4"):
        data, ids = parse_receipt(text, "t")
        assert set(data) == DATA_KEYS
        assert data["total_cents"] is None
        assert data["items"] == []
        assert ids == {}


def test_item_count_is_bounded() -> None:
    data, _ = parse_receipt("4011  1 x 1.00\n" * 2000, "t")
    assert len(data["items"]) == 500


# -- fuzz -------------------------------------------------------------------------------

FRAGMENTS = [
    "TOTAL",
    "TOTAL EUR ",
    "SUBTOTAL ",
    "Loyalty: ",
    "Member #",
    "Receipt: ",
    "Rcpt #",
    "SKU ",
    "PLU ",
    " x ",
    " kg x ",
    " @ ",
    "VISA ",
    "CASH",
    "[card]",
    "\u20ac",
    "$",
    "\n",
    "  ",
    "4111111111111111",
    "4006381333931",
    "123456789012",
    "0.732",
    "1,49",
    "-",
    ".",
    ",",
    "99",
    "jane@example.com",
    "+44 7700 900123",
]
receipt_like = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8), st.from_regex(r"\d{1,20}", fullmatch=True)),
    max_size=60,
).map("".join)


def _strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in _strings(x)]
    return []


def _luhn(d: str) -> bool:
    t = 0
    for i, ch in enumerate(reversed(d)):
        x = int(ch) * (2 if i % 2 else 1)
        t += x - 9 if x > 9 else x
    return t % 10 == 0


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.one_of(st.text(), receipt_like))
def test_parser_never_raises_and_output_is_well_formed(text: str) -> None:
    data, ids = parse_receipt(text, "till-1")
    assert set(data) == DATA_KEYS
    assert data["register"] == "till-1"
    assert data["total_cents"] is None or isinstance(data["total_cents"], int)
    assert data["currency"] is None or re.fullmatch(r"[A-Z]{3}", data["currency"])
    assert data["payment"] is None or re.fullmatch(r"[a-z]+", data["payment"])
    assert data["receipt_id"] is None or re.fullmatch(r"[A-Za-z0-9/_-]{1,40}", data["receipt_id"])
    for it in data["items"]:
        assert set(it) <= {"gtin", "sku", "qty", "price_cents"}
        assert {"qty", "price_cents"} <= set(it)
        assert isinstance(it["qty"], int | float)
        assert isinstance(it["price_cents"], int)
    assert set(ids) <= {"loyalty"}
    for ident in ids.values():
        assert ident.cls == "loyalty_id"
        assert ident.raw.isdigit()
    for s in _strings({k: v for k, v in data.items() if k != "register"}):
        assert "@" not in s
        assert "[card]" not in s
        for run in re.findall(r"\d{15,19}", s):
            assert not _luhn(run)
