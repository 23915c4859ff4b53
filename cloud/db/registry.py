"""The device registry: which Ed25519 key may sign as which (tenant, store, device).

A key is valid only for its own identity (the ingest refuses it elsewhere with `unknown-key`),
and a revoked key is refused everywhere. The kid is derived from the key (uplink-v1), so the
registry is keyed by kid; one key belongs to exactly one device.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg

from cloud.cluster.natsconf import check_id
from cloud.db.errors import DbError
from edge.wire.uplink import kid_of

_SELECT = "SELECT kid, public_key, tenant, store, device, state, created_at, revoked_at FROM devices"
_RETURNING = " RETURNING kid, public_key, tenant, store, device, state, created_at, revoked_at"


@dataclass(slots=True, frozen=True)
class Device:
    kid: str
    public_key: bytes
    tenant: str
    store: str
    device: str
    state: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    def as_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant, "store": self.store, "device": self.device, "kid": self.kid,
            "public_key": self.public_key.hex(), "state": self.state,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _device(row: tuple[object, ...]) -> Device:
    kid, pub, tenant, store, device, state, created, revoked = row
    if not isinstance(pub, bytes) or not isinstance(created, dt.datetime):
        raise DbError("devices row has unexpected column types")
    return Device(str(kid), pub, str(tenant), str(store), str(device), str(state), created,
                  revoked if isinstance(revoked, dt.datetime) else None)


def parse_public_key(text: str) -> bytes:
    """A raw Ed25519 public key given as 64 hex characters (what `edge keys show` prints)."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise DbError("expected the device's public key as 64 hex characters", hint="see `edge keys show`")
    return raw


def add_device(
    conn: psycopg.Connection[tuple[object, ...]], *, tenant: str, store: str, device: str, public_key: bytes,
    enrolled_with: str | None = None,
) -> Device:
    """Register `public_key` for exactly (tenant, store, device); idempotent for the same triple.

    A key registered for another device is refused; re-adding a revoked key reactivates it.
    """
    for kind, value in (("tenant", tenant), ("store", store), ("device", device)):
        check_id(kind, value)
    kid = kid_of(public_key)
    with conn.transaction():
        row = conn.execute(_SELECT + " WHERE kid = %s FOR UPDATE", (kid,)).fetchone()
        if row is not None:
            have = _device(row)
            if (have.tenant, have.store, have.device) != (tenant, store, device):
                raise DbError(f"key {kid} is registered for {have.tenant}/{have.store}/{have.device}",
                              hint="a key belongs to one device; revoke it there, the device makes a new one")
            if have.state == "active":
                return have
            conn.execute("UPDATE devices SET state = 'active', revoked_at = NULL, updated_at = now() WHERE kid = %s",
                         (kid,))
        else:
            conn.execute(
                "INSERT INTO devices (kid, public_key, tenant, store, device, enrolled_with)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (kid, public_key, tenant, store, device, enrolled_with),
            )
        got = conn.execute(_SELECT + " WHERE kid = %s", (kid,)).fetchone()
    if got is None:
        raise DbError(f"device key {kid} vanished while being added")
    return _device(got)


def revoke_device(
    conn: psycopg.Connection[tuple[object, ...]], *, tenant: str, store: str, device: str, kid: str | None = None,
) -> list[Device]:
    """Revoke every active key of the device (or only `kid`); returns what was revoked."""
    sql = ("UPDATE devices SET state = 'revoked', revoked_at = now(), updated_at = now()"
           " WHERE tenant = %s AND store = %s AND device = %s AND state = 'active'")
    params: list[object] = [tenant, store, device]
    if kid is not None:
        sql += " AND kid = %s"
        params.append(kid)
    with conn.transaction():
        rows = conn.execute((sql + _RETURNING).encode(), params).fetchall()
    return [_device(r) for r in rows]


def list_devices(
    conn: psycopg.Connection[tuple[object, ...]], *, tenant: str | None = None, store: str | None = None,
) -> list[Device]:
    sql = _SELECT + " WHERE (%s::text IS NULL OR tenant = %s) AND (%s::text IS NULL OR store = %s)"
    rows = conn.execute(sql + " ORDER BY tenant, store, device, created_at",
                        (tenant, tenant, store, store)).fetchall()
    return [_device(r) for r in rows]
