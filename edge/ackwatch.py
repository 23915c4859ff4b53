"""The ack alarm: batches wait, and no valid ack has deleted one for too long.

A wrong `uplink.cloud_public_key` makes every genuine ack refused (`ack_rejected
reason=bad-signature`); a cloud that stopped acking looks the same from here. Either way
the window fills and nothing more is sent while the daemon itself is perfectly alive. So
`/healthz` (edge/health.py) turns 503 and `edge status` (edge/status.py) prints an ALARM line
when sealed batches have waited longer than `health.ack_timeout_alarm` since the later of
the last valid ack and the oldest pending batch's sealing. Refused acks are named in the
reason, because they point at the fix (the key), not at the network.

One function for both, on plain values, so the daemon (live stats) and `edge status`
(another process reading the buffer and runtime.json) cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge.units import format_duration

# uplink status counters of acks that deleted nothing because they were not valid
REFUSED_COUNTERS = {"acks_forged": "bad-signature", "acks_malformed": "malformed"}


@dataclass(slots=True, frozen=True)
class AckAlarm:
    waited_s: float  # since the last valid ack (or the oldest pending batch, when later)
    batches: int  # sealed batches waiting for their ack
    refused: Mapping[str, int]  # reason -> acks refused by this daemon run
    reason: str  # one line for /healthz and `edge status`; no identifiers

    def to_json(self) -> dict[str, Any]:
        return {"waited_s": round(self.waited_s, 1), "batches": self.batches, "refused": dict(self.refused),
                "reason": self.reason}


def refused_acks(uplink_status: Mapping[str, Any] | None) -> dict[str, int]:
    """reason -> count of refused acks from an uplink component's `status()` (zeros left out)."""
    if not uplink_status:
        return {}
    out: dict[str, int] = {}
    for key, reason in REFUSED_COUNTERS.items():
        try:
            n = int(uplink_status.get(key) or 0)
        except (TypeError, ValueError):
            n = 0
        if n:
            out[reason] = n
    return out


def ack_alarm(
    *,
    pending: int,
    oldest_pending_ms: int | None,
    last_ack_ms: int | None,
    refused: Mapping[str, int],
    now_ms: int,
    threshold_s: float,
) -> AckAlarm | None:
    """The alarm, or None while acks keep up (or nothing waits)."""
    if pending <= 0 or oldest_pending_ms is None:
        return None
    since = max(oldest_pending_ms, last_ack_ms or 0)
    waited = max(0.0, (now_ms - since) / 1000)
    if waited <= threshold_s:
        return None
    text = f"{pending} batches unacknowledged for {format_duration(waited)}"
    if refused:
        shown = ", ".join(f"{n} {reason}" for reason, n in sorted(refused.items()))
        text += (f": acks refused ({shown}); check uplink.cloud_public_key against the cloud's key "
                 "(docs/operations.md)")
    else:
        text += ": no ack received; check the uplink and the cloud receiver (docs/operations.md)"
    return AckAlarm(waited_s=waited, batches=pending, refused=dict(refused), reason=text)
