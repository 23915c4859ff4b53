"""Build the configured drivers: the one place that knows every device kind."""

from __future__ import annotations

from drivers.base import Driver, SimOptions
from drivers.ble import BleDriver
from drivers.nfc import NfcDriver
from drivers.pos import PosDriver
from edge.clock import Clock
from edge.config import Config


def build_drivers(cfg: Config, clock: Clock, *, sim: SimOptions | None = None) -> list[Driver]:
    """The enabled drivers: BLE, NFC, then one `PosDriver` per configured POS link.

    `sim` reaches every simulated backend (injected identifiers for the leak test, a
    reading limit for benchmarks, a pacing sleep for tests); real backends ignore it.
    Real backends touch no device here: they open it when their driver starts.
    """
    d = cfg.drivers
    out: list[Driver] = []
    if d.ble.enabled:
        out.append(BleDriver(d.ble, clock, sim=sim))
    if d.nfc.enabled:
        out.append(NfcDriver(d.nfc, clock, sim=sim))
    out.extend(PosDriver(link, clock, sim=sim) for link in d.pos)
    return out
