"""Desired-state layers: versioned in PostgreSQL, signed, published retained (downlink-v1).

`set_layer` takes the topic's next `ver` under a transaction-scoped advisory lock on the topic
(two operators at once get two versions, never one twice), stores the signed document and an
audit row, commits, and only then publishes. In that order a version is never reused: a device
that applied ver N ignores every later document of ver <= N, so handing out N again after a
rollback would silently lose a change. A publish that fails leaves the row with
`published_at` NULL; the next `config set` on the topic supersedes it with a higher ver.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.fleet.context import AConn, audit, cloud_kid, doc_digest
from cloud.fleet.publish import Publisher
from edge.wire.downlink import ALL, Layer, desired_topic, document, effective_hash, merge_layers, sign_document


@dataclass(slots=True, frozen=True)
class Target:
    """A layer's topic: tenant; tenant+store; tenant+store+device."""

    tenant: str
    store: str | None = None
    device: str | None = None

    @property
    def layer(self) -> Layer:
        return "tenant" if self.store is None else "store" if self.device is None else "device"

    @property
    def key(self) -> tuple[str, str, str]:
        return self.tenant, self.store or ALL, self.device or ALL

    def topic(self, prefix: str) -> str:
        return desired_topic(prefix, self.tenant, self.store, self.device)

    def __str__(self) -> str:
        return "/".join(self.key)

    def chain(self) -> list[Target]:
        """This layer and the ones beneath it, tenant first (the order they merge in)."""
        out = [Target(self.tenant)]
        if self.store is not None:
            out.append(Target(self.tenant, self.store))
        if self.device is not None:
            out.append(self)
        return out


@dataclass(slots=True, frozen=True)
class LayerRow:
    target: Target
    ver: int
    config: dict[str, Any]
    config_hash: str
    doc_sha256: str
    created_by: str
    created_at: dt.datetime
    published_at: dt.datetime | None

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.target.layer, "target": str(self.target), "ver": self.ver, "config": self.config,
                "hash": self.config_hash, "doc_sha256": self.doc_sha256, "by": self.created_by,
                "at": self.created_at.isoformat(),
                "published_at": self.published_at.isoformat() if self.published_at else None}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def set_layer(  # noqa: PLR0917 - the context of one publish
    conn: AConn, pub: Publisher, key: Ed25519PrivateKey, actor: str, target: Target, config: dict[str, Any],
) -> LayerRow:
    """Store, sign, audit, commit, then publish retained (see the module doc)."""
    topic = target.topic(pub.broker.prefix)
    tenant, store, device = target.key
    config_hash = effective_hash(config)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("desired:" + topic,))
        cur = await conn.execute("SELECT coalesce(max(ver), 0) FROM fleet_desired"
                                 " WHERE tenant = %s AND store = %s AND device = %s", target.key)
        row = await cur.fetchone()
        ver = int(row[0] if row else 0) + 1
        doc = document("desired", tenant, store, device, cloud_kid(key), now_ms(),
                       layer=target.layer, ver=ver, config=config)
        envelope = sign_document(doc, key)
        digest = doc_digest(envelope)
        await conn.execute(
            "INSERT INTO fleet_desired (tenant, store, device, layer, ver, config, config_hash, doc, doc_sha256,"
            " kid, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (tenant, store, device, target.layer, ver, json.dumps(config), config_hash, envelope,
             bytes.fromhex(digest), cloud_kid(key), actor))
        await audit(conn, actor, "config.set", str(target), {"layer": target.layer, "ver": ver, "hash": config_hash},
                    digest)
    await pub.publish(topic, envelope, retain=True)
    async with conn.transaction():
        await conn.execute("UPDATE fleet_desired SET published_at = now()"
                           " WHERE tenant = %s AND store = %s AND device = %s AND ver = %s", (*target.key, ver))
    got = await layer_rows(conn, target, latest=False, limit=1)
    return got[0]


_COLUMNS = ("SELECT tenant, store, device, ver, config, config_hash, doc_sha256, created_by, created_at, published_at"
            " FROM fleet_desired")


def _row(r: tuple[Any, ...]) -> LayerRow:
    tenant, store, device, ver, config, chash, digest, by, at, published = r
    target = Target(str(tenant), None if store == ALL else str(store), None if device == ALL else str(device))
    return LayerRow(target, int(ver), dict(config), str(chash), bytes(digest).hex(), str(by), at, published)


async def layer_rows(conn: AConn, target: Target, *, latest: bool = True, limit: int = 100) -> list[LayerRow]:
    """The topic's documents, newest first; `latest`: only the last published one."""
    sql = _COLUMNS + " WHERE tenant = %s AND store = %s AND device = %s"
    if latest:
        sql += " AND published_at IS NOT NULL"
    cur = await conn.execute((sql + " ORDER BY ver DESC LIMIT %s").encode(), (*target.key, limit))
    return [_row(r) for r in await cur.fetchall()]


async def current(conn: AConn, target: Target) -> tuple[list[LayerRow], dict[str, Any]]:
    """The published layers a device at `target` merges (tenant first) and their merge (without
    the device's local file, which only the device knows)."""
    rows = []
    for t in target.chain():
        got = await layer_rows(conn, t, limit=1)
        rows += got
    return rows, merge_layers(*(r.config for r in rows))


async def history(conn: AConn, target: Target, *, below: bool, limit: int) -> list[LayerRow]:
    """Documents of the topic (with `below`, of every topic under it), newest first."""
    tenant, store, device = target.key
    if not below:
        return await layer_rows(conn, target, latest=False, limit=limit)
    sql = _COLUMNS + " WHERE tenant = %s AND (%s = '_all' OR store = %s) AND (%s = '_all' OR device = %s)"
    cur = await conn.execute((sql + " ORDER BY created_at DESC, ver DESC LIMIT %s").encode(),
                             (tenant, store, store, device, device, limit))
    return [_row(r) for r in await cur.fetchall()]
