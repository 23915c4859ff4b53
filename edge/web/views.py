"""The documents the store page polls: `/api/status` and `/api/analytics`.

Both are built from an allow-list of fields, never by passing a component's status through:
counts, states, ages and names from configuration only. Every string that reaches the page
also goes through the log redactor as defence in depth, so even a driver's error text that
quoted an identifier would show as `[redacted:...]`. Analytics cells come as numbers or null
(null: suppressed below k, or no data), and lists are bounded.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from edge import __version__
from edge.health import Snapshot, health_doc
from edge.privacy.scrub import redact_identifiers

MAX_INTERVALS = 1440  # a day of 1-minute intervals
MAX_ZONES = 64
MAX_BUCKETS = 32
MAX_LAYERS = 16
TEXT_MAX = 200


class AnalyticsSource(Protocol):
    """What the page reads from `rt.analytics` (edge/analytics): today's published aggregates."""

    def snapshot(self) -> dict[str, Any]: ...


def text(v: object) -> str:
    return redact_identifiers(str(v))[:TEXT_MAX]


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: object) -> int | None:
    f = _num(v)
    return None if f is None else int(f)


def _age_s(now_ms: int, then_ms: object) -> float | None:
    t = _num(then_ms)
    return None if t is None else max(0.0, (now_ms - t) / 1000)


def config_info(config_path: str | None, layers: list[object]) -> dict[str, Any]:
    """The config applied: the local file (path, modified time) and any layers a component reports."""
    doc: dict[str, Any] = {"file": None, "modified_ms": None, "layers": []}
    if config_path:
        doc["file"] = text(os.path.abspath(config_path))
        with contextlib.suppress(OSError):
            doc["modified_ms"] = int(Path(config_path).stat().st_mtime * 1000)
    for layer in layers[:MAX_LAYERS]:
        if isinstance(layer, Mapping):
            doc["layers"].append({k: text(layer[k]) for k in ("name", "version", "source", "applied_ms")
                                  if layer.get(k) is not None})
        else:
            doc["layers"].append({"name": text(layer)})
    return doc


def status_doc(s: Snapshot, config: dict[str, Any]) -> dict[str, Any]:
    """/api/status: health, drivers, buffer, uplink, config; no identifiers."""
    health = health_doc(s)
    drivers = [{
        "name": text(d.get("name")), "kind": text(d.get("kind")), "state": text(d.get("state")),
        "reason": text(d["degraded_reason"]) if d.get("degraded_reason") else None,
        "readings": _int(d.get("readings")) or 0, "errors": _int(d.get("errors")) or 0,
        "restarts": _int(d.get("restarts")) or 0,
        "last_reading_age_s": _age_s(s.wall_ms, d.get("last_reading_ts")),
    } for d in s.drivers]
    buffer: dict[str, Any] | None = None
    st = s.stats
    if st is not None:
        buffer = {
            "fresh": s.stats_fresh,
            "backlog": {text(src): {"events": b.events, "bytes": b.bytes} for src, b in sorted(st.backlog.items())},
            "events": sum(b.events for b in st.backlog.values()),
            "bytes": sum(b.bytes for b in st.backlog.values()),
            "oldest_unsent_age_s": _age_s(s.wall_ms, st.oldest_unsent_ts),
            "batches_pending": st.batches_pending,
            "batches_quarantined": st.batches_quarantined,
            "dropped": sum(st.drops.values()),
            "degraded": st.degraded is not None,
        }
    up = s.components.get("uplink")
    uplink: dict[str, Any] = {"state": "disabled"}
    if up is not None:
        uplink = {
            "state": text(up.get("state")),
            "inflight": _int(up.get("inflight")) or 0,
            "acked": _int(up.get("acked")) or 0,
            "events_acked": _int(up.get("events_acked")) or 0,
            "last_error": text(up["last_error"]) if up.get("last_error") else None,
        }
    last_ack_ms = st.last_ack_ms if st is not None else None
    uplink["last_ack_age_s"] = _age_s(s.wall_ms, last_ack_ms)
    return {
        "device": s.device, "store": s.store, "tenant": s.tenant, "version": __version__,
        "now_ms": s.wall_ms,
        "health": {"status": health["status"], "reasons": [text(r) for r in health["reasons"]]},
        "clock_synchronized": s.synchronized,
        "loop_lag_s": round(s.lag_s, 4),
        "drivers": drivers,
        "buffer": buffer,
        "uplink": uplink,
        "components": {text(k): text(v.get("state")) for k, v in s.components.items()},
        "config": config,
    }


def analytics_doc(source: AnalyticsSource | None) -> dict[str, Any]:
    """/api/analytics: today's aggregates from `rt.analytics`, re-typed field by field."""
    if source is None:
        return {"enabled": False}
    try:
        raw: object = source.snapshot()
    except Exception as exc:  # a failing engine must not take the page down
        return {"enabled": True, "error": type(exc).__name__}
    if not isinstance(raw, Mapping):
        return {"enabled": True, "error": "bad snapshot"}
    zones = [text(z) for z in (raw.get("zones") or [])[:MAX_ZONES] if isinstance(z, str)]
    intervals = []
    for iv in (raw.get("intervals") or [])[-MAX_INTERVALS:]:
        if not isinstance(iv, Mapping):
            continue
        dwell = _map(iv.get("dwell"))
        occ = _map(iv.get("occupancy"))
        intervals.append({
            "start": _int(iv.get("start")), "end": _int(iv.get("end")),
            "footfall": _int(iv.get("footfall")), "receipts": _int(iv.get("receipts")),
            "conversion": _num(iv.get("conversion")),
            "dwell": {k: _num(dwell.get(k)) for k in ("mean_s", "p50_s", "p90_s")},
            "occupancy": {z: _cell(occ.get(z)) for z in zones},
        })
    hist = [{"bucket": text(b.get("bucket")), "visits": _int(b.get("visits"))}
            for b in (raw.get("dwell_histogram") or [])[:MAX_BUCKETS] if isinstance(b, Mapping)]
    totals = _map(raw.get("totals"))
    return {
        "enabled": True,
        "interval_s": _int(raw.get("interval_s")),
        "day": text(raw.get("day") or ""),
        "k": _int(raw.get("k")),
        "zones": zones,
        "intervals": intervals,
        "dwell_histogram": hist,
        "totals": {"footfall": _int(totals.get("footfall")), "receipts": _int(totals.get("receipts")),
                   "conversion": _num(totals.get("conversion")), "staff": _int(totals.get("staff"))},
        "suppressed": _int(raw.get("suppressed")) or 0,
    }


def _map(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _cell(v: object) -> dict[str, Any]:
    m = _map(v)
    return {"mean": _num(m.get("mean")), "peak": _int(m.get("peak"))}
