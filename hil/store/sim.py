"""A simulated store day with ground truth, driving the edge's real processing code.

World (one step per store second):
- shoppers arrive on a daily curve (a late-morning and an after-work peak inside opening
  hours), walk entrance -> floor -> (till if they buy) -> entrance with log-normal dwell per
  zone, and walk out (their RSSI fades over ~20 s before they fall silent);
- each phone advertises about once a second (10 % of adverts missed) and rotates its
  private address every 13-17 min from a random phase (the old address simply stops);
- RSSI = the zone's level at the scanner + a per-phone offset (N(0, 2) dB) + Rayleigh
  fading (10 log10 of an exponential power) + N(0, 2) dB;
- some shoppers tap products on NFC shelf tags (a GS1 Digital Link URI record), buyers pay
  at the till (a receipt with items, a loyalty line for some);
- staff arrive before opening and stay until after closing (rotating addresses), the
  store's fixed devices (shelf labels, gear) advertise all day from one address.

`run(sink)` hands every advertisement, tap and receipt to `sink` (the edge side, see
scripts/bench_analytics.py) and returns the `Truth`: visits, dwell, zone occupancy samples
and purchases, per interval. Everything is seeded; nothing here is personal data (the
addresses are random).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ZONES = ("entrance", "floor", "till")
ZONE_RSSI = {"entrance": -74.0, "floor": -66.0, "till": -56.0}
# presence zones for the edge (RSSI bands, strongest first) matching the levels above
PRESENCE_ZONES = [{"name": "till", "min_rssi": -61}, {"name": "floor", "min_rssi": -70},
                  {"name": "entrance", "min_rssi": -95}]
GTINS = ("04012345123456", "09506000134352", "00012345600012", "04006381333931", "05449000000996")


def rpa(rng: random.Random) -> str:
    value = (rng.randrange(1, (1 << 22) - 1) | (0b01 << 22)) << 24 | rng.getrandbits(24)
    return ":".join(f"{b:02X}" for b in value.to_bytes(6, "big"))


def ndef_uri(gtin: str) -> bytes:
    """One NDEF URI record (https://id.gs1.org/01/<gtin>), short form."""
    payload = b"\x04" + f"id.gs1.org/01/{gtin}".encode()
    return bytes([0xD1, 0x01, len(payload)]) + b"U" + payload


def receipt_text(rng: random.Random, n_items: int, loyalty: str | None) -> str:
    lines = [f"Receipt No: R{rng.randrange(10**6):06d}"]
    total = 0
    for _ in range(n_items):
        cents = rng.randrange(99, 1999)
        total += cents
        lines.append(f"{rng.choice(GTINS)}  1 x {cents // 100}.{cents % 100:02d}")
    lines.append(f"TOTAL EUR {total // 100}.{total % 100:02d}")
    lines.append("VISA")
    if loyalty is not None:
        lines.append(f"Loyalty card: {loyalty}")
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class _Device:
    plan: list[tuple[float, str]]  # (until store second, zone), in order; after the last: fade out
    offset: float
    address: str
    rotate_at: float
    rotates: bool
    shopper: bool
    fade_until: float = 0.0
    leaving: bool = False


@dataclass(slots=True)
class Truth:
    interval_s: int
    visits: list[tuple[float, float]] = field(default_factory=list)  # shoppers: (start, end) store s
    receipts: list[float] = field(default_factory=list)
    taps: int = 0
    staff: int = 0
    fixed: int = 0
    rotations: int = 0
    occupancy: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # interval -> zone -> samples

    def footfall(self, lo: float = 0.0, hi: float = math.inf) -> int:
        return sum(1 for s, _ in self.visits if lo <= s < hi)


Sink = Callable[[str, tuple[Any, ...], float], None]  # (kind, payload, store second)


class StoreDay:
    """One day (store seconds from local midnight), `start_h` to `end_h`."""

    def __init__(self, *, seed: int = 1, shoppers: int = 1200, staff: int = 6, fixed: int = 10,
                 open_h: float = 8.0, close_h: float = 20.0, start_h: float = 4.0, end_h: float = 21.0,
                 p_buy: float = 0.55, p_tap: float = 0.3, p_loyalty: float = 0.4, interval_s: int = 900,
                 dwell_median_s: float = 900.0) -> None:
        self.rng = random.Random(seed)
        self.start, self.end = start_h * 3600, end_h * 3600
        self.open, self.close = open_h * 3600, close_h * 3600
        self.truth = Truth(interval_s)
        self._arrivals: list[tuple[float, _Device]] = []
        self._taps: list[tuple[float, str]] = []
        self._pays: list[tuple[float, int, str | None]] = []
        rng = self.rng
        for _ in range(shoppers):
            t = self._arrival_time()
            plan, buys = self._shopper_plan(t, dwell_median_s, p_buy)
            dev = _Device(plan, rng.gauss(0, 2), rpa(rng), t + rng.uniform(0, 900), True, True)
            self._arrivals.append((t, dev))
            end = plan[-1][0]
            self.truth.visits.append((t, end + 20.0))  # the walk out takes ~20 s
            if rng.random() < p_tap:
                for _ in range(rng.randint(1, 3)):
                    self._taps.append((rng.uniform(plan[0][0], plan[1][0]), rng.choice(GTINS)))
            if buys:
                till_end = plan[2][0]
                loyalty = f"{rng.randrange(10**9, 10**10)}" if rng.random() < p_loyalty else None
                self._pays.append((till_end - rng.uniform(10, 40), rng.randint(1, 12), loyalty))
        for _ in range(staff):
            t = self.open - rng.uniform(15, 45) * 60
            out = self.close + rng.uniform(10, 40) * 60
            plan = []
            x = t
            while x < out:
                x = min(out, x + rng.uniform(600, 2400))
                plan.append((x, rng.choice(("floor", "till", "floor"))))
            self._arrivals.append((t, _Device(plan, rng.gauss(0, 2), rpa(rng), t + rng.uniform(0, 900), True, False)))
        for _ in range(fixed):
            plan = [(self.end + 3600, rng.choice(("floor", "till", "entrance")))]
            self._arrivals.append((self.start, _Device(plan, rng.gauss(0, 3), rpa(rng), math.inf, False, False)))
        self.truth.staff, self.truth.fixed = staff, fixed
        self._arrivals.sort(key=lambda a: a[0])
        self._taps.sort()
        self._pays.sort(key=lambda p: p[0])
        self.truth.receipts = [p[0] for p in self._pays]
        self.truth.taps = len(self._taps)

    def _arrival_time(self) -> float:
        rng = self.rng
        while True:  # two peaks (12:00, 17:30) over a flat base, inside opening hours
            r = rng.random()
            t = (rng.gauss(12 * 3600, 5400) if r < 0.35 else rng.gauss(17.5 * 3600, 4500) if r < 0.7
                 else rng.uniform(self.open, self.close))
            if self.open <= t < self.close - 600:
                return t

    def _shopper_plan(self, t: float, median: float, p_buy: float) -> tuple[list[tuple[float, str]], bool]:
        rng = self.rng
        plan = []
        t += rng.uniform(20, 90)
        plan.append((t, "entrance"))
        t += min(5400.0, max(60.0, rng.lognormvariate(math.log(median), 0.7)))
        plan.append((t, "floor"))
        buys = rng.random() < p_buy
        if buys:
            t += rng.uniform(90, 300)
            plan.append((t, "till"))
        t += rng.uniform(20, 60)
        plan.append((t, "entrance"))
        return plan, buys

    def _rssi(self, d: _Device, zone: str) -> int:
        rng = self.rng
        fading = 10.0 * math.log10(max(1e-4, rng.expovariate(1.0)))
        return round(ZONE_RSSI[zone] + d.offset + fading + rng.gauss(0, 2.0))

    def run(self, sink: Sink, on_second: Callable[[float], None] | None = None) -> Truth:
        """Every advertisement, tap and receipt to `sink`; `on_second(t)` after each store second."""
        for kind, payload, t in self.steps():
            if kind == "second":
                if on_second is not None:
                    on_second(t)
            else:
                sink(kind, payload, t)
        return self.truth

    def steps(self) -> Iterator[tuple[str, tuple[Any, ...], float]]:  # noqa: PLR0912 - one loop over the world
        """The day as (kind, payload, store second): "advert" (address, rssi), "tap" (NDEF
        bytes, UID), "receipt" (text,) and "second" () at the end of each store second; the
        truth is complete when it is exhausted."""
        rng = self.rng
        present: list[_Device] = []
        arrivals, taps, pays = self._arrivals, self._taps, self._pays
        ai = ti = pi = 0
        interval = self.truth.interval_s
        t = self.start
        while t < self.end:
            while ai < len(arrivals) and arrivals[ai][0] <= t:
                present.append(arrivals[ai][1])
                ai += 1
            keep = []
            for d in present:
                while d.plan and d.plan[0][0] <= t:
                    d.plan.pop(0)
                if not d.plan:
                    if not d.leaving:
                        d.leaving, d.fade_until = True, t + 20.0
                    if t >= d.fade_until:
                        continue
                    rssi = int(ZONE_RSSI["entrance"] + d.offset - 26.0 * (1 - (d.fade_until - t) / 20.0)
                               + rng.gauss(0, 2))
                    zone = None
                else:
                    zone = d.plan[0][1]
                    rssi = self._rssi(d, zone)
                keep.append(d)
                if d.rotates and t >= d.rotate_at:
                    d.address, d.rotate_at = rpa(rng), t + rng.uniform(780, 1020)
                    self.truth.rotations += 1
                if rng.random() < 0.9:
                    yield "advert", (d.address, max(-100, rssi)), t + rng.random()
            present = keep
            while ti < len(taps) and taps[ti][0] <= t:
                yield "tap", (ndef_uri(taps[ti][1]), bytes(rng.getrandbits(8) for _ in range(7))), t
                ti += 1
            while pi < len(pays) and pays[pi][0] <= t:
                yield "receipt", (receipt_text(rng, pays[pi][1], pays[pi][2]),), t
                pi += 1
            if int(t) % 10 == 0:
                occ = self.truth.occupancy.setdefault(int(t) // interval, {z: [] for z in ZONES})
                counts = dict.fromkeys(ZONES, 0)
                for d in present:
                    if d.shopper and d.plan:
                        counts[d.plan[0][1]] += 1
                for z in ZONES:
                    occ[z].append(counts[z])
            yield "second", (), t
            t += 1.0
