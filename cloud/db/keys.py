"""`DeviceKeys` over the PostgreSQL device registry (the `devices` table, cloud/db/registry.py).

Design. The ingest core asks `key_for(ids, kid)` for every batch it has not stored yet; a query
per batch would put the registry on the hot path and make a registry hiccup fail a group that
does not need it. So the worker keeps the active keys in memory: one full load, then every
`refresh` seconds only the rows changed since (by `updated_at`, with an overlap that covers
transactions committed late). A revoked or re-bound key is therefore refused at most `refresh`
seconds after `edge-cloud devices revoke` (1 s by default). A miss (a device enrolled a moment
ago) refreshes at once, at most once per `miss_interval`, so a flood of unknown kids costs one
small query a second, not one per message.

When PostgreSQL cannot be reached the last known keys stay in use (logged once per outage):
batches of known devices are still verified, the store's own failure decides the group, and a
device enrolled during the outage is refused `unknown-key` (never answered; it resends).
Lookups run in the core's worker thread; the connection is this object's own (autocommit).
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud.store import Ids
from edge.clock import Clock

log = structlog.get_logger()

OVERLAP = dt.timedelta(seconds=60)  # rows whose transaction began up to this long before the last seen change
FULL_RELOAD = 300.0  # s between full loads (catches anything the incremental refresh could miss)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_COLUMNS = "SELECT kid, public_key, tenant, store, device, state, updated_at FROM devices"


@dataclass(slots=True, frozen=True)
class _Key:
    ids: Ids
    key: Ed25519PublicKey


@dataclass(slots=True)
class RegistryKeys:
    """Active device keys from PostgreSQL, cached and refreshed (see the module doc)."""

    dsn: str
    clock: Clock
    refresh: float = 1.0
    miss_interval: float = 1.0
    _keys: dict[str, _Key] = field(default_factory=dict)  # kid -> its one identity
    _conn: psycopg.Connection[tuple[Any, ...]] | None = None
    _watermark: dt.datetime | None = None
    _loaded_at: float = -1e18
    _full_at: float = -1e18
    _failing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    loads: int = 0

    def load(self) -> None:
        """Full load now; raises psycopg.Error when the database cannot be read (at start)."""
        with self._lock:
            self._load(full=True)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def key_for(self, ids: Ids, kid: str) -> Ed25519PublicKey | None:
        now = self.clock.monotonic()
        if now - self._loaded_at >= self.refresh:
            self._try_refresh()
        hit = self._keys.get(kid)
        if hit is None and now - self._loaded_at >= self.miss_interval:
            self._try_refresh()
            hit = self._keys.get(kid)
        return hit.key if hit is not None and hit.ids == ids else None

    def __len__(self) -> int:
        return len(self._keys)

    # ---------------------------------------------------------------------------------------

    def _try_refresh(self) -> None:
        with self._lock:
            try:
                self._load(full=self.clock.monotonic() - self._full_at >= FULL_RELOAD)
            except psycopg.Error as exc:
                self._loaded_at = self.clock.monotonic()  # retried after `refresh`, not per batch
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                if not self._failing:
                    log.warning("registry_unavailable", error=str(exc)[:200], keys=len(self._keys),
                                hint="the last known device keys stay in use until PostgreSQL is back")
                self._failing = True
            else:
                if self._failing:
                    log.info("registry_available", keys=len(self._keys))
                self._failing = False

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        return self._conn

    def _load(self, *, full: bool) -> None:
        conn = self._connection()
        if full or self._watermark is None:
            rows = conn.execute(_COLUMNS + " WHERE state = 'active'").fetchall()
            keys: dict[str, _Key] = {}
            self._watermark = None
        else:
            rows = conn.execute(_COLUMNS + " WHERE updated_at >= %s", (self._watermark - OVERLAP,)).fetchall()
            keys = dict(self._keys)
        for kid, pub, tenant, store, device, state, updated in rows:
            if state == "active" and isinstance(pub, bytes) and len(pub) == 32:
                keys[str(kid)] = _Key((str(tenant), str(store), str(device)), Ed25519PublicKey.from_public_bytes(pub))
            else:
                keys.pop(str(kid), None)
            if isinstance(updated, dt.datetime) and (self._watermark is None or updated > self._watermark):
                self._watermark = updated
        if full:
            self._full_at = self.clock.monotonic()
            row = conn.execute("SELECT max(updated_at) FROM devices").fetchone()  # revoked rows too
            latest = row[0] if row and isinstance(row[0], dt.datetime) else _EPOCH
            self._watermark = max(self._watermark or _EPOCH, latest)
        self._keys = keys
        self._loaded_at = self.clock.monotonic()
        self.loads += 1
