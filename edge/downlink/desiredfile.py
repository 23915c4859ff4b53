"""`desired.json` in the state folder: the accepted desired layers as received, and a summary.

    {"v": 1, "layers": {layer: ver}, "effective": hash, "apply": {...} | null,
     "attempted": {layer: highest ver attempted}, "trial": {...} | null,
     "current": {layer: base64 envelope}, "previous": {layer: base64 envelope} | null}

Written atomically, 0600 (edge/downlink/trust.py `write_atomic`). The envelopes are re-verified
with the trusted cloud keys whenever the daemon starts (edge/downlink/desired.py `boot_config`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge.downlink.trust import write_atomic
from edge.wire.downlink import LAYERS

log = structlog.get_logger("edge.downlink.desired")

STATE_FILE = "desired.json"
MAX_STATE_FILE = 48 * 1024 * 1024  # six documents of at most 4 MiB, base64


@dataclass(slots=True)
class DesiredFile:
    """`desired.json`: documents as received (base64 of the envelope) plus what `edge status` shows."""

    current: dict[str, bytes] = field(default_factory=dict)
    previous: dict[str, bytes] | None = None
    attempted: dict[str, int] = field(default_factory=dict)
    trial: dict[str, Any] | None = None
    apply: dict[str, Any] | None = None
    # written for `edge status`: what the running configuration is made of
    layers: dict[str, int] = field(default_factory=dict)
    effective: str | None = None


def _b64(raw: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in raw.items()}


def _unb64(doc: Any) -> dict[str, bytes]:
    if not isinstance(doc, dict):
        raise TypeError("expected a map of layer -> base64")
    return {str(k): base64.b64decode(v, validate=True) for k, v in doc.items() if k in LAYERS}


def read_state(state_dir: Path) -> DesiredFile:
    """The persisted state; an unreadable or malformed file is logged and counts as empty."""
    path = Path(state_dir) / STATE_FILE
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return DesiredFile()
    except OSError as exc:
        log.error("desired_state_unreadable", file=str(path), error=exc.strerror)
        return DesiredFile()
    try:
        doc = json.loads(data[:MAX_STATE_FILE])
        prev = doc.get("previous")
        return DesiredFile(
            current=_unb64(doc.get("current", {})),
            previous=None if prev is None else _unb64(prev),
            attempted={str(k): int(v) for k, v in dict(doc.get("attempted", {})).items() if k in LAYERS},
            trial=dict(doc["trial"]) if isinstance(doc.get("trial"), dict) else None,
            apply=dict(doc["apply"]) if isinstance(doc.get("apply"), dict) else None,
            layers={str(k): int(v) for k, v in dict(doc.get("layers", {})).items()},
            effective=str(doc["effective"]) if doc.get("effective") else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        log.error("desired_state_malformed", file=str(path), error=type(exc).__name__,
                  effect="runs with the local configuration until the next accepted layer")
        return DesiredFile()


def write_state(state_dir: Path, st: DesiredFile) -> None:
    doc = {
        "v": 1,
        "layers": st.layers,
        "effective": st.effective,
        "apply": st.apply,
        "attempted": st.attempted,
        "trial": st.trial,
        "current": _b64(st.current),
        "previous": None if st.previous is None else _b64(st.previous),
    }
    write_atomic(Path(state_dir) / STATE_FILE, json.dumps(doc, indent=1).encode())


def read_summary(state_dir: Path) -> dict[str, Any] | None:
    """What `edge status` shows: layers (ver per layer), effective hash, last apply, trial."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    st = read_state(state_dir)
    return {"layers": {lay: st.layers.get(lay, 0) for lay in LAYERS}, "effective": st.effective,
            "apply": st.apply, "trial": st.trial is not None}
