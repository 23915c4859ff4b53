"""The default advertisement source of the BLE sim backend: a store's radio, made up.

`RandomStore` is an `AdvertSource` (see `adverts.py`): it yields raw advertisements, paced
at `drivers.ble.sim.rate` advertisements per second on the injected clock (Poisson), and
the sim backend turns them into events with the real processing code. What it simulates,
on the clock's timeline (store time is real time):

- phones: the store opens with its usual crowd (~33 phones), then one arrives every ~15 s
  on average and stays a log-normal while (median ~6 min, 30 s to 45 min). A phone has a
  random private address (resolvable, top bits 0b01, ~90 %: it rotates every 10-20 min as
  phones do; static, top bits 0b11, the rest) and advertises what phones advertise: Apple
  Continuity (company 0x004C, not an iBeacon), Samsung or Microsoft manufacturer data, or
  nothing. Its RSSI follows a log-distance path-loss model as it wanders, plus noise.
- the store's own beacons: exactly the ones configured in `drivers.ble.beacons.known`,
  sending their iBeacon or Eddystone-UID frame and now and then an Eddystone-TLM frame
  from the same address, with a battery that slowly drains (a dead one falls silent).
- the neighbour's beacons: two iBeacons and an Eddystone-URL poster, never the store's.

Which advertisement comes next is drawn from its own random stream, and the world's
events (arrivals, departures, address rotations) from another, in time order: so the
sequence of addresses does not depend on the pace (`identifiers()` replays it fast).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from drivers.base import SimPacer, Sleep
from drivers.ble.adverts import Advert, eddystone_tlm, eddystone_uid, eddystone_url, ibeacon
from drivers.ble.config import Ble
from edge.clock import Clock

MEAN_ARRIVAL_S = 15.0
DWELL_MEDIAN_S = 360.0
DWELL_SIGMA = 0.8
DWELL_MIN_S, DWELL_MAX_S = 30.0, 2700.0
ROTATE_MIN_S, ROTATE_MAX_S = 600.0, 1200.0
MAX_PHONES = 250
P_BEACON = 0.12
P_TLM = 0.1
_OPENING_CROWD = round(DWELL_MEDIAN_S * math.exp(DWELL_SIGMA**2 / 2) / MEAN_ARRIVAL_S)


def random_private_address(rng: random.Random, kind: Literal["resolvable", "static"]) -> str:
    """A Bluetooth LE random address, most significant octet first (`AA:BB:...`).

    Resolvable private: top two bits 0b01, the rest of prand (22 bits) not all 0 or all 1,
    24-bit hash below. Static: top two bits 0b11, the other 46 bits not all 0 or all 1.
    """
    if kind == "resolvable":
        prand = rng.randrange(1, (1 << 22) - 1) | (0b01 << 22)
        value = (prand << 24) | rng.getrandbits(24)
    else:
        value = rng.randrange(1, (1 << 46) - 1) | (0b11 << 46)
    return ":".join(f"{b:02X}" for b in value.to_bytes(6, "big"))


@dataclass(slots=True)
class _Phone:
    address: str
    resolvable: bool
    distance_m: float
    rssi_1m: float
    manufacturer_data: Mapping[int, bytes]
    present: bool = True
    slot: int = -1


@dataclass(slots=True)
class _Beacon:
    address: str
    mfr: Mapping[int, bytes]
    svc: Mapping[str, bytes]
    rssi_mean: float
    battery: float
    tlm: bool
    adv_count: int = 0


@dataclass(slots=True)
class _World:
    started: float | None = None
    seq: int = 0
    events: list[tuple[float, int, str, _Phone | None]] = field(default_factory=list)
    present: list[_Phone] = field(default_factory=list)
    fresh: deque[_Phone] = field(default_factory=deque)  # arrived, not heard yet


def _phone_payload(rng: random.Random) -> Mapping[int, bytes]:
    r = rng.random()
    if r < 0.55:  # Apple Continuity "Nearby Info" (type 0x10): not an iBeacon
        return {0x004C: b"\x10\x05" + bytes([rng.randrange(256) for _ in range(5)])}
    if r < 0.75:  # Samsung
        return {0x0075: b"\x42\x04\x01" + bytes([rng.randrange(256) for _ in range(4)])}
    if r < 0.85:  # Microsoft CDP (Phone Link)
        return {0x0006: b"\x01\x09\x20\x02" + bytes([rng.randrange(256) for _ in range(8)])}
    return {}


class RandomStore:
    """The default `AdvertSource` (see the module docstring).

    `inject`: raw Bluetooth addresses the first phones get, in order (the leak test): they
    stand close to the radio, so the backend's first reading is the first one's enter.
    """

    def __init__(self, cfg: Ble, clock: Clock, *, inject: Sequence[str] = (), sleep: Sleep = asyncio.sleep) -> None:
        base = random.Random(cfg.sim.seed)
        self._world_rng = random.Random(base.getrandbits(64))
        self._air = random.Random(base.getrandbits(64))
        self._pacer = SimPacer(cfg.sim.rate, clock, sleep, random.Random(base.getrandbits(64)))
        self._clock = clock
        self._injected = deque(inject)
        self._w = _World()
        self._made: list[str] | None = None  # addresses made, while `identifiers()` records
        self._beacons = self._make_beacons(cfg, random.Random(base.getrandbits(64)))
        self._live = list(self._beacons)

    def __aiter__(self) -> AsyncIterator[Advert]:
        return self._run()

    async def _run(self) -> AsyncIterator[Advert]:
        pacer, clock = self._pacer, self._clock
        while True:
            delay = pacer.next_delay()
            if delay is not None:
                await pacer.sleep(delay)
            t = clock.monotonic()
            self._advance(t)
            adv = self._next(t)
            if adv is not None:
                yield adv

    def identifiers(self, count: int) -> list[str]:
        """The first `count` phone addresses this store makes, in order (call it on a fresh
        store): what a run with this seed can have heard, however fast it went."""
        made = self._made = []
        w = self._w
        self._advance(0.0)
        while len(made) < count and w.events:
            self._advance(w.events[0][0])
        self._made = None
        return made[:count]

    # -- world ----------------------------------------------------------------------------

    def _make_beacons(self, cfg: Ble, rng: random.Random) -> list[_Beacon]:
        def addr() -> str:
            return random_private_address(rng, "static")

        out = []
        for b in cfg.beacons.known:
            mfr: Mapping[int, bytes] = {}
            svc: Mapping[str, bytes] = {}
            if b.ibeacon is not None:
                mfr = ibeacon(b.ibeacon.uuid, b.ibeacon.major, b.ibeacon.minor, rng.randint(-65, -56))
            elif b.eddystone is not None:
                svc = eddystone_uid(b.eddystone.namespace, b.eddystone.instance, rng.randint(-25, -15))
            out.append(_Beacon(addr(), mfr, svc, rng.uniform(-85, -60), rng.uniform(40, 100), tlm=True))
        neighbour = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        for minor in (1, 2):
            out.append(_Beacon(addr(), ibeacon(neighbour, 7, minor, -59), {}, rng.uniform(-95, -80), 100.0,
                               tlm=False))
        out.append(_Beacon(addr(), {}, eddystone_url(3, b"poster.example\x07", -20), -90.0, 100.0, tlm=False))
        return out

    def _schedule(self, at: float, what: str, phone: _Phone | None) -> None:
        w = self._w
        w.seq += 1
        heapq.heappush(w.events, (at, w.seq, what, phone))

    def _advance(self, t: float) -> None:
        w, rng = self._w, self._world_rng
        if w.started is None:
            w.started = t
            for _ in range(_OPENING_CROWD):
                self._arrive(t, opening=True)
            self._schedule(t + rng.expovariate(1.0 / MEAN_ARRIVAL_S), "arrive", None)
        while w.events and w.events[0][0] <= t:
            at, _, what, phone = heapq.heappop(w.events)
            if what == "arrive":
                self._arrive(at, opening=False)
                self._schedule(at + rng.expovariate(1.0 / MEAN_ARRIVAL_S), "arrive", None)
            elif phone is not None and phone.present:
                if what == "leave":
                    self._leave(phone)
                else:  # rotate: a new resolvable private address, same phone
                    phone.address = self._address(True)
                    self._schedule(at + rng.uniform(ROTATE_MIN_S, ROTATE_MAX_S), "rotate", phone)

    def _arrive(self, at: float, *, opening: bool) -> None:
        w, rng = self._w, self._world_rng
        if len(w.present) >= MAX_PHONES:
            return
        dwell = min(DWELL_MAX_S, max(DWELL_MIN_S, math.exp(rng.gauss(math.log(DWELL_MEDIAN_S), DWELL_SIGMA))))
        if opening:
            dwell *= rng.random()  # already inside for a while
        injected = bool(self._injected)
        resolvable = injected or rng.random() < 0.9
        address = self._injected.popleft() if injected else self._address(resolvable)
        if injected and self._made is not None:
            self._made.append(address)
        phone = _Phone(address, resolvable, 1.5 if injected else rng.uniform(1.5, 14.0), rng.gauss(-59.0, 3.0),
                       _phone_payload(rng))
        phone.slot = len(w.present)
        w.present.append(phone)
        w.fresh.append(phone)
        self._schedule(at + dwell, "leave", phone)
        if resolvable:
            self._schedule(at + rng.uniform(0.0, ROTATE_MAX_S), "rotate", phone)

    def _address(self, resolvable: bool) -> str:
        address = random_private_address(self._world_rng, "resolvable" if resolvable else "static")
        if self._made is not None:
            self._made.append(address)
        return address

    def _leave(self, phone: _Phone) -> None:
        w = self._w
        phone.present = False
        last = w.present.pop()
        if last is not phone:
            w.present[phone.slot] = last
            last.slot = phone.slot
        if phone in w.fresh:
            w.fresh.remove(phone)

    # -- the air --------------------------------------------------------------------------

    def _rssi(self, phone: _Phone) -> int:
        rnd = self._air.random
        # the phone wanders (multiplicative random walk on its distance); log-distance path
        # loss (exponent 2.2) plus ~3 dB of Irwin-Hall noise
        d = phone.distance_m * (1.0 + 0.4 * (rnd() - 0.5))
        phone.distance_m = d = 0.5 if d < 0.5 else 30.0 if d > 30.0 else d
        value = phone.rssi_1m - 22.0 * math.log10(d) + 6.0 * (rnd() + rnd() + rnd() - 1.5)
        return int(-100.0 if value < -100.0 else -30.0 if value > -30.0 else value)

    def _next(self, t: float) -> Advert | None:
        w, air = self._w, self._air
        if w.fresh:
            phone = w.fresh.popleft()
            return Advert(t, phone.address, self._rssi(phone), phone.manufacturer_data)
        if self._live and (not w.present or air.random() < P_BEACON):
            return self._beacon_advert(t, self._live[int(air.random() * len(self._live))])
        if not w.present:
            return None
        phone = w.present[int(air.random() * len(w.present))]
        return Advert(t, phone.address, self._rssi(phone), phone.manufacturer_data)

    def _beacon_advert(self, t: float, b: _Beacon) -> Advert:
        air = self._air
        b.adv_count += 1
        if b.tlm and air.random() < 0.01:
            b.battery -= 1.0
            if b.battery <= 0:
                self._live.remove(b)  # its battery died: silent from now on
        rssi = int(min(-30.0, b.rssi_mean + air.gauss(0.0, 4.0)))
        if b.tlm and air.random() < P_TLM:
            mv = 2000 + round(12 * max(0.0, b.battery))
            tlm = eddystone_tlm(mv, round(21.0 + air.gauss(0.0, 1.0), 2), b.adv_count, b.adv_count * 1.0)
            return Advert(t, b.address, rssi, service_data=tlm)
        return Advert(t, b.address, rssi, b.mfr, b.svc)
