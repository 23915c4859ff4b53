"""The POS driver facade: one `PosDriver` per configured link (register).

Backends: `sim` (drivers.pos.sim) and `serial` (drivers.pos.serial, pyserial), imported
only when chosen. Constructing a serial driver does not touch the port: it is opened by
`readings()`, and a missing device is a degraded state with retries, not a startup error.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from drivers.base import (
    Backend,
    BackendFactory,
    Backoff,
    Driver,
    SimOptions,
    Sleep,
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
    from drivers.pos.serial import PosSerial

    return PosSerial(link, clock)


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

    def status(self) -> dict[str, Any]:
        """The facade's status plus, for a backend that counts them, bad-input counts by
        reason (`input_problems`; no content)."""
        out = super().status()
        backend_status = getattr(self.backend, "status", None)
        if callable(backend_status):
            problems = backend_status().get("problems")
            if isinstance(problems, dict):
                out["input_problems"] = problems
        return out
