"""NFC tap parsing without a reader: GS1 Digital Link, NDEF records, kind rules, the tap
builder and the debouncer. Garbage never raises anything but the documented error types
(derandomized fuzzing), and no raw UID, loyalty number or tag content reaches data or logs."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import ndef
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from drivers.nfc.config import Nfc, NfcRule
from drivers.nfc.gs1 import DigitalLink, Gs1Error, parse_digital_link
from drivers.nfc.ndef import NdefError, NdefRecord, parse_ndef
from drivers.nfc.rules import Classifier
from drivers.nfc.tap import Debouncer, TagRead, TapBuilder
from edge.clock import FakeClock
from edge.config import Privacy
from edge.events import Ident
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import CardScrubStage, PrivacyStage

FUZZ = settings(derandomize=True, max_examples=400, deadline=None)
UID = bytes.fromhex("04A1B2C3D4E5F6")
UID_HEX = "04A1B2C3D4E5F6"
LOYALTY = "987654321098"
CLUB = "https://club.acme-retail.example/card/"


def msg(*records: Any) -> bytes:
    return b"".join(ndef.message_encoder(list(records)))


def rules(*extra: dict[str, Any]) -> list[NfcRule]:
    return [NfcRule(name="gs1", kind="product", gs1_digital_link=True), *(NfcRule(**r) for r in extra)]


# -- GS1 Digital Link ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://id.gs1.org/01/09506000134352", DigitalLink("09506000134352")),
        ("https://id.gs1.org/01/09506000134352/10/ABC123/21/12345", DigitalLink("09506000134352", "ABC123", "12345")),
        ("https://example.com/01/9506000134352/21/XYZ", DigitalLink("09506000134352", None, "XYZ")),  # GTIN-13
        ("https://example.com/01/614141999996/10/L1", DigitalLink("00614141999996", "L1")),  # GTIN-12
        ("https://example.com/01/95012346", DigitalLink("00000095012346")),  # GTIN-8
        ("HTTP://shop.example/some/prefix/01/09506000134352/10/A%2FB?17=261231#x",
         DigitalLink("09506000134352", "A/B")),
        ("https://brand.example/gtin/09506000134352/lot/B-7/ser/000042/",
         DigitalLink("09506000134352", "B-7", "000042")),
        ("https://id.gs1.org/01/09506000134352/22/2A/10/ABC", DigitalLink("09506000134352", "ABC")),
    ],
)
def test_digital_links_give_gtin14_batch_and_serial(uri: str, expected: DigitalLink) -> None:
    """Long and short key names, any host and path prefix, GTIN-8/12/13/14 padded to 14,
    percent-decoded qualifiers; query and fragment ignored."""
    assert parse_digital_link(uri) == expected


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://id.gs1.org/01/09506000134353", "check_digit"),
        ("https://id.gs1.org/01/950600013435", "check_digit"),
        ("https://id.gs1.org/01/9506000134", "gtin_length"),
        ("https://id.gs1.org/01/09506000134352/21/1/10/A", "qualifier"),  # out of GS1's order
        ("https://id.gs1.org/01/09506000134352/10/A/10/B", "qualifier"),
        ("https://id.gs1.org/01/09506000134352/99/A", "qualifier"),
        ("https://id.gs1.org/01/09506000134352/10", "qualifier"),
        ("https://id.gs1.org/01/09506000134352/10/" + "A" * 21, "batch"),
        ("https://id.gs1.org/01/09506000134352/21/%C3%A9", "serial"),
        ("https://id.gs1.org/01/09506000134352/21/a b", "serial"),
    ],
)
def test_invalid_digital_links_raise_gs1_error_with_reason(uri: str, reason: str) -> None:
    """A URI shaped like a Digital Link that fails a check is an error with a reason."""
    with pytest.raises(Gs1Error) as err:
        parse_digital_link(uri)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "uri",
    [
        "https://blog.example/2024/01/15/post",
        "https://id.gs1.org/",
        "https://id.gs1.org/01/",
        "ftp://id.gs1.org/01/09506000134352",
        "urn:epc:id:sgtin:0614141.812345.6789",
        "tel:+4930123456",
        "https://example.com/01/095060001343\u0665\u0662",  # Arabic-Indic digits are not digits here
        "",
    ],
)
def test_other_uris_are_not_digital_links(uri: str) -> None:
    assert parse_digital_link(uri) is None


_SEGMENT = st.sampled_from(["01", "gtin", "10", "lot", "21", "ser", "22", "", "%", "%zz", "%C3"]) | st.text(
    max_size=16
)


@FUZZ
@given(st.lists(_SEGMENT, max_size=8), st.sampled_from(["https://h.example/", "http://x/", "https://", "x:/"]))
def test_fuzz_digital_link_raises_only_gs1_error(segments: list[str], base: str) -> None:
    """Whatever the path: None, a DigitalLink with a valid GTIN-14, or Gs1Error."""
    try:
        link = parse_digital_link(base + "/".join(segments))
    except Gs1Error:
        return
    if link is not None:
        assert re.fullmatch(r"\d{14}", link.gtin)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_digital_link_on_any_text(text: str) -> None:
    with contextlib.suppress(Gs1Error):
        parse_digital_link(text)


# -- NDEF ---------------------------------------------------------------------------------


def test_ndef_record_kinds_and_shape_only_summaries() -> None:
    """URI, Text, Smart Poster, MIME, external and empty records decode; summaries give
    the shape (scheme, language, length, MIME type, size), never the content."""
    octets = msg(
        ndef.UriRecord(CLUB + LOYALTY),
        ndef.TextRecord("Jane Doe jane@example.com", "en"),
        ndef.SmartposterRecord("https://acme.example/offer", title="Offer"),
        ndef.Record("application/vnd.acme.loyalty", None, LOYALTY.encode()),
        ndef.Record("urn:nfc:ext:acme.example:member", None, b"\x01\x02"),
        ndef.Record(),
    )
    records = parse_ndef(octets)
    assert [r.kind for r in records] == ["uri", "text", "smartposter", "mime", "external", "empty"]
    assert records[0].uri == CLUB + LOYALTY
    assert (records[1].text, records[1].lang) == ("Jane Doe jane@example.com", "en")
    assert (records[2].uri, records[2].text) == ("https://acme.example/offer", "Offer")
    assert (records[3].type_name, records[3].payload) == ("application/vnd.acme.loyalty", LOYALTY.encode())
    assert [r.summary() for r in records] == [
        {"type": "uri", "scheme": "https"},
        {"type": "text", "lang": "en", "chars": 25},
        {"type": "smartposter", "scheme": "https"},
        {"type": "mime", "mime": "application/vnd.acme.loyalty", "bytes": 12},
        {"type": "external", "name": "acme.example:member", "bytes": 2},
        {"type": "empty"},
    ]
    assert LOYALTY not in repr(records)
    assert "jane" not in repr(records)


def test_empty_octets_are_no_records() -> None:
    assert parse_ndef(b"") == ()


@pytest.mark.parametrize(
    ("octets", "reason"),
    [
        (b"\xd1\x01\xffU\x04example.com/x", "malformed"),  # payload length beyond the data
        (b"\x11\x01\x01U\x04", "malformed"),  # MB flag missing
        (b"\xd1\x01\x03U\x04\xff\xfe", "malformed"),  # URI not UTF-8
        (b"\xd1\x01\x02T\x3f", "malformed"),  # text record with a language length beyond it
        (b"\xff" * 10, "malformed"),
        (b"\x90\x00\x00" + b"\x10\x00\x00" * 64 + b"\x50\x00\x00", "too_many_records"),
        (b"\x00" * (64 * 1024 + 1), "too_large"),
    ],
)
def test_malformed_ndef_raises_ndef_error_with_reason(octets: bytes, reason: str) -> None:
    with pytest.raises(NdefError) as err:
        parse_ndef(octets)
    assert err.value.reason == reason


_VALID = [
    msg(ndef.UriRecord("https://id.gs1.org/01/09506000134352/10/ABC")),
    msg(ndef.TextRecord("hello", "de"), ndef.UriRecord(CLUB + LOYALTY)),
    msg(ndef.SmartposterRecord("https://acme.example", title={"en": "a", "de": "b"}, action="exec")),
    msg(ndef.Record("text/plain", "id", b"x" * 300)),
]


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_ndef_garbage_raises_only_ndef_error(octets: bytes) -> None:
    with contextlib.suppress(NdefError):
        parse_ndef(octets)


@FUZZ
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))
def test_fuzz_ndef_mutated_messages_raise_only_ndef_error(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    """Valid messages with bytes changed and cut short: records or NdefError, nothing else."""
    b = bytearray(base)
    for pos, val in flips:
        b[pos % len(b)] = val
    try:
        records = parse_ndef(bytes(b[: max(1, len(b) - cut % len(b))]))
    except NdefError:
        return
    for r in records:
        r.summary()


def test_type_names_that_could_carry_a_number_of_a_person_are_not_summarized() -> None:
    """Whoever wrote the tag chose its type names: one holding a phone number, e-mail or a
    long digit run is reported as "?" (the shape stays, the content never reaches data)."""
    records = parse_ndef(
        msg(
            ndef.Record("urn:nfc:ext:club.example:member-0612345678", None, b"\x01"),
            ndef.Record("application/x-member-4711000042", None, b"\x01"),
        )
    )
    assert [r.summary() for r in records] == [
        {"type": "external", "name": "?", "bytes": 1},
        {"type": "mime", "mime": "?", "bytes": 1},
    ]


@pytest.mark.parametrize("lang", ["en", "de-DE", "zh-Hant-TW", "es-419", "gsw"])
def test_text_record_languages_shaped_like_bcp47_tags_are_summarized(lang: str) -> None:
    """A language tag as real tags write it (language, script, region) reaches the summary."""
    (record,) = parse_ndef(msg(ndef.TextRecord("hello", lang)))
    assert record.summary() == {"type": "text", "lang": lang, "chars": 5}


@pytest.mark.parametrize(
    "lang",
    [
        "x-91234567-8901",  # private use, digits: a number, not a language
        "en-4711",  # a run of 4 digits
        "de-123-456-789",  # 9 digits in 3-digit pieces: more than a region code needs
        "jane@example.com",  # e-mail
        "en-jane@ex.de",  # e-mail inside a tag-like shape
        "+4915112345678",  # phone
        "de-49-151-123",  # phone number in pieces
        "e",  # too short for a language
        "en\n",  # a trailing newline is not part of a tag
        "en--US",
        "en-US-POSIX-extra-more",  # more subtags than a summary needs
    ],
)
def test_text_record_languages_that_could_carry_a_number_of_a_person_are_not_summarized(lang: str) -> None:
    """Whoever wrote the tag chose the language field too: anything not shaped like a BCP 47
    tag, with more than 3 digits in all, or looking personal is reported as "?" (like type names)."""
    (record,) = parse_ndef(msg(ndef.TextRecord("hello", lang)))
    assert record.summary() == {"type": "text", "lang": "?", "chars": 5}


def test_type_names_with_a_trailing_newline_are_not_summarized() -> None:
    """A type name is checked whole: "text/plain\\n" is not the MIME type text/plain."""
    records = parse_ndef(msg(ndef.Record("text/plain\n", None, b"x"), ndef.Record("urn:nfc:ext:a.b:c\n", None, b"")))
    assert [r.summary() for r in records] == [
        {"type": "mime", "mime": "?", "bytes": 1},
        {"type": "external", "name": "?", "bytes": 0},
    ]


_LANGS = st.one_of(
    st.from_regex(r"[A-Za-z]{1,4}(-[A-Za-z0-9]{1,9}){0,4}", fullmatch=True),
    st.text(alphabet="abDE0123456789-@+._ \n", max_size=40),
    st.text(max_size=63),
)


@FUZZ
@given(_LANGS)
def test_fuzz_any_text_record_language_is_a_tag_or_question_mark(lang: str) -> None:
    """Whatever the language field holds: "?" or a BCP 47-like tag without a 4-digit run."""
    try:
        octets = msg(ndef.TextRecord("x", lang))
    except (ndef.EncodeError, ValueError):
        return  # not a language ndeflib can write (ASCII, 1..63 characters)
    for r in parse_ndef(octets):
        got = r.summary()["lang"]
        assert got == "?" or (
            re.fullmatch(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,3}", got) and not re.search(r"[0-9]{4}", got)
        )


def test_an_identifier_shaped_serial_or_batch_stays_off_the_tap() -> None:
    """A Digital Link's serial is free-form: a phone number written there is left out."""
    c = classify([NfcRule(name="p", kind="product", gs1_digital_link=True)],
                 ndef.UriRecord("https://id.example/01/09506000134352/10/LOT7/21/+4915112345678"))
    assert c.kind == "product"
    assert c.data == {"gtin": "09506000134352", "batch": "LOT7"}


# -- rules --------------------------------------------------------------------------------


def classify(rule_list: list[NfcRule], *records: Any) -> Any:
    return Classifier(rule_list).classify(parse_ndef(msg(*records)))


def test_default_rule_makes_a_digital_link_a_product() -> None:
    c = classify(rules(), ndef.UriRecord("https://id.gs1.org/01/09506000134352/10/L7/21/S9"))
    assert (c.kind, c.rule, dict(c.data)) == (
        "product", "gs1", {"gtin": "09506000134352", "batch": "L7", "serial": "S9"})
    assert c.loyalty is None


def test_loyalty_by_uri_prefix_takes_the_number_after_it() -> None:
    r = rules({"name": "club", "kind": "loyalty", "uri_prefix": CLUB})
    c = classify(r, ndef.UriRecord(CLUB + LOYALTY + "?s=1"))
    assert (c.kind, c.rule, c.loyalty, dict(c.data)) == ("loyalty", "club", LOYALTY, {})


def test_loyalty_by_mime_type_takes_the_number_in_the_payload() -> None:
    r = rules({"name": "app", "kind": "loyalty", "mime_type": "Application/Vnd.Acme.Loyalty"})
    c = classify(r, ndef.Record("application/vnd.acme.loyalty", None, b'{"member":"' + LOYALTY.encode() + b'"}'))
    assert (c.kind, c.loyalty) == ("loyalty", LOYALTY)


def test_loyalty_by_issuer_prefix_of_a_number_written_with_spaces() -> None:
    r = rules({"name": "issuer", "kind": "loyalty", "number_prefix": "9876", "number_length": [12, 12]})
    assert classify(r, ndef.TextRecord("Member 9876 5432 1098", "en")).loyalty == LOYALTY
    other = classify(r, ndef.TextRecord("Member 1234 5678 9012", "en"))
    assert (other.kind, other.loyalty) == ("unknown", None)
    short = classify(r, ndef.TextRecord("Member 98765", "en"))
    assert short.kind == "unknown"


def test_first_matching_rule_wins_and_no_match_is_unknown() -> None:
    r = rules({"name": "club", "kind": "loyalty", "uri_prefix": CLUB},
              {"name": "any-acme", "kind": "product", "uri_prefix": "https://club."})
    assert classify(r, ndef.UriRecord(CLUB + LOYALTY)).rule == "club"
    assert classify(r, ndef.UriRecord("https://club.other.example/x")).rule == "any-acme"
    assert classify(r, ndef.TextRecord("hello", "en")).kind == "unknown"


def test_invalid_check_digit_is_no_product_but_is_reported() -> None:
    c = classify(rules(), ndef.UriRecord("https://id.gs1.org/01/09506000134353"))
    assert (c.kind, c.gs1_error, dict(c.data)) == ("unknown", "check_digit", {})


@FUZZ
@given(st.lists(st.builds(NdefRecord, st.sampled_from(["uri", "text", "smartposter", "mime", "other"]),
                          st.none() | st.text(max_size=80), st.none() | st.text(max_size=80), st.none(),
                          st.none() | st.sampled_from(["application/vnd.acme.loyalty", "text/plain"]),
                          st.binary(max_size=60)), max_size=5))
def test_fuzz_classifier_never_raises(records: list[NdefRecord]) -> None:
    r = rules({"name": "club", "kind": "loyalty", "uri_prefix": CLUB},
              {"name": "app", "kind": "loyalty", "mime_type": "application/vnd.acme.loyalty"},
              {"name": "issuer", "kind": "loyalty", "number_prefix": "98"})
    c = Classifier(r).classify(records)
    assert c.kind in ("product", "loyalty", "unknown")
    assert c.loyalty is None or c.loyalty.isdigit()


# -- tap builder ----------------------------------------------------------------------------


def test_loyalty_tap_carries_uid_and_number_only_as_identifiers() -> None:
    b = TapBuilder(Nfc(rules=rules({"name": "club", "kind": "loyalty", "uri_prefix": CLUB})))
    r = b.build(TagRead("Type4Tag", UID, msg(ndef.UriRecord(CLUB + LOYALTY))), ts=1)
    assert (r.src, r.type, r.ts) == ("nfc", "nfc.tap", 1)
    assert r.data == {"kind": "loyalty", "tag_type": "Type4", "ndef": "ok",
                      "records": [{"type": "uri", "scheme": "https"}], "rule": "club"}
    assert r.ids == {"card": Ident("nfc_uid", UID_HEX), "loyalty": Ident("loyalty_id", LOYALTY)}
    assert LOYALTY not in str(r.data)
    assert UID_HEX not in str(r.data)
    assert LOYALTY not in repr(r)


def test_loyalty_tap_leaves_the_pipeline_with_pseudonyms_only(tmp_path: Path) -> None:
    """Through the card scrub and privacy stages: `card` and `loyalty` become pseudonyms,
    the GS1 and record fields stay, and neither raw value is anywhere in the event."""
    keys = KeyStore(tmp_path / "keys", FakeClock())
    keys.init()
    b = TapBuilder(Nfc(rules=rules({"name": "club", "kind": "loyalty", "uri_prefix": CLUB})))
    r = b.build(TagRead("Type4Tag", UID, msg(ndef.UriRecord(CLUB + LOYALTY))), ts=1)
    p = PrivacyStage(Pseudonymizer(Privacy(), keys, None))(CardScrubStage()(r))
    assert re.fullmatch(r"nfc:e\d+:[a-z2-7]{26}", p.data["card"])
    assert re.fullmatch(r"loy:e\d+:[a-z2-7]{26}", p.data["loyalty"])
    assert (p.data["kind"], p.data["rule"], p.data["ndef"]) == ("loyalty", "club", "ok")
    assert LOYALTY not in repr(p.data)
    assert UID_HEX not in repr(p.data).upper()


def test_store_tag_uid_is_infrastructure_with_its_label() -> None:
    """A configured store tag: its label in data, no nfc_uid identifier."""
    cfg = Nfc(store_tags={"04:a1:b2:c3:d4:e5:f6": "shelf-a12"})
    r = TapBuilder(cfg).build(TagRead("Type2Tag", UID, msg(ndef.UriRecord("https://id.gs1.org/01/09506000134352"))), 5)
    assert r.data["tag"] == "shelf-a12"
    assert (r.data["kind"], r.data["gtin"]) == ("product", "09506000134352")
    assert r.ids == {}


def test_malformed_ndef_is_counted_and_logged_without_bytes_and_still_a_tap() -> None:
    b = TapBuilder(Nfc())
    garbage = b"\xd1\x01\xffU\x04" + LOYALTY.encode()
    with structlog.testing.capture_logs() as logs:
        r = b.build(TagRead("Type3Tag", UID, garbage), 1)
    assert (r.data["kind"], r.data["ndef"], r.data["records"]) == ("unknown", "invalid", [])
    assert b.counters["ndef_rejected"] == 1
    assert logs == [{"event": "nfc_ndef_rejected", "reason": "malformed", "bytes": 17, "tag_type": "Type3Tag",
                     "log_level": "warning"}]


def test_no_ndef_unreadable_ndef_and_bad_gs1_states() -> None:
    b = TapBuilder(Nfc())
    assert b.build(TagRead("Type2Tag", UID, None), 1).data["ndef"] == "none"
    assert b.build(TagRead("Type2Tag", UID, b""), 1).data["ndef"] == "empty"
    with structlog.testing.capture_logs() as logs:
        assert b.build(TagRead("Type2Tag", UID, None, ndef_failed=True), 1).data["ndef"] == "unreadable"
        bad = b.build(TagRead("Type2Tag", UID, msg(ndef.UriRecord("https://x.example/01/09506000134353"))), 1)
    assert (bad.data["kind"], bad.data["gs1"]) == ("unknown", "invalid")
    assert [e["event"] for e in logs] == ["nfc_ndef_unreadable", "nfc_gs1_rejected"]
    assert (b.counters["ndef_unreadable"], b.counters["gs1_rejected"], b.counters["taps"]) == (1, 1, 4)


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=10))
def test_fuzz_tap_builder_never_raises(octets: bytes, uid: bytes) -> None:
    r = TapBuilder(Nfc(rules=rules({"name": "issuer", "kind": "loyalty", "number_prefix": "9"}))).build(
        TagRead("Type3Tag", uid, octets), 1)
    assert r.data["ndef"] in ("ok", "empty", "invalid")


# -- debounce -------------------------------------------------------------------------------


def test_resting_tag_is_one_tap_and_a_retap_after_the_interval_is_new() -> None:
    d = Debouncer(2.0)
    assert d.arrived(UID, 0.0) is True
    assert d.arrived(UID, 30.0) is False  # still resting (another activation of the same tag)
    d.left(UID, 31.0)
    assert d.resting == 0
    assert d.arrived(UID, 32.0) is False  # back within 2 s: the same tap
    d.left(UID, 33.0)
    assert d.arrived(UID, 35.0) is True  # 2 s later: a new tap
    assert d.arrived(b"other", 35.0) is True


def test_reader_restart_counts_resting_tags_as_lifted() -> None:
    d = Debouncer(1.0)
    d.arrived(UID, 0.0)
    d.reader_restarted(10.0)
    assert d.resting == 0
    assert d.arrived(UID, 10.5) is False
    d.reader_restarted(20.0)
    assert d.arrived(UID, 25.0) is True


def test_debouncer_memory_is_bounded() -> None:
    d = Debouncer(100.0, max_tags=10)
    for i in range(50):
        uid = i.to_bytes(4, "big")
        d.arrived(uid, float(i))
        d.left(uid, float(i))
    assert d.arrived((0).to_bytes(4, "big"), 51.0) is True  # forgotten: counted as new


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rules": [{"name": "x", "kind": "loyalty"}]}, "a rule needs a condition"),
        ({"rules": [{"name": "x", "kind": "loyalty", "gs1_digital_link": True}]}, "applies to kind product"),
        ({"rules": [{"name": "x", "kind": "loyalty", "mime_type": "loyalty"}]}, "must be a MIME type"),
        ({"rules": [{"name": "x", "kind": "loyalty", "number_prefix": "12", "number_length": [9, 3]}]}, "[min, max]"),
        ({"rules": [{"name": "x", "kind": "product", "uri_prefix": "https://a"}] * 2}, "rule names must be unique"),
        ({"store_tags": {"04A1": "x"}}, "4, 7, 8 or 10 bytes"),
        ({"store_tags": {"04A1B2C3D4E5F6": "a", "04:a1:b2:c3:d4:e5:f6": "b"}}, "listed twice"),
        ({"device": "usb; rm -rf /"}, "should match pattern"),
        ({"targets": ["212F", "212F"]}, "each target once"),
    ],
)
def test_config_rejects_rules_and_tags_that_cannot_work(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        Nfc(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("device", ["usb", "usb:072f:2200", "usb:001:023", "tty:AMA0:pn532", "tty:USB0",
                                    "udp:127.0.0.1:54321", "udp", "com:COM3:pn532"])
def test_config_accepts_nfcpy_device_paths(device: str) -> None:
    assert Nfc(device=device).device == device
