"""Pseudonyms: one per identifier and key epoch, unlinkable after rotation, stable only with consent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.clock import FakeClock
from edge.config import ClassPolicy, Privacy
from edge.errors import KeyError_
from edge.events import IDENT_CLASSES, Ident, IdentClass
from edge.privacy.consent import ConsentList
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer

DAY = 86400.0
TENANT_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
# HMAC-SHA256(tenant key, b"ble_address\x00AABBCCDDEEFF")[:16], base32 lower, no padding;
# computed with `openssl dgst -sha256 -mac HMAC -macopt hexkey:... | base32`
STABLE_BLE = "ble:s630dcd29:mrnscr7fnis36nmljhc2m4xxee"
# the same for b"loyalty_id\x00LOY12345"
STABLE_LOY = "loy:s630dcd29:ppbxhu4xfceehk5nnh4uwlq7fq"

PSEUDONYM_RE = re.compile(r"^(ble|nfc|loy|mail|tel):(e[1-9][0-9]*|s[0-9a-f]{8}):[a-z2-7]{26}$")

ALL_EPHEMERAL = Privacy(
    classes={
        "ble_address": ClassPolicy(policy="ephemeral"),
        "nfc_uid": ClassPolicy(policy="ephemeral"),
        "loyalty_id": ClassPolicy(policy="ephemeral"),
        "email": ClassPolicy(policy="ephemeral"),
        "phone": ClassPolicy(policy="ephemeral"),
    }
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(tmp_path: Path, clock: FakeClock) -> KeyStore:
    ks = KeyStore(tmp_path / "keys", clock)
    ks.init()
    return ks


@pytest.fixture
def pz(keys: KeyStore) -> Pseudonymizer:
    return Pseudonymizer(ALL_EPHEMERAL, keys, None)


def expected_ephemeral(keys: KeyStore, cls: IdentClass, short: str, normalized: str) -> str:
    """Independent computation with the stdlib hmac/base64 modules."""
    epoch, key = keys.ephemeral(DAY)
    mac = hmac.new(key, cls.encode() + b"\x00" + normalized.encode(), hashlib.sha256).digest()[:16]
    return f"{short}:e{epoch}:{base64.b32encode(mac).decode().lower().rstrip('=')}"


MAC_SPELLINGS = [
    "aa:bb:cc:dd:ee:ff",
    "AA:BB:CC:DD:EE:FF",
    "aa-bb-cc-dd-ee-ff",
    "AA-BB-CC-DD-EE-FF",
    "aabb.ccdd.eeff",
    "AABBCCDDEEFF",
    bytes.fromhex("aabbccddeeff").hex(),
    "  aa:bb:cc:dd:ee:ff\n",
]


def test_every_spelling_of_a_mac_gives_one_pseudonym(pz: Pseudonymizer, keys: KeyStore) -> None:
    got = {pz.pseudonym(Ident("ble_address", s)) for s in MAC_SPELLINGS}
    assert got == {expected_ephemeral(keys, "ble_address", "ble", "AABBCCDDEEFF")}


NORMALIZATION_CASES: list[tuple[IdentClass, str, list[str], str]] = [
    ("nfc_uid", "nfc", ["04:a2:3b:1c:5d:80:00", "04A23B1C5D8000", "04-a2-3b-1c-5d-80-00"], "04A23B1C5D8000"),
    ("loyalty_id", "loy", ["loy-123 45", "LOY12345", " Loy-12345 "], "LOY12345"),
    ("email", "mail", ["Anna.Muster@Example.COM", " anna.muster@example.com "], "anna.muster@example.com"),
    ("phone", "tel", ["+49 30 1234567", "0049 30 1234567", "+49-(30)-123 45 67"], "+49301234567"),
    ("phone", "tel", ["030 1234567", "030/1234567"], "0301234567"),
]


@pytest.mark.parametrize("case", NORMALIZATION_CASES, ids=lambda c: f"{c[0]}-{c[3][:4]}")
def test_normalization_per_class(
    pz: Pseudonymizer, keys: KeyStore, case: tuple[IdentClass, str, list[str], str]
) -> None:
    """Each class has one canonical form: one identifier, one pseudonym per epoch."""
    cls, short, spellings, normalized = case
    want = expected_ephemeral(keys, cls, short, normalized)
    assert {pz.pseudonym(Ident(cls, s)) for s in spellings} == {want}


def test_classes_never_collide(pz: Pseudonymizer) -> None:
    """The same string as a BLE address and as an NFC UID gives unrelated digests."""
    a = pz.pseudonym(Ident("ble_address", "AABBCCDDEEFF"))
    b = pz.pseudonym(Ident("nfc_uid", "AABBCCDDEEFF"))
    assert a is not None
    assert b is not None
    assert a.split(":")[2] != b.split(":")[2]


def test_card_numbers_never_get_a_pseudonym(pz: Pseudonymizer) -> None:
    assert pz.pseudonym(Ident("card_number", "4111111111111111")) is None


def test_default_policy_drops_email_and_phone(keys: KeyStore) -> None:
    pz = Pseudonymizer(Privacy(), keys, None)
    assert pz.pseudonym(Ident("email", "a@b.de")) is None
    assert pz.pseudonym(Ident("phone", "+49301234567")) is None
    p = pz.pseudonym(Ident("ble_address", "aa:bb:cc:dd:ee:ff"))
    assert p is not None
    assert p.startswith("ble:e1:")


def test_each_epoch_gives_a_different_pseudonym(pz: Pseudonymizer, keys: KeyStore) -> None:
    ident = Ident("ble_address", "aa:bb:cc:dd:ee:ff")
    p1 = pz.pseudonym(ident)
    keys.rotate()
    p2 = pz.pseudonym(ident)
    assert p1 is not None
    assert p2 is not None
    assert p1.startswith("ble:e1:")
    assert p2.startswith("ble:e2:")
    assert p1.split(":")[2] != p2.split(":")[2]


def test_rotation_by_age_changes_pseudonyms(keys: KeyStore, clock: FakeClock) -> None:
    pz = Pseudonymizer(Privacy(ephemeral_rotation=3600), keys, None)
    ident = Ident("nfc_uid", "04a23b1c5d8000")
    p1 = pz.pseudonym(ident)
    clock.advance(3599)
    assert pz.pseudonym(ident) == p1
    clock.advance(2)
    p2 = pz.pseudonym(ident)
    assert p2 is not None
    assert p2.startswith("nfc:e2:")


def test_old_pseudonyms_not_reproducible_after_rotation(tmp_path: Path, clock: FakeClock) -> None:
    """Crypto-shredding: after rotation nothing on disk can recompute an old pseudonym."""
    kdir = tmp_path / "keys"
    keys = KeyStore(kdir, clock)
    keys.init()
    idents = [Ident("ble_address", f"aa:bb:cc:dd:ee:{i:02x}") for i in range(50)]
    old = {Pseudonymizer(ALL_EPHEMERAL, keys, None).pseudonym(i) for i in idents}
    old_key = keys.ephemeral(DAY)[1]
    keys.rotate()
    disk = b"".join(p.read_bytes() for p in kdir.iterdir())
    assert old_key not in disk
    assert old_key.hex().encode() not in disk
    reopened = KeyStore(kdir, clock)  # a fresh process sees only what is on disk
    new = {Pseudonymizer(ALL_EPHEMERAL, reopened, None).pseudonym(i) for i in idents}
    assert not old & new
    old_digests = {p.split(":")[2] for p in old if p}
    assert not old_digests & {p.split(":")[2] for p in new if p}


def stable_policy(fallback: str) -> Privacy:
    return Privacy.model_validate(
        {
            "classes": {
                "ble_address": {"policy": "stable", "fallback": fallback},
                "loyalty_id": {"policy": "stable", "fallback": fallback},
            }
        }
    )


def test_stable_policy_needs_a_tenant_key(keys: KeyStore) -> None:
    with pytest.raises(KeyError_) as ei:
        Pseudonymizer(stable_policy("drop"), keys, None)
    assert ei.value.hint is not None
    assert "tenant.key" in ei.value.hint


def test_stable_pseudonym_only_with_consent(tmp_path: Path, keys: KeyStore, clock: FakeClock) -> None:
    """Consented: the stable (cross-store) pseudonym. Not consented: the class's fallback."""
    keys.provision_tenant_key(TENANT_HEX.encode())
    consent_file = tmp_path / "consent.txt"
    consent_file.write_text(f"# consented customers\n{STABLE_LOY}\n\n  {STABLE_BLE}  # shelf tag test\n")
    consent = ConsentList(consent_file, clock)
    pz = Pseudonymizer(stable_policy("ephemeral"), keys, consent)
    assert pz.pseudonym(Ident("loyalty_id", "loy-123 45")) == STABLE_LOY
    assert pz.pseudonym(Ident("ble_address", "AA-BB-CC-DD-EE-FF")) == STABLE_BLE
    other = pz.pseudonym(Ident("loyalty_id", "LOY99999"))
    assert other is not None
    assert other.startswith("loy:e1:")
    assert pz.stable_pseudonym(Ident("ble_address", "aabbccddeeff")) == STABLE_BLE


def test_not_consented_with_drop_fallback_is_dropped(
    tmp_path: Path, keys: KeyStore, clock: FakeClock
) -> None:
    keys.provision_tenant_key(TENANT_HEX.encode())
    (tmp_path / "consent.txt").write_text(STABLE_LOY + "\n")
    pz = Pseudonymizer(stable_policy("drop"), keys, ConsentList(tmp_path / "consent.txt", clock))
    assert pz.pseudonym(Ident("loyalty_id", "LOY12345")) == STABLE_LOY
    assert pz.pseudonym(Ident("loyalty_id", "LOY99999")) is None


def test_no_consent_list_means_nobody_consented(keys: KeyStore) -> None:
    keys.provision_tenant_key(TENANT_HEX.encode())
    pz = Pseudonymizer(stable_policy("drop"), keys, None)
    assert pz.pseudonym(Ident("loyalty_id", "LOY12345")) is None


def test_consent_file_edits_are_picked_up(tmp_path: Path, keys: KeyStore, clock: FakeClock) -> None:
    """Granting and withdrawing consent take effect without a restart."""
    keys.provision_tenant_key(TENANT_HEX.encode())
    path = tmp_path / "consent.txt"
    path.write_text("# nobody yet\n")
    pz = Pseudonymizer(stable_policy("drop"), keys, ConsentList(path, clock, check_every_s=2.0))
    ident = Ident("loyalty_id", "LOY12345")
    assert pz.pseudonym(ident) is None
    path.write_text(STABLE_LOY + "\n")
    clock.advance(2.5)
    assert pz.pseudonym(ident) == STABLE_LOY
    tmp = tmp_path / "consent.new"  # an editor's atomic save: new inode, same size
    tmp.write_text(STABLE_BLE + "\n")
    tmp.replace(path)
    clock.advance(2.5)
    assert pz.pseudonym(ident) is None
    assert pz.pseudonym(Ident("ble_address", "aa:bb:cc:dd:ee:ff")) == STABLE_BLE


def test_consent_file_is_checked_at_most_every_interval(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "consent.txt"
    path.write_text("a\n")
    consent = ConsentList(path, clock, check_every_s=2.0)
    assert "a" in consent
    path.write_text("b\n")
    clock.advance(1.0)
    assert "a" in consent  # not re-read yet
    clock.advance(1.5)
    assert "b" in consent
    assert "a" not in consent
    assert len(consent) == 1


def test_missing_consent_file_is_empty_and_logged_once(tmp_path: Path, clock: FakeClock) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        consent = ConsentList(tmp_path / "nope.txt", clock)
        for _ in range(5):
            clock.advance(3)
            assert "x" not in consent
    assert [e["event"] for e in logs].count("consent_file_missing") == 1
    (tmp_path / "nope.txt").write_text("x\n")
    clock.advance(3)
    assert "x" in consent


def test_unreadable_consent_file_fails_closed(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "consent.d"
    path.mkdir()  # reading a directory fails: treated as "nobody consented"
    assert "x" not in ConsentList(path, clock)


@pytest.fixture(scope="module")
def fuzz_pz(tmp_path_factory: pytest.TempPathFactory) -> Pseudonymizer:
    """One pseudonymizer for all fuzz examples (hypothesis reuses fixtures across examples)."""
    ks = KeyStore(tmp_path_factory.mktemp("fuzzkeys") / "keys", FakeClock())
    ks.init()
    return Pseudonymizer(ALL_EPHEMERAL, ks, None)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(cls=st.sampled_from(IDENT_CLASSES), raw=st.text(max_size=80))
def test_fuzz_pseudonym_never_raises_and_never_leaks(
    fuzz_pz: Pseudonymizer, cls: IdentClass, raw: str
) -> None:
    """Any input: None or a well-formed pseudonym that does not contain the raw value."""
    p = fuzz_pz.pseudonym(Ident(cls, raw))
    if cls == "card_number":
        assert p is None
        return
    assert p is not None
    assert PSEUDONYM_RE.match(p), p
    if len(raw.strip()) >= 6:
        assert raw.strip() not in p
