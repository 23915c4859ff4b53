"""The simulated BLE backend: synthetic advertisements through the real processing path.

    AdvertSource (default: simstore.RandomStore) -> BleProcessor -> Readings
                                                  + ScanWatchdog, ticks

Everything after "an advertisement was heard" is the bleak backend's code: the same
`BleProcessor` (decoders, store-beacon tracking, presence with smoothing, hysteresis, zones
and occupancy), the same `ScanWatchdog` ladder and tick period, the same flush of open
sessions when the scan ends. So this backend emits exactly the event types and shapes the
real store does (see `presence.py`, `beacons.py`); it differs from `bleak.py` only in where
the advertisements come from (a source instead of BlueZ) and in what the watchdog's
actions do (there is no adapter to restart or power-cycle: they are counted and logged;
`give_up` degrades the driver exactly as on a real box).

The source is the seam for other simulations (see `adverts.py`): `BleSim(cfg, clock,
source=...)`, or `SimOptions(ble_source=...)` through `build_drivers`. The backend asks for
the next advertisement only after the previous one went through the processor (lockstep),
while ticks (presence exits, occupancy, beacon.missing, the watchdog) run on the clock even
when the source is silent. When the source ends, open sessions are closed (reason "stop")
and the backend ends; when it raises, they are closed too and the driver degrades
(`sim_source_failed`) and later iterates the source again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import structlog

from drivers.base import Sleep, classify_injected
from drivers.ble.adverts import AdvertSource
from drivers.ble.config import Ble
from drivers.ble.processor import BleProcessor, tick_period
from drivers.ble.simstore import RandomStore
from drivers.ble.watchdog import Action, ScanWatchdog
from edge.clock import Clock
from edge.errors import DriverError
from edge.events import Reading

_Advert = tuple[str, int, Mapping[int, bytes], Mapping[str, bytes], float, int]
_STALLED_HINT = "the simulated radio went quiet (its advertisement source stopped yielding); the driver retries"


class BleSim:
    """Simulated BLE backend (see the module docstring).

    `source`: the advertisements (default: a `RandomStore` paced at `cfg.sim.rate` with
    `sleep`, its first phones using the Bluetooth addresses among `inject`). `limit`: stop
    after that many readings.
    """

    name = "sim"

    def __init__(
        self,
        cfg: Ble,
        clock: Clock,
        *,
        source: AdvertSource | None = None,
        inject: Sequence[str] | None = None,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._limit = limit
        self._count = 0
        self._log = structlog.get_logger("drivers.ble")
        if source is None:
            source = RandomStore(cfg, clock, inject=tuple(classify_injected(inject)["ble_address"]), sleep=sleep)
        self._source = source
        self._proc = BleProcessor(cfg, clock.monotonic())
        self._dog = ScanWatchdog(cfg.watchdog, expect_always=bool(cfg.beacons.known))
        self._tick_s = tick_period(cfg)
        self._adverts: deque[_Advert] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._end: Exception | bool | None = None
        self.scanner_restarts = 0
        self.power_cycles = 0

    async def open(self) -> None:
        """The simulated radio is always there: scanning (re)starts now."""
        now = self._clock.monotonic()
        self._dog.started(now)
        self._proc.resume(now)

    async def aclose(self) -> None:
        """Forget every address (as the bleak backend does). Safe to call again."""
        self._adverts.clear()
        self._proc.forget()

    def stats(self) -> dict[str, Any]:
        """The bleak backend's counters (no identifiers); `scan_mode` is "sim"."""
        return {
            "adapter": self.cfg.adapter,
            "scan_mode": "sim",
            "queue_dropped": 0,
            "scanner_restarts": self.scanner_restarts,
            "power_cycles": self.power_cycles,
            "start_retries": 0,
            "watchdog_level": self._dog.level,
            **self._proc.stats(),
        }

    async def readings(self) -> AsyncIterator[Reading]:
        self._end = None
        self._adverts.clear()
        pump = asyncio.create_task(self._pump(), name="ble-sim:source")
        try:
            if self._limit is not None and self._count >= self._limit:
                return
            async for r in self._scan():
                self._count += 1
                yield r
                if self._limit is not None and self._count >= self._limit:
                    return
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    # -- the source side --------------------------------------------------------------------

    async def _pump(self) -> None:
        """Source -> the one-slot queue, in lockstep with the processor."""
        q, clock = self._adverts, self._clock
        it = aiter(self._source)
        try:
            async for a in it:
                while q:
                    self._room.clear()
                    await self._room.wait()
                now, wall = clock.monotonic(), clock.wall_ms()
                q.append((a.address, a.rssi, a.manufacturer_data, a.service_data, a.t,
                          wall + round((a.t - now) * 1000)))
                self._wake.set()
            self._end = True
        except Exception as exc:  # a broken source degrades the driver; it never kills the daemon
            self._end = exc
        finally:
            self._wake.set()
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # -- what the bleak backend does with what it hears ------------------------------------------

    async def _scan(self) -> AsyncIterator[Reading]:
        proc, dog, q, clock = self._proc, self._dog, self._adverts, self._clock
        next_tick = clock.monotonic() + self._tick_s
        while True:
            while q:
                address, rssi, mfr, svc, t, wall = q.popleft()
                if level := dog.advert(t):
                    self._log.info("ble_scanner_recovered", adapter=self.cfg.adapter, level=level)
                for r in proc.advert(address, rssi, mfr, svc, t, wall):
                    yield r
            self._room.set()
            err: DriverError | None = None
            if clock.monotonic() >= next_tick:
                ticked, err = await self._tick()
                for r in ticked:
                    yield r
                next_tick = clock.monotonic() + self._tick_s
            end = self._end if not q else None
            if err is None and isinstance(end, Exception):
                err = DriverError(f"the advertisement source failed ({type(end).__name__})",
                                  reason="sim_source_failed", hint="a bug in the simulation; the driver retries")
                err.__cause__ = end
            if err is not None or end is not None:
                for r in proc.flush(clock.monotonic(), clock.wall_ms()):
                    yield r
                if err is not None:
                    raise err
                return
            if not q:
                await self._wait(next_tick)

    async def _wait(self, until: float) -> None:
        wait = until - self._clock.monotonic()
        if wait > 0 and self._end is None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _tick(self) -> tuple[list[Reading], DriverError | None]:
        dog, now = self._dog, self._clock.monotonic()
        out = self._proc.tick(now, self._clock.wall_ms(), scanner_ok=dog.listening(now))
        action = dog.due(now)
        if action is not None:
            try:
                self._act(action)
            except DriverError as exc:
                return out, exc
        return out, None

    def _act(self, action: Action) -> None:
        """The watchdog's ladder with no adapter: restarts and power cycles are counted and
        logged like the bleak backend's; giving up degrades the driver."""
        name, dog = self.cfg.adapter, self._dog
        quiet_s = round(dog.quiet, 3)
        if action == "give_up":
            self._log.error("ble_scanner_stalled", adapter=name, quiet_s=quiet_s,
                            restarts=self.cfg.watchdog.restarts, power_cycles=self.cfg.watchdog.power_cycles)
            raise DriverError(f"no advertisements on {name} for {quiet_s}s after {self.cfg.watchdog.restarts}"
                              f" scanner restart(s) and {self.cfg.watchdog.power_cycles} power cycle(s)",
                              reason="scanner_stalled", hint=_STALLED_HINT)
        if action == "restart":
            self.scanner_restarts += 1
            self._log.warning("ble_scanner_restart", adapter=name, quiet_s=quiet_s, level=dog.level)
        else:
            self.power_cycles += 1
            self._log.warning("ble_adapter_power_cycle", adapter=name, quiet_s=quiet_s, level=dog.level)
        now = self._clock.monotonic()
        dog.started(now)
        self._proc.resume(now)
