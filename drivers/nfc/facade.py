"""The NFC driver facade: one `NfcDriver` over a backend chosen by `drivers.nfc.backend`."""

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
from drivers.nfc.config import Nfc
from edge.clock import Clock


def default_backend(cfg: Nfc, clock: Clock, sim: SimOptions | None = None) -> Backend:
    """The backend `cfg.backend` names, imported only now that it is chosen."""
    if cfg.backend == "sim":
        from drivers.nfc.sim import NfcSim

        opts = sim or SimOptions()
        return NfcSim(cfg, clock, inject=opts.inject, limit=opts.limit, sleep=opts.sleep)
    from drivers.nfc.nfcpy import NfcpyBackend

    return NfcpyBackend(cfg, clock)


class NfcDriver(Driver):
    """NFC taps: shelf tags and loyalty cards (`src="nfc"`).

    `backend`: None chooses by `cfg.backend`; otherwise an instance, or a class/factory
    called as `backend(cfg, clock)`.
    """

    os_error_hint = (
        "check the reader is plugged in (`lsusb`), not claimed by pcscd or a kernel driver"
        " (blacklist pn533_usb), and that the service user may open it"
    )

    def __init__(
        self,
        cfg: Nfc,
        clock: Clock,
        backend: Backend | BackendFactory[Nfc] | None = None,
        *,
        sim: SimOptions | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        chosen = default_backend(cfg, clock, sim) if backend is None else resolve_backend(backend, cfg, clock)
        super().__init__("nfc", "nfc", chosen, clock, sleep=sleep, rng=rng, backoff=backoff)
        self.cfg = cfg
