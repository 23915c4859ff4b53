"""The BLE driver facade: one `BleDriver` over a backend chosen by `drivers.ble.backend`."""

from __future__ import annotations

import asyncio
import random

from drivers.base import (
    Backend,
    BackendFactory,
    Backoff,
    Driver,
    SimOptions,
    Sleep,
    resolve_backend,
)
from drivers.ble.config import Ble
from edge.clock import Clock


def default_backend(cfg: Ble, clock: Clock, sim: SimOptions | None = None) -> Backend:
    """The backend `cfg.backend` names, imported only now that it is chosen."""
    if cfg.backend == "sim":
        from drivers.ble.sim import BleSim

        opts = sim or SimOptions()
        return BleSim(cfg, clock, source=opts.ble_source, inject=opts.inject, limit=opts.limit, sleep=opts.sleep)
    from drivers.ble.bleak import BleakBackend

    return BleakBackend(cfg, clock)


class BleDriver(Driver):
    """BLE advertisements and beacons (`src="ble"`).

    `backend`: None chooses by `cfg.backend`; otherwise an instance, or a class/factory
    called as `backend(cfg, clock)`.
    """

    os_error_hint = (
        "check the adapter with `bluetoothctl show` (powered, not rfkill-blocked)"
        " and that the service user may use BlueZ over D-Bus"
    )

    def __init__(
        self,
        cfg: Ble,
        clock: Clock,
        backend: Backend | BackendFactory[Ble] | None = None,
        *,
        sim: SimOptions | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        chosen = default_backend(cfg, clock, sim) if backend is None else resolve_backend(backend, cfg, clock)
        super().__init__("ble", "ble", chosen, clock, sleep=sleep, rng=rng, backoff=backoff)
        self.cfg = cfg
