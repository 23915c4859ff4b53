"""The driver's processing path, independent of where advertisements come from:
decode -> store beacons (`beacons.py`) or presence (`presence.py`) -> Readings.

One `advert()` per advertisement (the hot path: most return nothing), one `tick()` about
once a second. The real backend (`bleak.py`) and the benchmark both drive this class, so
the benchmark measures exactly what the daemon runs.

Routing: frames of the store's configured beacons go to the beacon tracker, and their
addresses never reach presence. Other beacon frames (iBeacon, AltBeacon, Eddystone) are a
neighbour's infrastructure, ignored when `presence.ignore_foreign_beacons`. Everything
else is a person's device and goes to presence. Malformed payloads are counted by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from drivers.ble.beacons import BeaconTracker
from drivers.ble.config import Ble
from drivers.ble.decode import (
    AltBeacon,
    EddystoneEid,
    EddystoneEtlm,
    EddystoneTlm,
    EddystoneUid,
    EddystoneUrl,
    IBeacon,
    decode,
)
from drivers.ble.presence import PresenceEngine
from edge.events import Reading

_NONE: tuple[Reading, ...] = ()
_ID_FRAMES = (IBeacon, AltBeacon, EddystoneUid)
_OTHER_BEACON_FRAMES = (EddystoneUrl, EddystoneEtlm, EddystoneEid)


def tick_period(cfg: Ble) -> float:
    """How often a backend calls `tick()`: a quarter of the shortest interval it serves."""
    periods = [1.0, cfg.presence.exit_after / 4, cfg.presence.occupancy_every / 4, cfg.beacons.missing_after / 4]
    if cfg.watchdog.enabled:
        periods.append(cfg.watchdog.quiet / 4)
    return max(0.02, min(periods))


class BleProcessor:
    def __init__(self, cfg: Ble, now: float) -> None:
        self.presence = PresenceEngine(cfg.presence, now)
        self.beacons = BeaconTracker(cfg.beacons, now)
        self._ignore_foreign = cfg.presence.ignore_foreign_beacons
        self.adverts = 0
        self.beacon_adverts = 0
        self.foreign_beacon_adverts = 0
        self.malformed: Counter[str] = Counter()

    def advert(  # noqa: PLR0917 - the hot path: one call per advertisement, positional
        self, address: str, rssi: int, manufacturer_data: Mapping[int, bytes],
               service_data: Mapping[str, bytes], now: float, wall: int) -> tuple[Reading, ...]:
        self.adverts += 1
        if manufacturer_data or service_data:
            decoded = decode(manufacturer_data, service_data)
            if decoded.malformed:
                self.malformed.update(decoded.malformed)
            if decoded.frames:
                routed = self._beacon_frames(decoded.frames, address, rssi, now, wall)
                if routed is not None:
                    return routed
        if self.beacons.is_beacon_address(address):
            self.beacon_adverts += 1
            return _NONE
        r = self.presence.observe(address, rssi, now, wall)
        return _NONE if r is None else (r,)

    def _beacon_frames(self, frames: tuple[Any, ...], address: str, rssi: int,
                       now: float, wall: int) -> tuple[Reading, ...] | None:
        """Readings when the advertisement is a beacon's (handled here), None for presence."""
        out: list[Reading] = []
        beaconish = ours = False
        for f in frames:
            if isinstance(f, _ID_FRAMES):
                beaconish = True
                k = self.beacons.match(f)
                if k is not None:
                    ours = True
                    r = self.beacons.seen(k, f, address, rssi, now, wall)
                    if r is not None:
                        out.append(r)
            elif isinstance(f, EddystoneTlm):
                beaconish = True
                if self.beacons.is_beacon_address(address):
                    ours = True
                    r = self.beacons.telemetry(address, f, now, wall)
                    if r is not None:
                        out.append(r)
                else:
                    self.beacons.unattributed_tlm += 1
            elif isinstance(f, _OTHER_BEACON_FRAMES):
                beaconish = True
        if ours or (self.beacons.is_beacon_address(address)):
            self.beacon_adverts += 1
            return tuple(out)
        if beaconish and self._ignore_foreign:
            self.foreign_beacon_adverts += 1
            return _NONE
        return None

    def tick(self, now: float, wall: int, *, scanner_ok: bool = True) -> list[Reading]:
        """Presence exits and occupancy; beacon.missing only while the scanner is known to
        work (a stalled radio is the watchdog's business, not every beacon's battery)."""
        out = self.presence.tick(now, wall)
        if scanner_ok:
            out.extend(self.beacons.tick(now, wall))
        return out

    def resume(self, now: float) -> None:
        """Scanning (re)started at `now`."""
        self.beacons.resume(now)

    def flush(self, now: float, wall: int) -> list[Reading]:
        """The scanner is lost: close every presence session, forget every address."""
        out = self.presence.flush(now, wall)
        self.beacons.forget_addresses()
        return out

    def forget(self) -> None:
        self.presence.forget()
        self.beacons.forget_addresses()

    def stats(self) -> dict[str, Any]:
        p = self.presence
        return {
            "adverts": self.adverts,
            "beacon_adverts": self.beacon_adverts,
            "foreign_beacon_adverts": self.foreign_beacon_adverts,
            "malformed": sum(self.malformed.values()),
            "malformed_by_reason": dict(self.malformed),
            "tracked": p.tracked,
            "present": p.present,
            "entered": p.entered,
            "exited": p.exited,
            "over_limit": p.over_limit,
            "evicted": p.evicted,
            "tlm_unattributed": self.beacons.unattributed_tlm,
        }
