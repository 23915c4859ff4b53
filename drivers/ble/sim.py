"""Simulated BLE: shoppers' phones coming and going, and the store's own beacons.

World model (advanced one step of `STORE_S_PER_READING` store-seconds per reading, so at
the default rate of 5 readings/s the store runs in real time and at higher rates its
minutes are compressed):

- phones arrive (Poisson, one every ~15 store-seconds on average), linger (log-normal,
  median ~6 store-minutes, 30 s to 45 min) and leave. Each has a random private address
  (resolvable private address, top bits 0b01, ~90 %; random static, top bits 0b11) that
  it keeps for its visit (real phones rotate RPAs every ~15 min; not simulated), and an
  RSSI from a log-distance path-loss model with the phone wandering and noise on top;
- iBeacons and Eddystone-UID beacons advertise with a slowly draining battery.

Each reading is one of (phones carry the address as `Ident("ble_address", ...)` under
`ids["device"]`; beacons are infrastructure and carry no ids):

- `presence.enter` data {kind: "phone", rssi}
- `presence.exit`  data {kind: "phone", dwell_ms} (exit ts - enter ts, wall clock)
- `ble.adv`        data {kind: "phone", rssi, tx_power?}
- `beacon.seen`    data {frame: "ibeacon", uuid, major, minor, ...} or
                   {frame: "eddystone_uid", namespace, instance, ...}, both with
                   rssi, tx_power, battery_pct
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
from types import MappingProxyType
from typing import Any, Literal

from drivers.base import SimPacer, Sleep, classify_injected
from drivers.ble.config import Ble
from edge.clock import Clock
from edge.events import Ident, Reading

STORE_S_PER_READING = 0.2
_MEAN_ARRIVAL_S = 15.0
_DWELL_MEDIAN_S = 360.0
_DWELL_SIGMA = 0.8
_DWELL_MIN_S, _DWELL_MAX_S = 30.0, 2700.0
_MAX_PHONES = 250
_P_BEACON = 0.12
_TX_POWER_LEVELS = (0, 4, 7, 8, 12)


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
    raw = value.to_bytes(6, "big")
    return ":".join(f"{b:02X}" for b in raw)


@dataclass(slots=True)
class _Phone:
    ident: Ident
    leave_at: float
    distance_m: float
    rssi_1m: float
    tx_power: int | None
    enter_ts: int = 0
    slot: int = -1  # index in the present list


@dataclass(slots=True)
class _Beacon:
    fields: Mapping[str, Any]
    rssi_mean: float
    battery: float
    tx_power: int


@dataclass(slots=True)
class _World:
    t: float = 0.0
    next_arrival: float = 0.0
    seq: int = 0
    present: list[_Phone] = field(default_factory=list)
    leaving: list[tuple[float, int, _Phone]] = field(default_factory=list)
    pending: deque[tuple[Literal["enter", "exit"], _Phone]] = field(default_factory=deque)


class BleSim:
    """Simulated BLE backend (see the module docstring for what it yields).

    `inject`: raw identifiers for the leak test (see `drivers.base.classify_injected`);
    the Bluetooth addresses among them become the addresses of the first phones to enter,
    in order (the very first reading is the first injected phone's `presence.enter`).
    `limit`: stop after that many readings. `sleep`: used for pacing (tests inject one).
    """

    name = "sim"

    def __init__(
        self,
        cfg: Ble,
        clock: Clock,
        *,
        inject: Sequence[str] | None = None,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._rng = random.Random(cfg.sim.seed)
        self._clock = clock
        self._limit = limit
        self._count = 0
        self._pacer = SimPacer(cfg.sim.rate, clock, sleep, self._rng)
        self._injected = classify_injected(inject)["ble_address"]
        self._world = _World()
        self._beacons = self._make_beacons()

    async def open(self) -> None:
        """Nothing to open: the simulated radio is always there."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def readings(self) -> AsyncIterator[Reading]:
        pacer = self._pacer
        while self._limit is None or self._count < self._limit:
            delay = pacer.next_delay()
            if delay is not None:
                await pacer.sleep(delay)
            self._step()
            self._count += 1
            yield self._next_reading()

    # -- world ---------------------------------------------------------------------------

    def _make_beacons(self) -> list[_Beacon]:
        rng = self._rng
        store_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4)).upper()
        major = rng.randrange(1, 65535)
        out = []
        for minor in range(1, rng.randint(4, 7)):
            out.append(
                _Beacon(
                    MappingProxyType(
                        {"frame": "ibeacon", "uuid": store_uuid, "major": major, "minor": minor}
                    ),
                    rssi_mean=rng.uniform(-92, -60),
                    battery=rng.uniform(40, 100),
                    tx_power=rng.randint(-65, -56),
                )
            )
        namespace = f"{rng.getrandbits(80):020x}"
        for _ in range(rng.randint(1, 3)):
            out.append(
                _Beacon(
                    MappingProxyType(
                        {
                            "frame": "eddystone_uid",
                            "namespace": namespace,
                            "instance": f"{rng.getrandbits(48):012x}",
                        }
                    ),
                    rssi_mean=rng.uniform(-92, -60),
                    battery=rng.uniform(40, 100),
                    tx_power=rng.randint(-25, -15),
                )
            )
        return out

    def _new_phone(self) -> _Phone:
        rng = self._rng
        if self._injected:
            address = self._injected.popleft()
        else:
            address = random_private_address(rng, "resolvable" if rng.random() < 0.9 else "static")
        dwell = math.exp(rng.gauss(math.log(_DWELL_MEDIAN_S), _DWELL_SIGMA))
        dwell = min(_DWELL_MAX_S, max(_DWELL_MIN_S, dwell))
        return _Phone(
            ident=Ident("ble_address", address),
            leave_at=self._world.t + dwell,
            distance_m=rng.uniform(2.0, 20.0),
            rssi_1m=rng.gauss(-59.0, 3.0),
            tx_power=rng.choice(_TX_POWER_LEVELS) if rng.random() < 0.4 else None,
        )

    def _step(self) -> None:
        w, rng = self._world, self._rng
        w.t += STORE_S_PER_READING
        while w.t >= w.next_arrival:
            w.next_arrival += rng.expovariate(1.0 / _MEAN_ARRIVAL_S)
            if len(w.present) < _MAX_PHONES:
                phone = self._new_phone()
                phone.slot = len(w.present)
                w.present.append(phone)
                w.seq += 1
                heapq.heappush(w.leaving, (phone.leave_at, w.seq, phone))
                w.pending.append(("enter", phone))
        while w.leaving and w.leaving[0][0] <= w.t:
            _, _, phone = heapq.heappop(w.leaving)
            last = w.present.pop()
            if last is not phone:
                w.present[phone.slot] = last
                last.slot = phone.slot
            w.pending.append(("exit", phone))

    def _rssi(self, phone: _Phone) -> int:
        rnd = self._rng.random
        # the phone wanders (multiplicative random walk on its distance); log-distance
        # path loss (exponent 2.2) plus ~3 dB of Irwin-Hall noise (cheaper than gauss)
        d = phone.distance_m * (1.0 + 0.4 * (rnd() - 0.5))
        phone.distance_m = d = 0.5 if d < 0.5 else 30.0 if d > 30.0 else d
        value = phone.rssi_1m - 22.0 * math.log10(d) + 6.0 * (rnd() + rnd() + rnd() - 1.5)
        return int(-100.0 if value < -100.0 else -30.0 if value > -30.0 else value)

    def _next_reading(self) -> Reading:
        w, rng = self._world, self._rng
        ts = self._clock.wall_ms()
        if w.pending:
            what, phone = w.pending.popleft()
            if what == "enter":
                phone.enter_ts = ts
                data: dict[str, Any] = {"kind": "phone", "rssi": self._rssi(phone)}
                return Reading(
                    src="ble", type="presence.enter", ts=ts, data=data, ids={"device": phone.ident}
                )
            data = {"kind": "phone", "dwell_ms": max(0, ts - phone.enter_ts)}
            return Reading(src="ble", type="presence.exit", ts=ts, data=data, ids={"device": phone.ident})
        if not w.present or rng.random() < _P_BEACON:
            b = rng.choice(self._beacons)
            if rng.random() < 0.01:
                b.battery = max(0.0, b.battery - 1.0)
            data = {
                **b.fields,
                "rssi": int(min(-30.0, b.rssi_mean + rng.gauss(0.0, 4.0))),
                "tx_power": b.tx_power,
                "battery_pct": int(b.battery),
            }
            return Reading(src="ble", type="beacon.seen", ts=ts, data=data)
        phone = w.present[int(rng.random() * len(w.present))]
        data = {"kind": "phone", "rssi": self._rssi(phone)}
        if phone.tx_power is not None:
            data["tx_power"] = phone.tx_power
        return Reading(src="ble", type="ble.adv", ts=ts, data=data, ids={"device": phone.ident})
