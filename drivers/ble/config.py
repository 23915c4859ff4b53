"""Configuration of the BLE driver (`drivers.ble` in the YAML).

Every option is documented next to its value in config/store.yaml. Identifiers of the
store's own beacons are normalized here (iBeacon UUID upper case with dashes, Eddystone
namespace/instance lower-case hex), so the decoder's output compares equal to them.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.configbase import Model, SimRate, SpecId
from edge.units import Duration

ScanMode = Literal["auto", "passive", "active"]
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def _hex(value: str, nbytes: int, what: str) -> str:
    v = value.strip().lower().removeprefix("0x")
    if len(v) != 2 * nbytes or not _HEX.match(v):
        raise ValueError(f"{what} must be {2 * nbytes} hex digits ({nbytes} bytes)")
    return v


class IBeaconId(Model):
    """An iBeacon (or AltBeacon: same 16-byte id + two 16-bit numbers) by UUID/major/minor."""

    uuid: str
    major: int = Field(ge=0, le=65535)
    minor: int = Field(ge=0, le=65535)

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v.strip())).upper()
        except ValueError:
            raise ValueError("uuid must look like E2C56DB5-DFFB-48D2-B060-D0F5A71096E0") from None


class EddystoneUid(Model):
    """An Eddystone-UID beacon: 10-byte namespace, 6-byte instance, in hex."""

    namespace: str
    instance: str

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return _hex(v, 10, "namespace")

    @field_validator("instance")
    @classmethod
    def _inst(cls, v: str) -> str:
        return _hex(v, 6, "instance")


class StoreBeacon(Model):
    """One of the store's own beacons (infrastructure, not personal data)."""

    name: SpecId
    ibeacon: IBeaconId | None = None
    eddystone: EddystoneUid | None = None

    @model_validator(mode="after")
    def _one_id(self) -> StoreBeacon:
        if (self.ibeacon is None) == (self.eddystone is None):
            raise ValueError("a beacon has exactly one of ibeacon: {uuid, major, minor} or eddystone: "
                             "{namespace, instance}")
        return self


class Beacons(Model):
    known: list[StoreBeacon] = Field(default_factory=list)
    seen_every: Duration = Field(default=60.0, gt=0)  # beacon.seen at most this often per beacon
    telemetry_every: Duration = Field(default=600.0, ge=0)  # beacon.telemetry at most this often
    missing_after: Duration = Field(default=300.0, gt=0)  # silent this long -> beacon.missing

    @model_validator(mode="after")
    def _unique(self) -> Beacons:
        names = [b.name for b in self.known]
        if len(set(names)) != len(names):
            raise ValueError("beacon names must be unique")
        ids = [b.ibeacon or b.eddystone for b in self.known]
        if len(set(map(repr, ids))) != len(ids):
            raise ValueError("two beacons have the same identifier")
        return self


class Zone(Model):
    name: SpecId
    min_rssi: int = Field(ge=-127, le=20)


class Presence(Model):
    enter_rssi: int = Field(default=-80, ge=-127, le=20)  # smoothed RSSI (dBm) to enter
    hysteresis: int = Field(default=6, ge=0, le=40)  # dB below enter_rssi (or a zone's min) to leave
    smoothing: float = Field(default=0.3, gt=0, le=1)  # weight of the newest sample (1 = none)
    exit_after: Duration = Field(default=60.0, gt=0)  # silent or weak this long -> presence.exit
    occupancy_every: Duration = Field(default=60.0, gt=0)  # presence.occupancy interval
    zones: list[Zone] = Field(default_factory=list)  # RSSI bands, any order (sorted strongest first)
    ignore_foreign_beacons: bool = True  # beacons that are not the store's: no presence
    max_devices: int = Field(default=20000, ge=10, le=1_000_000)  # addresses tracked at once
    # presence.zone per zone change of a present device (edge/analytics/ needs them; the daemon
    # turns this on when analytics is enabled, and they never reach the buffer)
    zone_events: bool = False

    @field_validator("zones")
    @classmethod
    def _zones(cls, zones: list[Zone]) -> list[Zone]:
        if len({z.name for z in zones}) != len(zones):
            raise ValueError("zone names must be unique")
        if len({z.min_rssi for z in zones}) != len(zones):
            raise ValueError("two zones have the same min_rssi")
        return sorted(zones, key=lambda z: -z.min_rssi)


class Watchdog(Model):
    enabled: bool = True
    quiet: Duration = Field(default=60.0, gt=0)  # no advertisement this long while expected -> act
    restarts: int = Field(default=2, ge=0, le=10)  # scanner restarts before a power cycle
    power_cycles: int = Field(default=1, ge=0, le=5)  # adapter power cycles before degraded
    settle: Duration = Field(default=1.0, ge=0, le=60)  # wait after powering the adapter on


class Ble(Model):
    enabled: bool = True
    backend: Literal["sim", "bleak"] = "sim"
    adapter: str = Field(default="hci0", pattern=r"^hci[0-9]{1,3}$")
    scan_mode: ScanMode = "auto"  # auto: passive where BlueZ supports it, else active
    power_on: bool = True  # power the adapter on when it is off (not when rfkill-blocked)
    queue_max: int = Field(default=10000, ge=100, le=1_000_000)  # adverts waiting; oldest dropped
    presence: Presence = Field(default_factory=Presence)
    beacons: Beacons = Field(default_factory=Beacons)
    watchdog: Watchdog = Field(default_factory=Watchdog)
    sim: SimRate = Field(default_factory=SimRate)
