"""The simulated store as an advertisement source for the BLE sim backend's seam.

drivers/ble/adverts.py (the sim backend's `AdvertSource`, from the sim work) iterates
`Advert(t, address, rssi, manufacturer_data, service_data)` in non-decreasing `t` on the
backend clock's monotonic timeline. `store_adverts` yields the store day's advertisements
that way on a `FakeClock` it advances itself (the source sets the time, the backend follows),
built by `make` (pass `drivers.ble.adverts.Advert` once that module is merged; this module
does not import it, so it works on either side of that merge). Taps and receipts are not
BLE: they are left out here (scripts/bench_analytics.py feeds them through the NFC tap
builder and the receipt parser).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from edge.clock import FakeClock
from hil.store.sim import StoreDay

T = TypeVar("T")
DAY0_MS = 1_767_225_600_000  # store second 0 on the wall clock (2026-01-01T00:00:00Z)


async def store_adverts(day: StoreDay, clock: FakeClock, make: Callable[[float, str, int], T], *,
                        mono0: float = 0.0, yield_every: int = 512) -> AsyncIterator[T]:
    """`make(t, address, rssi)` for every advertisement of `day`, the clock moved to each."""
    n = 0
    for kind, payload, t in day.steps():
        clock.wall = DAY0_MS + int(t * 1000)
        clock.mono = max(clock.mono, mono0 + t)
        if kind != "advert":
            continue
        yield make(clock.mono, payload[0], payload[1])
        n += 1
        if n % yield_every == 0:
            await asyncio.sleep(0)  # let the consumer's loop breathe
