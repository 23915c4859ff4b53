"""Which `StimulusPeer` plays each device kind, for a target.

`--target hw`: the hardware adapters (hil.hardware). `--target sim`: the kind's simulated
peer in `hil.peers` against the daemon's real backend when both exist, else the stand-in
(the daemon's sim backend, hil.standin). `peer_status()` says which is which, for the report.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hil.hardware import Rig, hardware_peer
from hil.peer import StimulusPeer
from hil.scenario import Kind, Scenario
from hil.standin import SimStandIn

# kind -> (the simulated peer's module, the daemon backend module it exercises)
REAL: dict[Kind, tuple[str, str]] = {
    "ble": ("hil.peers.bluez", "drivers.ble.bleak"),
    "nfc": ("hil.peers.nfctag", "drivers.nfc.nfcpy"),
    "pos": ("hil.peers.pos", "drivers.pos.serial"),
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def real_peer_missing(kind: Kind) -> str | None:
    """None when the kind's simulated peer and the daemon's real backend both exist."""
    peer, backend = REAL[kind]
    gone = [m for m in (peer, backend) if not _exists(m)]
    return f"{' and '.join(gone)} not there yet" if gone else None


def choose(kind: Kind, target: str, scenario: Scenario, rig: Rig, workdir: Path) -> StimulusPeer:
    if target == "hw":
        return hardware_peer(kind, scenario, rig)
    if real_peer_missing(kind) is None:
        from hil.simpeers import sim_peer

        found = sim_peer(kind, scenario, workdir)
        if found is not None:
            return found
    return SimStandIn(kind, scenario)


__all__ = ["REAL", "Rig", "choose", "real_peer_missing"]
