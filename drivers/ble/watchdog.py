"""The scanner watchdog's escalation ladder, pure and clock-driven (the backend acts on it).

Advertisements are expected when the store has configured beacons (they never stop) or
once any advertisement has been heard since the driver started. When none has arrived for
`quiet` seconds while expected (counted from the last advertisement or the last action,
whichever is later), `due()` says what to do next:

    restart (x `restarts`) -> power_cycle (x `power_cycles`) -> give_up

One advertisement resets the ladder. After `give_up` the ladder stays exhausted: the backend
then fails fast (degraded, retried with the facade's backoff) instead of power-cycling the
adapter again and again, until an advertisement proves the radio works.
"""

from __future__ import annotations

from typing import Literal

from drivers.ble.config import Watchdog

Action = Literal["restart", "power_cycle", "give_up"]


class ScanWatchdog:
    def __init__(self, cfg: Watchdog, *, expect_always: bool) -> None:
        self.enabled = cfg.enabled
        self.quiet = float(cfg.quiet)
        self._restarts = cfg.restarts
        self._cycles = cfg.power_cycles
        self._expect_always = expect_always
        self._ever = False
        self._last = float("-inf")  # last advertisement or action
        self.level = 0  # actions taken since the last advertisement

    @property
    def exhausted(self) -> bool:
        return self.level > self._restarts + self._cycles

    @property
    def expecting(self) -> bool:
        return self.enabled and (self._expect_always or self._ever)

    def started(self, now: float) -> None:
        """The scanner (re)started: quiet time counts from now."""
        self._last = max(self._last, now)

    def advert(self, now: float) -> int:
        """An advertisement arrived; returns the ladder level it ends (0: nothing was wrong)."""
        self._ever = True
        self._last = max(self._last, now)
        level, self.level = self.level, 0
        return level

    def quiet_for(self, now: float) -> float:
        return now - self._last

    def listening(self, now: float) -> bool:
        """The scanner is known to work: no action pending and not quiet while expected
        (beacon.missing is only reported then)."""
        return self.level == 0 and (not self.expecting or self.quiet_for(now) < self.quiet)

    def due(self, now: float) -> Action | None:
        if not self.expecting or now - self._last < self.quiet:
            return None
        level = self.level
        self.level = min(level + 1, self._restarts + self._cycles + 1)
        self._last = now
        if level < self._restarts:
            return "restart"
        if level < self._restarts + self._cycles:
            return "power_cycle"
        return "give_up"
