"""The POS driver facade: one `PosDriver` per configured link (register)."""

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
    not_implemented,
    resolve_backend,
)
from drivers.pos.config import PosLink
from edge.clock import Clock


def default_backend(link: PosLink, clock: Clock, sim: SimOptions | None = None) -> Backend:
    """The backend `link.backend` names, imported only now that it is chosen."""
    if link.backend == "sim":
        from drivers.pos.sim import PosSim

        opts = sim or SimOptions()
        return PosSim(link, clock, inject=opts.inject, limit=opts.limit, sleep=opts.sleep)
    # "serial": the real backend lands in its own issue (drivers/pos/serial.py, imported here)
    raise not_implemented("pos", link.backend)


class PosDriver(Driver):
    """Receipt text from one POS link (`src="pos"`), named `pos:<link name>`.

    `backend`: None chooses by `link.backend`; otherwise an instance, or a class/factory
    called as `backend(link, clock)`.
    """

    os_error_hint = (
        "check the serial cable and the port path (prefer /dev/serial/by-id/...), and that the"
        " service user is in the dialout group"
    )

    def __init__(
        self,
        link: PosLink,
        clock: Clock,
        backend: Backend | BackendFactory[PosLink] | None = None,
        *,
        sim: SimOptions | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        chosen = (
            default_backend(link, clock, sim) if backend is None else resolve_backend(backend, link, clock)
        )
        super().__init__(f"pos:{link.name}", "pos", chosen, clock, sleep=sleep, rng=rng, backoff=backoff)
        self.link = link
