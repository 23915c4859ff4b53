"""Storing what devices send on the control stream: `status`, `reported`, `cmd-result`.

Each handler takes one message of one device (`ids` = tenant, store, device, from the topic)
and stores it in one short transaction (a savepoint inside the caller's, if it holds one).
Nothing in a payload is trusted: sizes are bounded before parsing, the JSON must have the
spec's shape, texts are truncated to their column's bound. A payload that is not acceptable
raises `ControlMessageError` (a ValueError, `reason` a metric label: too-large, malformed,
invalid) and stores nothing; the control worker counts it and acks the message.

`reported` is retained and may be redelivered: a document whose device time `t` is older than
the stored one is ignored. A `cmd-result` settles its command once (the first result wins; a
duplicate or a result for an id this cloud never sent to that device changes no command).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any, Final

import psycopg

from edge.errors import EdgeError

Ids = tuple[str, str, str]
MAX_STATUS: Final = 4 * 1024
MAX_REPORTED: Final = 256 * 1024
MAX_RESULT: Final = 256 * 1024  # `status` answers with what `edge status --json` shows
_CODE_RE: Final = re.compile(r"[a-z][a-z-]{0,31}")
_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class ControlMessageError(EdgeError, ValueError):
    """A control message that is dropped (counted by `reason`), never stored."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _check_ids(ids: Ids) -> None:
    if len(ids) != 3 or not all(isinstance(x, str) and _ID_RE.fullmatch(x) for x in ids):
        raise ControlMessageError("invalid", "tenant/store/device are not valid ids")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: PostgreSQL's jsonb holds no infinity
        raise ValueError("a number out of range")
    return value


def _json(payload: bytes, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise ControlMessageError("too-large", f"{len(payload)} bytes > {limit}")
    if b"\\u0000" in payload.lower():  # PostgreSQL's jsonb holds no NUL character
        raise ControlMessageError("malformed", "a NUL character in a string")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
        # a lone surrogate (\\ud800) is valid JSON but no valid text for PostgreSQL or anyone else
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ControlMessageError("malformed", "not UTF-8 JSON of valid text") from None
    if not isinstance(doc, dict):
        raise ControlMessageError("malformed", "not a JSON object")
    return doc


@contextlib.asynccontextmanager
async def _stored(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """The handler's transaction; a value PostgreSQL refuses (a number jsonb cannot hold) is a
    bad payload like any other: nothing stored, ControlMessageError."""
    try:
        async with conn.transaction():
            yield
    except psycopg.errors.DataError as exc:
        raise ControlMessageError("invalid", f"a value PostgreSQL cannot store ({type(exc).__name__})") from None


def _text(value: object, limit: int) -> str | None:
    return value.encode()[:limit].decode(errors="ignore") if isinstance(value, str) else None


_UPSERT = ("INSERT INTO fleet_device_state (tenant, store, device) VALUES (%s, %s, %s)"
           " ON CONFLICT (tenant, store, device) DO NOTHING")


async def handle_status(conn: psycopg.AsyncConnection[Any], ids: Ids, payload: bytes) -> None:
    """uplink-v1 `status` (retained; `offline` is also the last will): online/offline and when."""
    _check_ids(ids)
    doc = _json(payload, MAX_STATUS)
    state = doc.get("state")
    if state not in ("online", "offline"):
        raise ControlMessageError("invalid", "state must be online or offline")
    async with _stored(conn):
        await conn.execute(_UPSERT, ids)
        await conn.execute("UPDATE fleet_device_state SET status = %s, status_at = now(),"
                           " last_seen = CASE WHEN %s::text = 'online' THEN now() ELSE last_seen END"
                           " WHERE tenant = %s AND store = %s AND device = %s", (state, state, *ids))


async def handle_reported(conn: psycopg.AsyncConnection[Any], ids: Ids, payload: bytes) -> None:
    """downlink-v1 `reported`: stored whole (bounded) with its software version; an older one
    (by the device's `t`) than the stored one is ignored."""
    _check_ids(ids)
    doc = _json(payload, MAX_REPORTED)
    t = doc.get("t")
    if type(t) is not int or not 0 <= t < 1 << 63:
        raise ControlMessageError("invalid", "t must be the device's Unix ms")
    for key in ("layers", "apply", "health", "consent"):
        if key in doc and not isinstance(doc[key], dict) and not (key == "apply" and doc[key] is None):
            # `apply` is null until the device attempted its first layer (edge/downlink/reported.py)
            raise ControlMessageError("invalid", f"{key} must be an object")
    software = _text(doc.get("software"), 64)
    async with _stored(conn):
        await conn.execute(_UPSERT, ids)
        await conn.execute(
            "UPDATE fleet_device_state SET reported = %s, reported_at = now(), software = %s, last_seen = now()"
            " WHERE tenant = %s AND store = %s AND device = %s"
            " AND (reported IS NULL OR (reported->>'t')::bigint <= %s)",
            (json.dumps(doc), software, *ids, t))


async def handle_cmd_result(conn: psycopg.AsyncConnection[Any], ids: Ids, payload: bytes) -> None:
    """downlink-v1 `cmd-result`: settles the command `id` sent to this very device, once."""
    _check_ids(ids)
    doc = _json(payload, MAX_RESULT)
    cid, ok = doc.get("id"), doc.get("ok")
    if type(cid) is not str or not 1 <= len(cid) <= 64:
        raise ControlMessageError("invalid", "id must be a str of 1..64 characters")
    if type(ok) is not bool:
        raise ControlMessageError("invalid", "ok must be true or false")
    result: str | None = None
    error = detail = None
    if ok:
        res = doc.get("result", {})
        if not isinstance(res, dict):
            raise ControlMessageError("invalid", "result must be an object")
        result = json.dumps(res)
    else:
        code = doc.get("error")
        if type(code) is not str or not _CODE_RE.fullmatch(code):
            raise ControlMessageError("invalid", "error must be a code such as bad-args")
        error, detail = code, _text(doc.get("detail"), 1000) or ""
    async with _stored(conn):
        cur = await conn.execute(
            "UPDATE fleet_commands SET state = %s, error = %s, detail = %s, result = %s, result_at = now()"
            " WHERE id = %s AND tenant = %s AND store = %s AND device = %s AND state IN ('pending', 'sent', 'unsent')"
            " RETURNING id",
            ("ok" if ok else "error", error, detail, result, cid, *ids))
        settled = await cur.fetchone() is not None
        await conn.execute(_UPSERT, ids)
        if settled:
            await conn.execute("UPDATE fleet_device_state SET last_cmd_id = %s, last_cmd_ok = %s, last_cmd_at = now(),"
                               " last_seen = now() WHERE tenant = %s AND store = %s AND device = %s", (cid, ok, *ids))
        else:
            await conn.execute("UPDATE fleet_device_state SET last_seen = now()"
                               " WHERE tenant = %s AND store = %s AND device = %s", ids)
