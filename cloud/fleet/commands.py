"""Signed commands to devices (downlink-v1 §Commands) and collecting their results.

One command document per device, each with its own id (unique, <= 64 characters) and `exp`.
Like the layers, a command is stored (state `pending`) and audited before it is published, then
marked `sent` (or `unsent` when the publish failed: the device never saw it). Results come on
`cmd-result`; the control workers store them (handlers.handle_cmd_result). `send --wait`
subscribes to the targets' cmd-result topics *before* publishing and stores what arrives itself
through the same handler (the first result wins, so the worker's copy changes nothing), and
also polls PostgreSQL, so it works with or without a worker running.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.db.errors import DbError
from cloud.fleet.context import AConn, audit, cloud_kid, doc_digest
from cloud.fleet.desired import now_ms
from cloud.fleet.handlers import ControlMessageError, Ids, handle_cmd_result
from cloud.fleet.publish import Publisher, PublishError
from edge.wire.downlink import ALL, cmd_topic, document, parse_down_topic, sign_document

log = structlog.get_logger()

# the spec's table; anything else the device answers unknown-command, so a typo is refused here
KNOWN: Final = ("ping", "status", "restart", "keys.rotate", "uplink.resend", "log.level", "cloud-key.add",
                "cloud-key.retire")


@dataclass(slots=True, frozen=True)
class Sent:
    id: str
    ids: Ids
    name: str
    exp_ms: int
    state: str = "sent"
    error: str | None = None
    detail: str | None = None
    result: Any = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": "/".join(self.ids), "name": self.name, "exp": self.exp_ms,
                "state": self.state, "error": self.error, "detail": self.detail, "result": self.result}


def parse_args(pairs: Sequence[str], json_text: str | None, name: str) -> dict[str, Any]:
    """`k=v` pairs (a value that reads as JSON, e.g. 5 or true, is taken as such) and/or `--args`
    JSON object. For cloud-key.add, `pub` is given as 64 hex characters (sent as bin)."""
    args: dict[str, Any] = {}
    if json_text is not None:
        try:
            got = json.loads(json_text)
        except ValueError as exc:
            raise DbError(f"--args is not JSON: {exc}") from None
        if not isinstance(got, dict):
            raise DbError("--args must be a JSON object, e.g. '{\"level\": \"debug\"}'")
        args.update(got)
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise DbError(f"argument {pair!r} is not KEY=VALUE")
        try:
            args[k] = json.loads(v)
        except ValueError:
            args[k] = v
    if name == "cloud-key.add" and isinstance(args.get("pub"), str):
        try:
            pub = bytes.fromhex(args["pub"])
        except ValueError:
            pub = b""
        if len(pub) != 32:
            raise DbError("cloud-key.add pub=HEX needs the 64 hex characters of an Ed25519 public key")
        args["pub"] = pub
    return args


async def targets(conn: AConn, tenant: str | None, store: str | None, device: str) -> list[Ids]:
    """The registered devices addressed: one (DEVICE), or every active one of --store / --tenant
    (DEVICE `_all`). A device name alone is looked up in the registry (it must be unambiguous)."""
    if device == ALL and tenant is None:
        raise DbError("_all needs --tenant (and --store for one store)")
    cur = await conn.execute(
        "SELECT DISTINCT tenant, store, device FROM devices WHERE state = 'active'"
        " AND (%s::text IS NULL OR tenant = %s) AND (%s::text IS NULL OR store = %s) AND (%s = '_all' OR device = %s)"
        " ORDER BY tenant, store, device", (tenant, tenant, store, store, device, device))
    found: list[Ids] = [(str(t), str(s), str(d)) for t, s, d in await cur.fetchall()]
    if not found:
        where = "/".join(x for x in (tenant, store) if x) or "any tenant"
        raise DbError(f"no active registered device {device} in {where}",
                      hint="see edge-cloud devices list (a device must be enrolled or added first)")
    if device != ALL and len(found) > 1:
        raise DbError(f"device {device} is registered in {len(found)} stores",
                      hint="name it with --tenant and --store")
    return found


async def send(  # noqa: PLR0917 - the context of one send
    conn: AConn, pub: Publisher, key: Ed25519PrivateKey, actor: str, to: Sequence[Ids], name: str,
    args: Mapping[str, Any], ttl_s: float,
) -> list[Sent]:
    """Store + audit every command (one transaction), then publish each; see the module doc."""
    t = now_ms()
    exp = t + int(ttl_s * 1000)
    made: list[tuple[Sent, str, bytes]] = []
    stored_args = json.dumps({k: (v.hex() if isinstance(v, bytes) else v) for k, v in args.items()})
    async with conn.transaction():
        for ids in to:
            cid = "c" + secrets.token_hex(12)
            envelope = sign_document(document("cmd", *ids, cloud_kid(key), t, id=cid, name=name, args=dict(args),
                                              exp=exp), key)
            digest = doc_digest(envelope)
            await conn.execute(
                "INSERT INTO fleet_commands (id, tenant, store, device, name, args, exp_ms, doc_sha256, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (cid, *ids, name, stored_args, exp, bytes.fromhex(digest), actor))
            await audit(conn, actor, "cmd.send", "/".join(ids), {"id": cid, "name": name, "exp": exp}, digest)
            made.append((Sent(cid, ids, name, exp), cmd_topic(pub.broker.prefix, *ids), envelope))
    out: list[Sent] = []
    for sent, topic, envelope in made:
        try:
            await pub.publish(topic, envelope, retain=False)
        except PublishError:
            await _mark(conn, sent.id, "unsent")
            out.append(Sent(sent.id, sent.ids, name, exp, state="unsent"))
            continue
        await _mark(conn, sent.id, "sent")
        out.append(sent)
    return out


async def _mark(conn: AConn, cid: str, state: str) -> None:
    async with conn.transaction():
        await conn.execute("UPDATE fleet_commands SET state = %s WHERE id = %s AND state = 'pending'", (state, cid))


async def subscribe_results(pub: Publisher, to: Sequence[Ids]) -> None:
    """Subscribe to the targets' cmd-result topics (before sending, so no result is missed)."""
    prefix = pub.broker.prefix
    filters = sorted({f"{prefix}/{t}/{s}/{d}/cmd-result" for t, s, d in to}) if len(to) <= 64 else \
        sorted({f"{prefix}/{t}/+/+/cmd-result" for t, _, _ in to})
    for f in filters:
        await pub.mqtt.subscribe(f, qos=1)


async def collect(conn: AConn, pub: Publisher, sent: Sequence[Sent], wait_s: float) -> list[Sent]:
    """Wait up to `wait_s` for every sent command's result; returns each with its final state."""
    waiting = {s.id for s in sent if s.state == "sent"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    messages = pub.mqtt.messages
    while waiting and loop.time() < deadline:
        try:
            async with asyncio.timeout(min(1.0, max(0.0, deadline - loop.time()))):
                m = await anext(messages)
        except TimeoutError:
            pass
        else:
            await _store_result(conn, pub.broker.prefix, m)
        waiting -= await _settled(conn, waiting)
    return await fetch(conn, sent)


async def _store_result(conn: AConn, prefix: str, m: aiomqtt.Message) -> None:
    try:
        where = parse_down_topic(m.topic.value, prefix)
        if where.kind != "cmd-result":
            return
        payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b""
        await handle_cmd_result(conn, (where.tenant, where.store, where.device), payload)
    except (ControlMessageError, ValueError) as exc:
        log.warning("cmd_result_dropped", reason=getattr(exc, "reason", "invalid"), topic=m.topic.value[:200])


async def _settled(conn: AConn, ids: set[str]) -> set[str]:
    cur = await conn.execute("SELECT id FROM fleet_commands WHERE id = ANY(%s) AND state IN ('ok', 'error')",
                             (sorted(ids),))
    return {str(r[0]) for r in await cur.fetchall()}


async def fetch(conn: AConn, sent: Sequence[Sent]) -> list[Sent]:
    cur = await conn.execute(
        "SELECT id, tenant, store, device, name, exp_ms, state, error, detail, result FROM fleet_commands"
        " WHERE id = ANY(%s)", ([s.id for s in sent],))
    by_id = {str(r[0]): Sent(str(r[0]), (str(r[1]), str(r[2]), str(r[3])), str(r[4]), int(r[5]), str(r[6]),
                             r[7], r[8], r[9]) for r in await cur.fetchall()}
    return [by_id.get(s.id, s) for s in sent]
