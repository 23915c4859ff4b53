"""Synthetic advertisements: the seam a simulation feeds the BLE sim backend through, and
the payload encoders (the inverse of `decode.py`) to build them with.

An `Advert` is what a radio hears: the sender's address, the RSSI, and the advertisement's
manufacturer data (keyed by company id, the two id bytes removed) and service data (keyed
by 128-bit service UUID string), exactly as bleak hands them to the bleak backend. The sim
backend (`sim.py`) runs every `Advert` through the same `BleProcessor` (decode, store
beacons, presence) and `ScanWatchdog` as the bleak backend, so a simulation differs from
the real store only in where the bytes come from.

An `AdvertSource` is anything `async for` can iterate for `Advert`s, in non-decreasing `t`.
`t` is when the advertisement was heard, in seconds on the monotonic timeline of the clock
the backend was given (`clock.monotonic()`); a source paced in real time stamps each
advert with `clock.monotonic()` after its sleep, a source on a `FakeClock` advances the
clock itself. The backend asks for the next advert only once the previous one has been
processed, so a source that never waits is not outrun. When the source ends, the backend
closes every open presence session (reason "stop", as when a real scanner is lost) and
ends. A source iterated again after a failure (the facade's restart) should continue.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from drivers.ble.decode import APPLE, EDDYSTONE_UUID

_NO_MFR: Mapping[int, bytes] = MappingProxyType({})
_NO_SVC: Mapping[str, bytes] = MappingProxyType({})


@dataclass(slots=True, frozen=True)
class Advert:
    """One advertisement as heard: raw address (`AA:BB:CC:DD:EE:FF`) kept in memory only."""

    t: float  # seconds, the backend clock's monotonic timeline
    address: str
    rssi: int
    manufacturer_data: Mapping[int, bytes] = field(default_factory=lambda: _NO_MFR)
    service_data: Mapping[str, bytes] = field(default_factory=lambda: _NO_SVC)

    def __repr__(self) -> str:  # the address is personal for a phone
        return f"Advert(t={self.t:.3f}, rssi={self.rssi}, mfr={sorted(self.manufacturer_data)})"


# Where the sim backend's advertisements come from (see the module docstring): the
# AsyncIterable protocol, so an async generator, or any object whose `__aiter__` returns one.
AdvertSource = AsyncIterable[Advert]


def _u8(v: int) -> bytes:
    return (v & 0xFF).to_bytes(1, "big")


def ibeacon(uuid: str, major: int, minor: int, tx_power: int) -> dict[int, bytes]:
    """Manufacturer data of an iBeacon (Apple, company 0x004C)."""
    body = b"\x02\x15" + uuid_mod.UUID(uuid).bytes + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
    return {APPLE: body + _u8(tx_power)}


def altbeacon(company_id: int, uuid: str, major: int, minor: int, tx_power: int) -> dict[int, bytes]:
    """Manufacturer data of an AltBeacon (any company id)."""
    body = b"\xbe\xac" + uuid_mod.UUID(uuid).bytes + major.to_bytes(2, "big") + minor.to_bytes(2, "big")
    return {company_id: body + _u8(tx_power) + b"\x00"}


def eddystone_uid(namespace: str, instance: str, tx_power: int) -> dict[str, bytes]:
    """Service data of an Eddystone-UID frame (namespace 10 bytes, instance 6, in hex)."""
    return {EDDYSTONE_UUID: b"\x00" + _u8(tx_power) + bytes.fromhex(namespace) + bytes.fromhex(instance) + b"\0\0"}


def eddystone_tlm(battery_mv: int | None, temperature_c: float | None, adv_count: int,
                  uptime_s: float) -> dict[str, bytes]:
    """Service data of an unencrypted Eddystone-TLM frame (None: not measured)."""
    temp = 0x8000 if temperature_c is None else round(temperature_c * 256) & 0xFFFF
    return {EDDYSTONE_UUID: b"\x20\x00" + (battery_mv or 0).to_bytes(2, "big") + temp.to_bytes(2, "big")
            + (adv_count & 0xFFFFFFFF).to_bytes(4, "big") + (round(uptime_s * 10) & 0xFFFFFFFF).to_bytes(4, "big")}


def eddystone_url(scheme: int, encoded: bytes, tx_power: int) -> dict[str, bytes]:
    """Service data of an Eddystone-URL frame (`scheme` 0-3, `encoded` the compressed rest)."""
    return {EDDYSTONE_UUID: b"\x10" + _u8(tx_power) + _u8(scheme) + encoded}
