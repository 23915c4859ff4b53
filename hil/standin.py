"""Stand-ins: the daemon's own simulated backends, for kinds whose real peer is not there yet.

A stand-in cannot play a single stimulus (the daemon's sim backend makes up its own phones,
taps and receipts), so the scenario's steps of its kind are folded into one traffic rate,
fixed at the daemon's start. What it can still give the rig is every raw identifier the
simulation used: the sim backends are deterministic given their seed, and each daemon life
starts them over, so replaying the same seed for at least as many readings as the receiver
got yields every identifier the daemon may have seen (the leak scan's needles).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from drivers.base import luhn_valid
from drivers.ble.config import Ble
from drivers.ble.simstore import RandomStore
from drivers.nfc.config import Nfc
from drivers.nfc.sim import NfcSim
from drivers.pos.config import PosLink
from drivers.pos.sim import PosSim
from edge.clock import FakeClock
from edge.configbase import SimRate
from edge.events import IdentClass, Reading
from hil.peer import Ledger, Outcome, PeerMode
from hil.scenario import BleBack, BleQuiet, Kind, PosGarbage, Scenario, Step, Traffic

REPLAY_MARGIN = 500  # readings beyond what arrived: in flight at a power cut, or never sealed
_REPLAY_RATE = 1_000_000.0  # the pace does not change what a simulation yields
_SEEDS: dict[Kind, int] = {"ble": 8101, "nfc": 8102, "pos": 8103}
_MIN_RATE = {"ble": 2.0, "nfc": 0.5, "pos": 0.2}

_LOYALTY = re.compile(r"^Loyalty: (\d{6,19})\s*$", re.M)
_PAN = re.compile(r"^[A-Z]+ ([0-9][0-9 ]{11,22}[0-9])\s", re.M)
_EMAIL = re.compile(r"Receipt sent to (\S+@\S+)")
_PHONE = re.compile(r"^Delivery contact: (.+?)\s*$", re.M)


async def _no_sleep(_: float) -> None:
    return None


class SimStandIn:
    """The `sim` backend of one kind, at a rate covering the scenario's steps of that kind."""

    mode: PeerMode = "stand-in"

    def __init__(self, kind: Kind, scenario: Scenario) -> None:
        self.kind = kind
        self.description = f"drivers.{kind} backend sim (stand-in: no real peer yet)"
        self._scenario = scenario
        steps = scenario.of_kind(kind)
        self.enabled = bool(steps)
        traffic = [s.rate for s in steps if isinstance(s, Traffic)]
        discrete = [s for s in steps if not isinstance(s, Traffic | BleQuiet | BleBack | PosGarbage)]
        per_till = len(scenario.tills) if kind == "pos" else 1
        self.rate = max([*traffic, len(discrete) / scenario.duration / per_till, _MIN_RATE[kind]])
        self.seed = _SEEDS[kind]

    def unavailable(self) -> str | None:
        return None

    def driver_config(self) -> Any:
        sim = {"rate": round(self.rate, 3), "seed": self.seed}
        if self.kind == "pos":
            return [{"name": r, "backend": "sim", "sim": sim} for r in self._scenario.tills] if self.enabled else []
        return {"enabled": self.enabled, "backend": "sim", "sim": sim}

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        return None

    async def apply(self, step: Step) -> Outcome:
        if isinstance(step, BleQuiet | BleBack):
            return Outcome("unsupported", "the sim backend cannot wedge; needs the mock BlueZ peer")
        if isinstance(step, PosGarbage):
            return Outcome("unsupported", "the sim backend prints only receipts; needs the pty POS peer")
        if isinstance(step, Traffic):
            return Outcome("approximated", f"sim rate fixed at {self.rate:g}/s from the start")
        return Outcome("approximated", f"folded into the sim's own traffic ({self.rate:g}/s)")

    async def quiesce(self) -> None:
        return None  # the sim runs as long as the daemon; the runner's drain life has no drivers

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        n = received_by_src.get(self.kind, 0) + REPLAY_MARGIN
        ids = await replay_identifiers(self.kind, self.seed, n, self._scenario.tills) if self.enabled else []
        return Ledger(exact=False, identifiers=ids, notes=[f"{len(ids)} identifiers replayed from seed {self.seed}"])

    async def stop(self) -> None:
        return None


async def replay_identifiers(kind: Kind, seed: int, n: int, tills: list[str]) -> list[tuple[IdentClass, str]]:
    """Every raw identifier in the first `n` readings of the seeded sim of `kind` (deduplicated)."""
    found: dict[tuple[IdentClass, str], None] = {}
    clock = FakeClock()
    sim = SimRate(rate=_REPLAY_RATE, seed=seed)
    if kind == "ble":
        # the addresses do not depend on the pace (drivers.ble.simstore); a phone may be heard
        # without ever entering, so replay more phones than readings arrived
        for address in RandomStore(Ble(sim=sim), clock).identifiers(2 * n):
            found[("ble_address", address)] = None
    elif kind == "nfc":
        for r in await _take(NfcSim(Nfc(sim=sim), clock, limit=n, sleep=_no_sleep)):
            _add_ids(found, r)
    else:
        for reg in tills:
            link = PosLink(name=reg, sim=sim)
            for r in await _take(PosSim(link, clock, limit=n, sleep=_no_sleep)):
                _add_ids(found, r)
                for cls, raw in receipt_identifiers(r.text.get("receipt", "")):
                    found[(cls, raw)] = None
    return list(found)


def receipt_identifiers(text: str) -> list[tuple[IdentClass, str]]:
    """Loyalty numbers, whole card numbers, e-mails and phones printed on a receipt."""
    out: list[tuple[IdentClass, str]] = [("loyalty_id", m) for m in _LOYALTY.findall(text)]
    for m in _PAN.findall(text):
        digits = m.replace(" ", "")
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            out.append(("card_number", digits))
    out += [("email", m) for m in _EMAIL.findall(text)]
    out += [("phone", m) for m in _PHONE.findall(text)]
    return out


def _add_ids(found: dict[tuple[IdentClass, str], None], r: Reading) -> None:
    for ident in r.ids.values():
        found[(ident.cls, ident.raw)] = None


async def _take(backend: NfcSim | PosSim) -> list[Reading]:
    """Drain a sim whose pacing never waits (a fake clock, a no-op sleep)."""
    return [r async for r in backend.readings()]
