"""The worker's view of the PostgreSQL device registry (cloud/db/keys.py), against a real server.

What must hold: a key is valid only for its own (tenant, store, device); a device added after the
load is found at once (a miss refreshes); a revocation is seen within `refresh`; while the
database is unreachable the last known keys stay in use and nothing raises.
"""

from __future__ import annotations

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.db.keys import RegistryKeys
from cloud.db.migrate import migrate
from cloud.db.registry import add_device, revoke_device
from edge.clock import FakeClock
from edge.wire.uplink import kid_of, public_raw

pytestmark = pytest.mark.cloud


def _key() -> tuple[str, bytes]:
    raw = public_raw(Ed25519PrivateKey.generate().public_key())
    return kid_of(raw), raw


def test_keys_bind_to_their_identity_new_devices_are_found_and_revocations_seen_within_refresh(pg_dsn: str) -> None:
    migrate(pg_dsn)
    kid_a, raw_a = _key()
    kid_b, raw_b = _key()
    with psycopg.connect(pg_dsn) as conn:
        add_device(conn, tenant="t1", store="s1", device="d1", public_key=raw_a)
    clock = FakeClock()
    keys = RegistryKeys(pg_dsn, clock, refresh=1.0, miss_interval=1.0)
    keys.load()
    try:
        assert keys.key_for(("t1", "s1", "d1"), kid_a) is not None
        assert keys.key_for(("t1", "s2", "d1"), kid_a) is None  # another store's topic
        assert keys.key_for(("t1", "s1", "d2"), kid_a) is None  # another device of the store
        with psycopg.connect(pg_dsn) as conn:
            add_device(conn, tenant="t1", store="s1", device="d2", public_key=raw_b)
        clock.advance(1.0)
        assert keys.key_for(("t1", "s1", "d2"), kid_b) is not None  # a miss refreshes
        with psycopg.connect(pg_dsn) as conn:
            revoke_device(conn, tenant="t1", store="s1", device="d1")
        assert keys.key_for(("t1", "s1", "d1"), kid_a) is not None  # cached until `refresh` passed
        clock.advance(1.0)
        assert keys.key_for(("t1", "s1", "d1"), kid_a) is None
        loads = keys.loads
        for _ in range(100):  # a flood of unknown kids: no query each
            assert keys.key_for(("t1", "s1", "d9"), "00" * 8) is None
        assert keys.loads == loads
    finally:
        keys.close()


def test_an_unreachable_registry_keeps_the_last_known_keys(pg_dsn: str) -> None:
    migrate(pg_dsn)
    kid, raw = _key()
    with psycopg.connect(pg_dsn) as conn:
        add_device(conn, tenant="t1", store="s1", device="d1", public_key=raw)
    clock = FakeClock()
    keys = RegistryKeys(pg_dsn, clock, refresh=1.0)
    keys.load()
    keys.close()
    keys.dsn = "postgresql://edge@127.0.0.1:1/edge?connect_timeout=2"  # nothing listens there
    clock.advance(5.0)
    try:
        assert keys.key_for(("t1", "s1", "d1"), kid) is not None
        assert keys.key_for(("t1", "s1", "d2"), kid) is None
    finally:
        keys.close()
