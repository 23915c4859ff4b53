"""Presence on the edge: per-address sessions from advertisements, never the advertisements.

A device (one Bluetooth address) is tracked with an exponentially smoothed RSSI
(`smoothing` = weight of the newest sample). It enters when the smoothed RSSI reaches
`enter_rssi`; it stays while it is heard at or above `enter_rssi - hysteresis`; it exits
once it has been silent or weaker than that for `exit_after`. Then it is forgotten. A
device that never entered is forgotten after `exit_after` of silence. So a raw address is
held in memory only while its device is nearby (or at most `exit_after` after), never
stored, and leaves this module only as `Ident("ble_address", raw)` in a Reading's `ids`
(the pipeline turns it into a pseudonym).

At most `max_devices` addresses are tracked: when full, a new address takes the place of
the least recently seen device that is not present (counted as `evicted`), so a flood of
random weak addresses cannot blind presence; it is ignored (counted as `over_limit`) only
when every tracked device is present.

Private address rotation is respected: a new address is a new device; nothing tries to
link addresses (a phone that rotates its address mid-visit shows up as an exit after
`exit_after` and a new enter).

Zones are RSSI bands (`min_rssi`, strongest first): a present device is in the strongest
zone whose `min_rssi` its smoothed RSSI reaches (leaving a zone for a weaker one takes
`hysteresis` dB less), else in the weakest zone. `presence.exit` names the zone where the
device spent most of its visit.

Events (ts = wall-clock ms; `zone` only when zones are configured):
- `presence.enter` {rssi, zone?} ids {device}
- `presence.exit`  {dwell_ms, rssi_min, rssi_mean, rssi_max, rssi_last, weak_ms,
  reason: "gone" | "stop", zone?, zone_last?} ids {device}; ts is when it was last near (the
  exit is noticed `exit_after` later); reason "stop": the driver lost its scanner and closed
  every open session; `rssi_last`: the smoothed RSSI when last heard; `weak_ms`: how long it
  was heard only below the leave threshold before falling silent (0: it fell silent while
  near, as a phone does when it rotates its address; a shopper walking out fades first);
  `zone_last`: its zone when last heard (edge/analytics/ infers rotations from these)
- `presence.zone` {zone, from} ids {device}: a present device moved to another zone; only
  with `zone_events` (turned on by the daemon for edge/analytics/, which consumes them: they
  never reach the buffer)
- `presence.occupancy` {count, peak, interval_ms, zone?}, one per zone every
  `occupancy_every` (count at the end of the interval, peak during it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.ble.config import Presence
from edge.events import Ident, Reading


@dataclass(slots=True)
class _Dev:
    ema: float
    last_seen: float
    last_near: float = 0.0
    present: bool = False
    entered: float = 0.0
    n: int = 0
    total: int = 0
    lo: int = 0
    hi: int = 0
    zone: int = 0
    zone_s: list[float] | None = None


class PresenceEngine:
    """Sessions per address. `observe()` per advertisement (hot path), `tick()` about once a
    second for exits and occupancy, `flush()` when the scanner is lost, `forget()` at close."""

    def __init__(self, cfg: Presence, now: float) -> None:
        self._alpha = float(cfg.smoothing)
        self._enter = float(cfg.enter_rssi)
        self._leave = float(cfg.enter_rssi - cfg.hysteresis)
        self._hyst = float(cfg.hysteresis)
        self._exit_after = float(cfg.exit_after)
        self._every = float(cfg.occupancy_every)
        self._max = cfg.max_devices
        self._zone_events = cfg.zone_events and bool(cfg.zones)
        self._zone_names: list[str | None] = [z.name for z in cfg.zones] or [None]
        self._zone_mins = [float(z.min_rssi) for z in cfg.zones]
        n = len(self._zone_names)
        self._count = [0] * n
        self._peak = [0] * n
        self._next_occupancy = now + self._every
        self._devs: dict[str, _Dev] = {}
        self._idle: dict[str, None] = {}  # tracked but not present, least recently seen first
        self.over_limit = 0  # new addresses not tracked because max_devices were present
        self.evicted = 0  # not-present addresses forgotten early to make room for a new one
        self.entered = 0
        self.exited = 0

    @property
    def tracked(self) -> int:
        return len(self._devs)

    @property
    def present(self) -> int:
        return sum(self._count)

    def _zone_of(self, ema: float, cur: int) -> int:
        mins = self._zone_mins
        i = len(mins) - 1
        for j, m in enumerate(mins):
            if ema >= m:
                i = j
                break
        if 0 <= cur < i and ema >= mins[cur] - self._hyst:
            return cur  # would move to a weaker zone, but within the hysteresis
        return i

    def observe(self, address: str, rssi: int, now: float, wall: int) -> Reading | None:
        """One advertisement; a `presence.enter` reading when the device enters."""
        d = self._devs.get(address)
        idle = self._idle
        if d is None:
            if len(self._devs) >= self._max:
                if not idle:  # every tracked device is present: nothing to give up
                    self.over_limit += 1
                    return None
                oldest = next(iter(idle))  # the least recently seen device that is not present
                del idle[oldest], self._devs[oldest]
                self.evicted += 1
            d = self._devs[address] = _Dev(float(rssi), now)
        else:
            d.ema += self._alpha * (rssi - d.ema)
        ema = d.ema
        if d.present:
            d.n += 1
            d.total += rssi
            if rssi < d.lo:
                d.lo = rssi
            elif rssi > d.hi:
                d.hi = rssi
            if ema >= self._leave:
                d.last_near = now
            if d.zone_s is not None:
                d.zone_s[d.zone] += now - d.last_seen
                z = self._zone_of(ema, d.zone)
                if z != d.zone:
                    d.last_seen = now
                    return self._zone_change(address, d, z, wall)
            d.last_seen = now
            return None
        d.last_seen = now
        if ema < self._enter:
            idle.pop(address, None)
            idle[address] = None  # to the end: least recently seen first
            return None
        idle.pop(address, None)
        d.present = True
        d.entered = d.last_near = now
        d.n, d.total, d.lo, d.hi = 1, rssi, rssi, rssi
        data: dict[str, Any] = {"rssi": round(ema)}
        if self._zone_mins:
            d.zone = self._zone_of(ema, -1)
            d.zone_s = [0.0] * len(self._zone_mins)
            data["zone"] = self._zone_names[d.zone]
        self._move(-1, d.zone)
        self.entered += 1
        return Reading(src="ble", type="presence.enter", ts=wall, data=data,
                       ids={"device": Ident("ble_address", address)})

    def _zone_change(self, address: str, d: _Dev, z: int, wall: int) -> Reading | None:
        self._move(d.zone, z)
        old, d.zone = d.zone, z
        if not self._zone_events:
            return None
        names = self._zone_names
        return Reading(src="ble", type="presence.zone", ts=wall, data={"zone": names[z], "from": names[old]},
                       ids={"device": Ident("ble_address", address)})

    def _move(self, old: int, new: int) -> None:
        if old >= 0:
            self._count[old] -= 1
        if new >= 0:
            c = self._count[new] = self._count[new] + 1
            self._peak[new] = max(self._peak[new], c)

    def _exit(self, address: str, d: _Dev, now: float, wall: int, reason: str) -> Reading:
        self._move(d.zone, -1)
        self.exited += 1
        ts = wall - round((now - d.last_near) * 1000)
        data: dict[str, Any] = {
            "dwell_ms": round((d.last_near - d.entered) * 1000),
            "rssi_min": d.lo,
            "rssi_mean": round(d.total / d.n),
            "rssi_max": d.hi,
            "rssi_last": round(d.ema),
            "weak_ms": round((d.last_seen - d.last_near) * 1000),
            "reason": reason,
        }
        if d.zone_s is not None:
            data["zone"] = self._zone_names[max(range(len(d.zone_s)), key=d.zone_s.__getitem__)]
            data["zone_last"] = self._zone_names[d.zone]
        return Reading(src="ble", type="presence.exit", ts=ts, data=data,
                       ids={"device": Ident("ble_address", address)})

    def tick(self, now: float, wall: int) -> list[Reading]:
        """Exits of devices silent (or weak) for `exit_after`; forgets devices that never
        entered and went silent; `presence.occupancy` when an interval is over."""
        out: list[Reading] = []
        limit = self._exit_after
        gone = []
        for address, d in self._devs.items():
            if d.present:
                if now - d.last_near >= limit:
                    out.append(self._exit(address, d, now, wall, "gone"))
                    gone.append(address)
            elif now - d.last_seen >= limit:
                gone.append(address)
        for address in gone:
            del self._devs[address]
            self._idle.pop(address, None)
        if now >= self._next_occupancy:
            out.extend(self._occupancy(wall))
            self._next_occupancy += self._every
            if self._next_occupancy <= now:  # the loop stalled for more than an interval
                self._next_occupancy = now + self._every
        return out

    def _occupancy(self, wall: int) -> list[Reading]:
        out = []
        interval_ms = round(self._every * 1000)
        for i, name in enumerate(self._zone_names):
            data: dict[str, Any] = {"count": self._count[i], "peak": self._peak[i], "interval_ms": interval_ms}
            if name is not None:
                data["zone"] = name
            out.append(Reading(src="ble", type="presence.occupancy", ts=wall, data=data))
            self._peak[i] = self._count[i]
        return out

    def flush(self, now: float, wall: int) -> list[Reading]:
        """Close every open session now (reason "stop") and forget every address."""
        out = [self._exit(a, d, now, wall, "stop") for a, d in self._devs.items() if d.present]
        self.forget()
        return out

    def forget(self) -> None:
        """Drop every address without events (the counts start over at zero)."""
        self._devs.clear()
        self._idle.clear()
        self._count = [0] * len(self._count)
