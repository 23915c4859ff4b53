"""The seam between the runner and whatever plays the devices' counterparts.

For each device kind (BLE, NFC, POS) one `StimulusPeer` turns the scenario's stimuli of
that kind into something the daemon's real driver sees, and says which driver config
the daemon needs to see it. Three families implement it:

- `peer`:     the simulated peers of `--target sim` (mock BlueZ on a private D-Bus, an
              emulated tag over nfcpy's udp transport, a pty pair with an ESC/POS producer),
              against the daemon's real backends (bleak, nfcpy, serial);
- `stand-in`: the daemon's simulated backend (`backend: sim`), used while a kind's real
              peer does not exist yet. It cannot play individual stimuli: the scenario's
              steps of that kind become a traffic rate, and its identifiers are replayed
              from the seed afterwards for the leak scan;
- `hardware`: `--target hw`, the rig's real devices facing the daemon's real devices
              (hil/README.md); `unavailable()` names what is missing, and the runner skips.

The runner only ever talks to this protocol; it picks the family in `hil.adapters`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edge.events import IdentClass
from hil.scenario import Kind, Step

PeerMode = Literal["peer", "stand-in", "hardware"]
Applied = Literal["applied", "approximated", "unsupported"]


@dataclass(slots=True, frozen=True)
class Outcome:
    """What became of one step: `applied` exactly, `approximated` (a stand-in folded it into
    its traffic) or `unsupported` (with the reason; expectations that need it are skipped)."""

    applied: Applied
    note: str = ""


APPLIED = Outcome("applied")


@dataclass(slots=True)
class Ledger:
    """What a peer put in front of the daemon's driver over the whole run.

    `expected`: event type -> how many events the daemon should have made of it; exact for
    real peers and hardware, empty for stand-ins (their simulation decides). `identifiers`:
    every raw identifier used, for the leak scan (the run must not leave any of them anywhere).
    """

    exact: bool
    expected: Counter[str] = field(default_factory=Counter)
    identifiers: list[tuple[IdentClass, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    emitted: list[tuple[int, str]] = field(default_factory=list)  # (wall ms, event type) per stimulus

    def emit(self, event_type: str | None, identifiers: Iterable[tuple[IdentClass, str]] = ()) -> None:
        """Record one stimulus: the event it must become (None: none) and the identifiers it used."""
        self.identifiers.extend(identifiers)
        if event_type is not None:
            self.expected[event_type] += 1
            self.emitted.append((int(time.time() * 1000), event_type))


class StimulusPeer(Protocol):
    """One device kind's counterpart; see the module docstring."""

    kind: Kind
    mode: PeerMode
    description: str  # e.g. "pty pair + python-escpos (hil.peers.pos)"

    def unavailable(self) -> str | None:
        """None when ready; else why this kind cannot be driven (hardware absent, ...)."""
        ...

    def driver_config(self) -> Any:
        """The daemon's `drivers.<kind>` section (a mapping; a list of links for POS)."""
        ...

    def daemon_env(self) -> Mapping[str, str]:
        """Environment the daemon needs to reach this peer (e.g. the private D-Bus address);
        valid after `start()`."""
        ...

    async def start(self) -> None:
        """Bring the peer up before the daemon starts (it lives across daemon restarts)."""
        ...

    async def apply(self, step: Step) -> Outcome:
        """Play one stimulus of this kind now."""
        ...

    async def quiesce(self) -> None:
        """Stop producing stimuli (background traffic included); the run is ending."""
        ...

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        """What was emitted; `received_by_src` (events at the receiver per source) lets a
        stand-in size the replay of its simulation."""
        ...

    async def stop(self) -> None:
        """Release everything; safe to call twice."""
        ...
