"""`reported` (downlink-v1 §Reported state): what the device runs with, as retained UTF-8 JSON.

    {"t", "software", "layers": {"tenant": ver, "store": ver, "device": ver}, "effective": hash,
     "apply": {"state", "layer", "ver", "errors"} | null, "consent": {"shards", "pseudonyms"},
     "cloud_kids": [...], "health": {"backlog", "oldest_unsent_s", "drivers": {name: state},
     "uplink", "last_ack_ms"}}

Counts, states, versions and key ids only: no field carries a raw identifier or a pseudonym
(consent is reported as two counts). `apply` is null until the first layer was attempted.
"""

from __future__ import annotations

import json
from typing import Any

from edge import __version__
from edge.downlink.desired import DesiredState
from edge.downlink.trust import TrustedKeys
from edge.health import buffer_stats
from edge.supervisor import Runtime


async def reported_doc(rt: Runtime, desired: DesiredState, trusted: TrustedKeys) -> dict[str, Any]:
    now = rt.clock.wall_ms()
    stats, _ = await buffer_stats(rt)
    backlog = sum(b.events for b in stats.backlog.values()) if stats is not None else None
    oldest = stats.oldest_unsent_ts if stats is not None else None
    uplink = next((c for c in rt.components if c.name == "uplink"), None)
    up = uplink.status() if uplink is not None else {}
    last_ack = (stats.last_ack_ms if stats is not None else None) or up.get("last_ack_ms")
    shards, pseudonyms = rt.consent_sync.counts() if rt.consent_sync is not None else (0, 0)
    apply = desired.apply_result()
    return {
        "t": now,
        "software": __version__,
        "layers": desired.layers(),
        "effective": desired.effective_hash,
        "apply": None if apply is None else {k: apply.get(k) for k in ("state", "layer", "ver", "errors")},
        "consent": {"shards": shards, "pseudonyms": pseudonyms},
        "cloud_kids": sorted(trusted.keys()),
        "health": {
            "backlog": backlog,
            "oldest_unsent_s": None if oldest is None else round(max(0.0, (now - oldest) / 1000), 3),
            "drivers": {d.name: d.state for d in rt.drivers},
            "uplink": up.get("state", "disabled"),
            "last_ack_ms": last_ack,
        },
    }


async def build_reported(rt: Runtime, desired: DesiredState, trusted: TrustedKeys) -> bytes:
    doc = await reported_doc(rt, desired, trusted)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
