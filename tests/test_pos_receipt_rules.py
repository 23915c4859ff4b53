"""Receipt rules from the YAML: each field a regular expression with named groups; the
defaults read a typical receipt; custom rules read another layout; bad rules are config
errors naming the field; whatever a rule matches, the output stays sanitized (no card
numbers, short lowercase payment words, ISO currencies). JSON receipts are whitelisted
field by field. Link options (line settings, framing) are validated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.pos.config import PosLink, ReceiptRules
from drivers.pos.receipt import ReceiptParser, parse_receipt, receipt_parsers
from edge.clock import FakeClock
from edge.events import Ident, Reading
from edge.pipeline import NormalizeStage

NORDIC = """\
KVITTO 2026-0007
Mjolk 1l            EAN 7310865004703   1 st   12,90
Bananer             PLU 4011            3 st    4,50
ATT BETALA           SEK 26,40
Medlem 7001234567
Betalt med SWISH
"""
NORDIC_RULES = ReceiptRules(
    item=r"^.*?(?:EAN|(?P<kw>PLU))[ \t]+(?P<code>\d{4,14})[ \t]+(?P<qty>\d+)[ \t]+st[ \t]+(?P<price>\d+,\d{2})$",
    total=r"^ATT BETALA\b.*?(?P<amount>\d+,\d{2})$",
    loyalty=r"^Medlem[ \t]+(?P<number>\d{6,12})$",
    receipt_id=r"^KVITTO[ \t]+(?P<id>[\d-]+)$",
    payment=r"^Betalt med[ \t]+(?P<method>\w+)",
    payment_names={"swish": "mobile"},
    currency_default="SEK",
)


def test_custom_rules_read_another_layout() -> None:
    data, ids = ReceiptParser(NORDIC_RULES)(NORDIC, "kassa-1")
    assert data == {
        "register": "kassa-1",
        "receipt_id": "2026-0007",
        "total_cents": 2640,
        "currency": "SEK",
        "items": [
            {"gtin": "7310865004703", "qty": 1, "price_cents": 1290},
            {"sku": "4011", "qty": 3, "price_cents": 450},
        ],
        "payment": "mobile",
    }
    assert ids == {"loyalty": Ident("loyalty_id", "7001234567")}


def test_default_rules_do_not_read_the_other_layout_and_parsers_are_per_link() -> None:
    data, ids = parse_receipt(NORDIC, "kassa-1")
    assert (data["items"], data["total_cents"], ids) == ([], None, {})
    links = [PosLink(name="kassa-1", receipt=NORDIC_RULES), PosLink(name="till-1")]
    parsers = receipt_parsers(links)
    assert sorted(parsers) == ["kassa-1", "till-1"]
    assert parse_receipt(NORDIC, "kassa-1", parsers["kassa-1"])[0]["total_cents"] == 2640
    assert parse_receipt(NORDIC, "till-1", parsers["till-1"])[0]["total_cents"] is None


def test_currency_default_applies_only_when_a_total_names_none() -> None:
    p = ReceiptParser(ReceiptRules(currency_default="CHF"))
    assert p("TOTAL 3.00", "t")[0]["currency"] == "CHF"
    assert p("TOTAL EUR 3.00", "t")[0]["currency"] == "EUR"
    assert p("nothing", "t")[0]["currency"] is None


def test_amount_without_decimals_is_whole_units() -> None:
    p = ReceiptParser(ReceiptRules(total=r"^TOTAL JPY (?P<amount>[\d,]+)$", currency_default="JPY"))
    assert p("TOTAL JPY 1,200", "t")[0]["total_cents"] == 120000


@pytest.mark.parametrize(
    ("field", "pattern", "message"),
    [
        ("total", r"^TOTAL (\d+", "not a valid regular expression"),
        ("total", r"^TOTAL (?P<sum>\d+)", "needs the named group(s) amount"),
        ("item", r"(?P<price>\d+)(?P<name>\w+)", "unknown named group(s) name"),
        ("loyalty", r"Member (\d+)", "needs the named group(s) number"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_problem(field: str, pattern: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ReceiptRules.model_validate({field: pattern})
    assert err.value.errors()[0]["loc"] == (field,)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"payment_names": {"visa": "Visa Card"}}, "lowercase method names"),
        ({"currency_symbols": {"kr": "kronor"}}, "ISO 4217"),
        ({"currency_default": "eur"}, "ISO 4217"),
    ],
)
def test_bad_rule_tables_are_config_errors(rules: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ReceiptRules.model_validate(rules)


def test_loose_rules_still_cannot_leak_free_text_or_card_numbers() -> None:
    """Rules that match far too much: codes, ids and methods that are not clean are left
    out; a Luhn-valid card number never becomes a SKU or receipt id."""
    loose = ReceiptRules(
        item=r"^(?P<code>.+?) (?P<price>\d+\.\d\d)$",
        receipt_id=r"^ID (?P<id>.+)$",
        payment=r"^PAID (?P<method>.+)$",
    )
    text = "4111 1111 1111 1111 1.00\njane@example.com 2.00\n4111111111111111 3.00\nID jane doe\nPAID Visa 4111\n"
    data, _ = ReceiptParser(loose)(text, "t")
    assert data["items"] == [{"qty": 1, "price_cents": 100}, {"qty": 1, "price_cents": 200},
                             {"qty": 1, "price_cents": 300}]
    assert (data["receipt_id"], data["payment"]) == (None, None)


def test_json_receipts_are_whitelisted() -> None:
    p = ReceiptParser()
    obj = {
        "receipt_id": "R-9",
        "total": "12.50",
        "currency": "\u20ac",
        "payment": "MASTERCARD",
        "loyalty": "9123 4567 8901",
        "items": [
            {"gtin": "4006381333931", "qty": 2, "price_cents": 149},
            {"sku": 4011, "qty": "0.5", "price": 1.99},
            {"code": "4111111111111111", "price_cents": 10},  # a card number is no code
            {"name": "no price"},
            "junk",
        ],
        "customer_email": "jane@example.com",
    }
    data, ids = p.from_json(obj, "till-3")
    assert data == {
        "register": "till-3",
        "receipt_id": "R-9",
        "total_cents": 1250,
        "currency": "EUR",
        "items": [
            {"gtin": "4006381333931", "qty": 2, "price_cents": 149},
            {"sku": "4011", "qty": 0.5, "price_cents": 199},
            {"qty": 1, "price_cents": 10},
        ],
        "payment": "mastercard",
    }
    assert ids == {"loyalty": Ident("loyalty_id", "912345678901")}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=8,
)
receipt_keys = st.sampled_from(
    ["receipt_id", "total", "total_cents", "currency", "payment", "loyalty", "items", "gtin", "sku", "qty", "price"]
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.dictionaries(st.one_of(receipt_keys, st.text(max_size=8)), json_values, max_size=8))
def test_json_receipt_never_raises_and_is_well_formed(obj: dict[str, Any]) -> None:
    data, ids = ReceiptParser().from_json(obj, "t")
    assert set(data) == {"register", "receipt_id", "total_cents", "currency", "items", "payment"}
    assert data["total_cents"] is None or isinstance(data["total_cents"], int)
    assert data["currency"] is None or re.fullmatch(r"[A-Z]{3}", data["currency"])
    assert data["payment"] is None or re.fullmatch(r"[a-z_]+", data["payment"])
    for it in data["items"]:
        assert set(it) <= {"gtin", "sku", "qty", "price_cents"}
    assert set(ids) <= {"loyalty"}


# -- link options -----------------------------------------------------------------------


def test_link_defaults_and_line_settings() -> None:
    link = PosLink(name="t", backend="serial", port="/dev/ttyUSB0", framing="escpos")
    assert (link.bytesize, link.parity, link.stopbits, link.flow_control) == (8, "none", 1, "none")
    assert (link.text_encoding, link.terminator, link.max_frame, link.ack) == ("cp437", "\n", 65536, False)
    assert link.gap_s == 0.0
    lines = PosLink.model_validate(
        {"name": "t", "framing": "lines", "encoding": "latin-1", "max_frame": "4KiB", "receipt_gap": "500ms"}
    )
    assert (lines.text_encoding, lines.max_frame, lines.gap_s) == ("iso8859-1", 4096, 0.5)
    assert PosLink(name="t").gap_s == 2.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encoding": "utf-16"}, "not ASCII-compatible"),
        ({"encoding": "klingon"}, "unknown encoding"),
        ({"stopbits": 3}, "1, 1.5 or 2"),
        ({"bytesize": 9}, "bytesize"),
        ({"parity": "sometimes"}, "parity"),
        ({"flow_control": "both"}, "flow_control"),
        ({"terminator": ""}, "1 to 4 ASCII"),
        ({"max_frame": "32MiB"}, "between 64B and 16MiB"),
        ({"ack": True}, "stx_etx only"),
        ({"framing": "escpos", "receipt_end": "^END$"}, "lines only"),
        ({"receipt_end": "(["}, "not a valid regular expression"),
        ({"backend": "serial"}, "needs port"),
    ],
)
def test_bad_link_options_are_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        PosLink.model_validate({"name": "t", **options})


def test_store_yaml_shows_the_default_rules_for_every_link() -> None:
    """config/store.yaml documents the rules by spelling out the defaults: they must not
    drift from the code."""
    raw = yaml.safe_load(Path("config/store.yaml").read_text(encoding="utf-8"))
    links = [PosLink.model_validate(x) for x in raw["drivers"]["pos"]]
    assert links
    assert all(link.receipt == ReceiptRules() for link in links)


def test_the_pipeline_parses_text_receipts_with_their_links_rules() -> None:
    """NormalizeStage picks the parser of the reading's link (`register`); other links keep the defaults."""
    german = PosLink(name="kasse-1", receipt=ReceiptRules(total=r"^SUMME\s+EUR\s+(?P<amount>\d+,\d{2})"))
    stage = NormalizeStage(FakeClock(), receipt_parsers([german, PosLink(name="till-2")]))
    text = "Bon-Nr: 7\nSUMME EUR 12,34\n"

    def total(register: str) -> Any:
        r = Reading("pos", "pos.receipt_text", 1_767_225_600_000, {"register": register}, text={"receipt": text})
        return stage(r).data.get("total_cents")

    assert total("kasse-1") == 1234
    assert total("till-2") is None  # the default rules look for TOTAL, not SUMME
