"""BLE advertisement decoders: byte vectors written from the public format specifications
(Apple iBeacon, AltBeacon, Google Eddystone UID/URL/TLM/EID), malformed payloads counted by
reason, and fuzzing (derandomized) that shows garbage never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble.decode import (
    AltBeacon,
    Decoded,
    EddystoneEid,
    EddystoneEtlm,
    EddystoneTlm,
    EddystoneUid,
    EddystoneUrl,
    IBeacon,
    Malformed,
    Manufacturer,
    decode,
    decode_eddystone,
    decode_manufacturer,
)

EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"

# Apple iBeacon: AD `1A FF 4C 00 | 02 15 | uuid(16) | major(2) | minor(2) | power(1)`; BlueZ
# hands over the payload after the company id 0x004C.
IBEACON = bytes.fromhex("0215" "E2C56DB5DFFB48D2B060D0F5A71096E0" "0001" "0002" "C5")
# AltBeacon spec example: `1B FF 18 01 | BE AC | beacon id(20) | ref rssi | reserved`
ALTBEACON = bytes.fromhex("BEAC" "2F234454CF6D4A0FADF2F4911BA9FFA6" "0001" "0002" "C5" "00")
# Eddystone-UID: frame 0x00, tx power at 0 m, namespace(10), instance(6), RFU(2)
UID = bytes.fromhex("00" "E7" "EDD1EBEAC04E5DEFA017" "010203040506" "0000")
# Eddystone-URL: 0x10, tx, scheme 0x03 "https://", "goo.gl/S6zT6P"
URL = bytes.fromhex("10" "EB" "03" "676F6F2E676C2F53367A543650")
# Eddystone-TLM v0: 3000 mV, 23.5 degC (0x1780, 8.8 fixed point), 1000 PDUs, 10000 x 0.1 s
TLM = bytes.fromhex("20" "00" "0BB8" "1780" "000003E8" "00002710")
EID = bytes.fromhex("30" "EE" "0102030405060708")


def test_ibeacon_vector_decodes_uuid_major_minor_and_measured_power() -> None:
    assert decode_manufacturer(0x004C, IBEACON) == IBeacon("E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", 1, 2, -59)


def test_altbeacon_vector_decodes_under_any_company_id() -> None:
    assert decode_manufacturer(0x0118, ALTBEACON) == AltBeacon(
        0x0118, "2F234454-CF6D-4A0F-ADF2-F4911BA9FFA6", 1, 2, -59, 0)


def test_eddystone_uid_with_and_without_the_two_rfu_bytes() -> None:
    want = EddystoneUid("edd1ebeac04e5defa017", "010203040506", -25)
    assert decode_eddystone(UID) == want
    assert decode_eddystone(UID[:18]) == want


def test_eddystone_url_scheme_and_expansion_codes() -> None:
    assert decode_eddystone(URL) == EddystoneUrl("https://goo.gl/S6zT6P", -21)
    # 0x00 "http://www." + "example" + 0x00 ".com/" ; 0x02 "http://" + "shop" + 0x0a ".net"
    assert _url(bytes.fromhex("1000" "00" "6578616D706C65" "00")) == "http://www.example.com/"
    assert _url(bytes.fromhex("1000" "02" "73686F70" "0A")) == "http://shop.net"


def _url(payload: bytes) -> str:
    frame = decode_eddystone(payload)
    assert isinstance(frame, EddystoneUrl)
    return frame.url


def test_eddystone_tlm_battery_temperature_count_uptime() -> None:
    assert decode_eddystone(TLM) == EddystoneTlm(3000, 23.5, 1000, 1000.0)
    # not supported: battery 0 (mains powered), temperature 0x8000
    assert decode_eddystone(bytes.fromhex("2000" "0000" "8000" "00000001" "00000002")) == EddystoneTlm(
        None, None, 1, 0.2)
    # negative temperature: 0xFF80 = -0.5 degC
    tlm = decode_eddystone(bytes.fromhex("2000" "0BB8" "FF80" "00000000" "00000000"))
    assert isinstance(tlm, EddystoneTlm)
    assert tlm.temperature_c == -0.5


def test_encrypted_tlm_and_eid_are_recognized() -> None:
    assert decode_eddystone(bytes.fromhex("2001") + bytes(16)) == EddystoneEtlm()
    assert decode_eddystone(EID) == EddystoneEid("0102030405060708", -18)


def test_other_manufacturer_data_is_reported_by_company_id_and_length() -> None:
    # Apple "Nearby Info" (type 0x10) is not an iBeacon
    assert decode_manufacturer(0x004C, bytes.fromhex("1005011820A1B2")) == Manufacturer(0x004C, 7)
    assert decode_manufacturer(0x0075, b"") == Manufacturer(0x0075, 0)


def test_malformed_payloads_become_reasons() -> None:
    cases = {
        "ibeacon_length": decode_manufacturer(0x004C, IBEACON[:-1]),
        "altbeacon_length": decode_manufacturer(0x0118, ALTBEACON + b"\x00"),
        "eddystone_empty": decode_eddystone(b""),
        "eddystone_frame": decode_eddystone(bytes.fromhex("40" "00")),
        "eddystone_uid_length": decode_eddystone(UID[:17]),
        "eddystone_url_length": decode_eddystone(bytes.fromhex("10EB")),
        "eddystone_url_scheme": decode_eddystone(bytes.fromhex("10EB04676F")),
        "eddystone_url_char": decode_eddystone(bytes.fromhex("10EB03670E")),
        "eddystone_tlm_version": decode_eddystone(bytes.fromhex("2002") + bytes(12)),
        "eddystone_tlm_length": decode_eddystone(TLM[:13]),
        "eddystone_eid_length": decode_eddystone(EID[:9]),
    }
    assert {k: v for k, v in cases.items() if v != Malformed(k)} == {}


def test_decode_collects_every_frame_and_counts_malformed_ones() -> None:
    d = decode({0x004C: IBEACON, 0x0075: b"\x01\x02", 0x0118: ALTBEACON[:5]}, {EDDYSTONE: TLM})
    assert d.frames == (decode_manufacturer(0x004C, IBEACON), Manufacturer(0x0075, 2), decode_eddystone(TLM))
    assert d.malformed == ("altbeacon_length",)
    # other service data is not ours to decode; upper-case UUID keys are matched too
    assert decode({}, {"0000fe9f-0000-1000-8000-00805f9b34fb": b"\x00"}) == Decoded((), ())
    assert decode({}, {EDDYSTONE.upper(): UID}).frames == (decode_eddystone(UID),)
    assert decode({70000: b"", -1: b""}, {}).malformed == ("company_id", "company_id")


# --- fuzzing ----------------------------------------------------------------------------------

VECTORS = [IBEACON, ALTBEACON, UID, URL, TLM, EID]
mfr = st.dictionaries(st.integers(-5, 70_000) | st.sampled_from([0x004C, 0x0118]), st.binary(max_size=40), max_size=4)
svc = st.dictionaries(st.sampled_from([EDDYSTONE, EDDYSTONE.upper(), "0000fe9f-0000-1000-8000-00805f9b34fb"]),
                      st.binary(max_size=30), max_size=3)


def _accounted(m: dict[int, bytes], s: dict[str, bytes], d: Decoded) -> bool:
    expected = len(m) + sum(1 for k in s if k.lower() == EDDYSTONE)
    return len(d.frames) + len(d.malformed) == expected


@settings(derandomize=True, max_examples=300, deadline=None)
@given(mfr, svc)
def test_fuzz_arbitrary_payloads_never_raise_and_every_payload_is_accounted(
    m: dict[int, bytes], s: dict[str, bytes]
) -> None:
    """Whatever arrives, decode returns; each payload is a frame or a malformed reason."""
    assert _accounted(m, s, decode(m, s))


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.sampled_from(VECTORS), st.integers(0, 40), st.binary(max_size=8), st.integers(0, 255), st.integers(0, 39))
def test_fuzz_mutated_spec_vectors_never_raise(vector: bytes, cut: int, tail: bytes, byte: int, at: int) -> None:
    """Truncated, extended and bit-flipped versions of valid frames: a frame or a reason."""
    for payload in (vector[:cut], vector + tail, vector[:at] + bytes([byte]) + vector[at + 1:]):
        m = {0x004C: payload, 0x0118: payload}
        d = decode(m, {EDDYSTONE: payload})
        assert _accounted(m, {EDDYSTONE: payload}, d)
