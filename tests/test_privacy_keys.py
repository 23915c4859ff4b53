"""Device key store: file safety, kid per uplink-v1, ephemeral rotation and crypto-shredding."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge.clock import FakeClock
from edge.errors import KeyError_
from edge.privacy.keys import KeyStore

# RFC 8032 section 7.1, TEST 1
RFC8032_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"  # noqa: S105 -- a published test vector
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
# sha256(RFC8032_PUBLIC bytes)[:8], computed with `xxd -r -p | sha256sum`
RFC8032_KID = "21fe31dfa154a261"
# tenant key 00 01 .. 1f; kid = sha256(key)[:4] hex, computed with sha256sum
TENANT_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
TENANT_KID = "630dcd29"

DAY = 86400.0


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def all_bytes(d: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(d.iterdir()) if p.is_file())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kdir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def ks(kdir: Path, clock: FakeClock) -> KeyStore:
    k = KeyStore(kdir, clock)
    k.init()
    return k


def test_init_creates_private_dir_and_files(ks: KeyStore, kdir: Path) -> None:
    """The keys dir is 0700 and every file in it 0600; the signing key is 32 raw bytes."""
    assert ks.exists()
    assert mode(kdir) == 0o700
    files = list(kdir.iterdir())
    assert len(files) == 2  # signing key + first ephemeral key, no temp files left behind
    for p in files:
        assert mode(p) == 0o600, p
    assert (kdir / "signing.key").stat().st_size == 32
    assert len(ks.public_key()) == 32


def test_init_tightens_an_existing_loose_directory(kdir: Path, clock: FakeClock) -> None:
    """A pre-existing keys dir with a loose mode is made 0700."""
    kdir.mkdir(mode=0o755)
    os.chmod(kdir, 0o755)  # noqa: S103 -- the loose mode is what this test is about
    KeyStore(kdir, clock).init()
    assert mode(kdir) == 0o700


def test_init_refuses_to_overwrite_without_force(ks: KeyStore, kdir: Path, clock: FakeClock) -> None:
    """Existing keys are never replaced silently; the hint names --force."""
    kid = ks.kid()
    with pytest.raises(KeyError_) as ei:
        KeyStore(kdir, clock).init()
    assert ei.value.hint is not None
    assert "--force" in ei.value.hint
    assert KeyStore(kdir, clock).kid() == kid


def test_init_force_replaces_keys_and_shreds_old_ones(ks: KeyStore, kdir: Path, clock: FakeClock) -> None:
    """--force gives a new kid and a new ephemeral key; the old key material is gone from disk."""
    old_signing = (kdir / "signing.key").read_bytes()
    old_eph = ks.ephemeral(DAY)[1]
    other = KeyStore(kdir, clock)
    other.init(force=True)
    assert other.kid() != ks.kid()
    disk = all_bytes(kdir)
    assert old_signing not in disk
    assert old_eph.hex().encode() not in disk
    assert old_eph not in disk


def test_kid_matches_uplink_spec_for_rfc8032_key(kdir: Path, clock: FakeClock) -> None:
    """kid = lowercase hex of the first 8 bytes of SHA-256 over the raw public key."""
    kdir.mkdir(mode=0o700)
    path = kdir / "signing.key"
    path.write_bytes(bytes.fromhex(RFC8032_SECRET))
    path.chmod(0o600)
    ks = KeyStore(kdir, clock)
    assert ks.exists()
    assert ks.public_key().hex() == RFC8032_PUBLIC
    assert ks.kid() == RFC8032_KID


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_group_or_world_readable_key_is_refused(
    ks: KeyStore, kdir: Path, clock: FakeClock, bad_mode: int
) -> None:
    """A key file others can read is refused, with `chmod 600 FILE` as the hint."""
    path = kdir / "signing.key"
    path.chmod(bad_mode)
    with pytest.raises(KeyError_) as ei:
        KeyStore(kdir, clock).signing_key()
    assert ei.value.hint == f"chmod 600 {path}"


def test_loose_ephemeral_key_file_is_refused(ks: KeyStore, kdir: Path, clock: FakeClock) -> None:
    """The permission check covers pseudonymization keys too."""
    (eph,) = [p for p in kdir.iterdir() if p.name != "signing.key"]
    eph.chmod(0o644)
    with pytest.raises(KeyError_) as ei:
        KeyStore(kdir, clock).ephemeral(DAY)
    assert ei.value.hint == f"chmod 600 {eph}"


def test_missing_signing_key_names_the_init_command(kdir: Path, clock: FakeClock) -> None:
    ks = KeyStore(kdir, clock)
    assert not ks.exists()
    with pytest.raises(KeyError_) as ei:
        ks.kid()
    assert ei.value.hint is not None
    assert "edge keys init" in ei.value.hint


def test_wrong_size_signing_key_is_refused(kdir: Path, clock: FakeClock) -> None:
    kdir.mkdir(mode=0o700)
    path = kdir / "signing.key"
    path.write_bytes(b"x" * 31)
    path.chmod(0o600)
    with pytest.raises(KeyError_):
        KeyStore(kdir, clock).signing_key()


def test_ephemeral_rotates_when_older_than_rotation(ks: KeyStore, kdir: Path, clock: FakeClock) -> None:
    """Epochs count 1, 2, ...; rotation writes the new key and shreds the old one."""
    e1, k1 = ks.ephemeral(60.0)
    assert e1 == 1
    assert len(k1) == 32
    clock.advance(59.0)
    assert ks.ephemeral(60.0) == (e1, k1)
    clock.advance(2.0)
    e2, k2 = ks.ephemeral(60.0)
    assert e2 == 2
    assert k2 != k1
    disk = all_bytes(kdir)
    assert k1.hex().encode() not in disk
    assert k1 not in disk
    assert k2.hex().encode() in disk
    assert [mode(p) for p in kdir.iterdir()] == [0o600, 0o600]


def test_manual_rotate_returns_next_epoch(ks: KeyStore, kdir: Path) -> None:
    e1, k1 = ks.ephemeral(DAY)
    assert ks.rotate() == e1 + 1
    e2, k2 = ks.ephemeral(DAY)
    assert (e2, k2 != k1) == (e1 + 1, True)
    assert k1.hex().encode() not in all_bytes(kdir)


def test_clock_jumping_back_neither_rotates_nor_loops(ks: KeyStore, clock: FakeClock) -> None:
    """A wall clock jump back keeps the key; it rotates once after the period, then stays."""
    e1, _ = ks.ephemeral(3600.0)
    clock.wall -= 365 * 86400 * 1000  # one year back
    clock.advance(10.0)
    assert ks.ephemeral(3600.0)[0] == e1
    clock.advance(3600.0)
    e2, k2 = ks.ephemeral(3600.0)
    assert e2 == e1 + 1
    for _ in range(100):
        clock.advance(1.0)
        assert ks.ephemeral(3600.0) == (e2, k2)


def test_clock_jumping_forward_rotates_once_not_in_a_loop(kdir: Path, ks: KeyStore, clock: FakeClock) -> None:
    """A key that looks ancient after a big forward jump (first NTP sync) rotates once."""
    e1, _ = ks.ephemeral(3600.0)
    clock.wall += 10 * 365 * 86400 * 1000
    fresh = KeyStore(kdir, clock)  # restart: age is judged by the wall clock
    e2, k2 = fresh.ephemeral(3600.0)
    assert e2 == e1 + 1
    for _ in range(50):
        clock.advance(5.0)
        assert fresh.ephemeral(3600.0) == (e2, k2)


def test_key_from_the_future_is_kept_after_restart(kdir: Path, ks: KeyStore, clock: FakeClock) -> None:
    """After a restart with the clock set back, the key is kept, then ages normally."""
    e1, k1 = ks.ephemeral(3600.0)
    clock.wall -= 7 * 86400 * 1000
    fresh = KeyStore(kdir, clock)
    assert fresh.ephemeral(3600.0) == (e1, k1)
    clock.advance(3601.0)
    assert fresh.ephemeral(3600.0)[0] == e1 + 1


def test_restart_keeps_young_key_and_rotates_old_one(kdir: Path, ks: KeyStore, clock: FakeClock) -> None:
    """Key age survives restarts through the creation time stored with the key."""
    e1, k1 = ks.ephemeral(3600.0)
    clock.advance(1800.0)
    assert KeyStore(kdir, clock).ephemeral(3600.0) == (e1, k1)
    clock.advance(1801.0)
    assert KeyStore(kdir, clock).ephemeral(3600.0)[0] == e1 + 1


def test_rotation_by_another_process_is_picked_up(kdir: Path, ks: KeyStore, clock: FakeClock) -> None:
    """`edge keys rotate` while the daemon runs: the daemon switches within a few seconds."""
    e1, _ = ks.ephemeral(DAY)
    cli = KeyStore(kdir, clock)
    e2 = cli.rotate()
    assert e2 == e1 + 1
    clock.advance(6.0)
    assert ks.ephemeral(DAY) == cli.ephemeral(DAY)
    assert ks.ephemeral(DAY)[0] == e2


def test_lost_ephemeral_key_is_replaced_with_a_new_epoch(kdir: Path, ks: KeyStore, clock: FakeClock) -> None:
    e1, k1 = ks.ephemeral(DAY)
    for p in kdir.iterdir():
        if p.name != "signing.key":
            p.unlink()
    clock.advance(6.0)
    e2, k2 = ks.ephemeral(DAY)
    assert e2 > e1
    assert k2 != k1


def test_tenant_key_absent_by_default(ks: KeyStore) -> None:
    assert ks.tenant_key() is None


@pytest.mark.parametrize(
    "data", [TENANT_HEX.encode(), TENANT_HEX.upper().encode() + b"\n", bytes.fromhex(TENANT_HEX)]
)
def test_tenant_key_provisioning(ks: KeyStore, kdir: Path, clock: FakeClock, data: bytes) -> None:
    """Hex or raw input; kid = first 4 bytes of SHA-256 of the key; stored 0600, reloaded."""
    assert ks.provision_tenant_key(data) == TENANT_KID
    assert ks.tenant_key() == (TENANT_KID, bytes.fromhex(TENANT_HEX))
    assert KeyStore(kdir, clock).tenant_key() == (TENANT_KID, bytes.fromhex(TENANT_HEX))
    assert mode(kdir / "tenant.key") == 0o600


def test_tenant_key_replacement_needs_force(ks: KeyStore) -> None:
    ks.provision_tenant_key(TENANT_HEX.encode())
    ks.provision_tenant_key(bytes.fromhex(TENANT_HEX))  # same key again: fine
    other = bytes(range(100, 132))
    with pytest.raises(KeyError_) as ei:
        ks.provision_tenant_key(other)
    assert ei.value.hint is not None
    assert "--force" in ei.value.hint
    kid = ks.provision_tenant_key(other, force=True)
    assert ks.tenant_key() == (kid, other)


@pytest.mark.parametrize("data", [b"", b"short", b"zz" * 32, bytes(31), bytes(33)])
def test_malformed_tenant_key_is_refused(ks: KeyStore, data: bytes) -> None:
    with pytest.raises(KeyError_):
        ks.provision_tenant_key(data)
    assert ks.tenant_key() is None


def test_loose_tenant_key_file_is_refused(ks: KeyStore, kdir: Path, clock: FakeClock) -> None:
    ks.provision_tenant_key(TENANT_HEX.encode())
    (kdir / "tenant.key").chmod(0o644)
    with pytest.raises(KeyError_) as ei:
        KeyStore(kdir, clock).tenant_key()
    assert ei.value.hint == f"chmod 600 {kdir / 'tenant.key'}"
