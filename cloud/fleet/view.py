"""The fleet view: one row per registered device from what the control workers stored.

Sources: the device registry (`devices`, active keys: a device is listed once however many keys
it has), its latest `status` (online/offline; `offline` is also its last will) and `reported`
document (fleet_device_state). From `reported`: software, `layers`, `apply` (its state, the
number of its errors and, in `--json`, the errors themselves), and `health`'s
`backlog` (events; a number, or per source `{"events": n, ...}` summed), `oldest_unsent_s`,
`last_ack_ms`. The oldest unsent age is the reported one plus the time since that report (the
event has aged since, unless the device sent it meanwhile and will say so in its next report).

Problems (`--problems`): `offline` (status offline, or never heard from), `rolled-back` and
`rejected` (the last apply attempt), `stale` (oldest unsent event older than `--stale`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cloud.fleet.context import AConn

MAX_DETAILS = 20  # apply errors shown per device (the count says how many there are)
MAX_DETAIL = 300  # characters of each

_QUERY = """
SELECT d.tenant, d.store, d.device, s.status, s.status_at, s.last_seen, s.software, s.reported, s.reported_at,
       s.last_cmd_id, s.last_cmd_ok, s.last_cmd_at
FROM (SELECT DISTINCT tenant, store, device FROM devices WHERE state = 'active'
      AND (%s::text IS NULL OR tenant = %s) AND (%s::text IS NULL OR store = %s)) d
LEFT JOIN fleet_device_state s USING (tenant, store, device)
ORDER BY d.tenant, d.store, d.device
"""


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _backlog(v: object) -> int | None:
    if isinstance(v, dict):
        total = 0
        for x in v.values():
            n = _num(x.get("events") if isinstance(x, dict) else x)
            total += int(n) if n is not None else 0
        return total
    n = _num(v)
    return None if n is None else int(n)


@dataclass(slots=True)
class DeviceRow:
    tenant: str
    store: str
    device: str
    state: str  # online, offline, unknown (never heard from)
    last_seen: dt.datetime | None
    software: str | None
    layers: dict[str, int] = field(default_factory=dict)
    apply: str | None = None
    apply_errors: int = 0
    apply_detail: list[str] = field(default_factory=list)  # the errors themselves (key paths, reasons)
    backlog: int | None = None
    oldest_unsent_s: float | None = None
    last_ack: dt.datetime | None = None
    last_cmd: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.tenant}/{self.store}/{self.device}"

    def as_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "store": self.store, "device": self.device, "state": self.state,
                "last_seen": self.last_seen.isoformat() if self.last_seen else None, "software": self.software,
                "layers": self.layers, "apply": self.apply, "apply_errors": self.apply_errors,
                "apply_detail": self.apply_detail,
                "backlog": self.backlog,
                "oldest_unsent_s": None if self.oldest_unsent_s is None else round(self.oldest_unsent_s, 1),
                "last_ack": self.last_ack.isoformat() if self.last_ack else None, "last_cmd": self.last_cmd,
                "problems": self.problems}


def build_row(r: tuple[Any, ...], now: dt.datetime, stale_s: float) -> DeviceRow:
    tenant, store, device, status, _status_at, last_seen, software, reported, reported_at, cmd_id, cmd_ok, _ = r
    row = DeviceRow(str(tenant), str(store), str(device), str(status or "unknown"), last_seen, software)
    rep: dict[str, Any] = reported if isinstance(reported, dict) else {}
    layers = rep.get("layers")
    if isinstance(layers, dict):
        row.layers = {k: int(v) for k, v in layers.items() if k in ("tenant", "store", "device")
                      and isinstance(v, int) and not isinstance(v, bool)}
    apply = rep.get("apply")
    if isinstance(apply, dict) and isinstance(apply.get("state"), str):
        row.apply = str(apply["state"])[:16]
        errors = apply.get("errors")
        row.apply_errors = len(errors) if isinstance(errors, list) else 0
        if isinstance(errors, list):
            row.apply_detail = [e[:MAX_DETAIL] for e in errors[:MAX_DETAILS] if isinstance(e, str)]
    health = rep.get("health")
    if isinstance(health, dict):
        row.backlog = _backlog(health.get("backlog"))
        oldest = _num(health.get("oldest_unsent_s"))
        if oldest is not None and oldest > 0 and isinstance(reported_at, dt.datetime):
            oldest += max(0.0, (now - reported_at).total_seconds())
        row.oldest_unsent_s = oldest
        ack = _num(health.get("last_ack_ms"))
        if ack is not None and 0 < ack < 1e14:
            row.last_ack = dt.datetime.fromtimestamp(ack / 1000, dt.UTC)
    if cmd_id is not None:
        row.last_cmd = f"{cmd_id} {'ok' if cmd_ok else 'error'}"
    if row.state != "online":
        row.problems.append("offline")
    if row.apply in ("rolled-back", "rejected"):
        row.problems.append(row.apply)
    if row.oldest_unsent_s is not None and row.oldest_unsent_s > stale_s:
        row.problems.append("stale")
    return row


async def fleet_rows(
    conn: AConn, *, tenant: str | None, store: str | None, stale_s: float, now: dt.datetime | None = None,
) -> list[DeviceRow]:
    cur = await conn.execute(_QUERY, (tenant, tenant, store, store))
    at = now or dt.datetime.now(dt.UTC)
    return [build_row(r, at, stale_s) for r in await cur.fetchall()]


def _ago(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "never"
    s = max(0, int((now - t).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    n = int(s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if n >= size:
            return f"{n // size}{unit}"
    return f"{n}s"


def table(rows: list[DeviceRow], now: dt.datetime) -> str:
    head = ("DEVICE", "STATE", "LAST SEEN", "VERSION", "LAYERS T/S/D", "APPLY", "BACKLOG", "OLDEST", "LAST ACK",
            "PROBLEMS")
    body = [(r.name, r.state, _ago(r.last_seen, now), r.software or "-",
             "/".join(str(r.layers.get(k, 0)) for k in ("tenant", "store", "device")) if r.layers else "-",
             (r.apply or "-") + (f" ({r.apply_errors} errors)" if r.apply_errors else ""),
             "-" if r.backlog is None else str(r.backlog), _age(r.oldest_unsent_s), _ago(r.last_ack, now),
             ",".join(r.problems) or "-") for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))
