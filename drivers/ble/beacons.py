"""The store's own beacons: infrastructure, so their events carry names and ids, no `ids`.

- `beacon.seen` {beacon, frame, <id fields>, rssi, rssi_mean, samples, tx_power, recovered?}:
  at the first sighting, then at most once per `seen_every` per beacon (rssi_mean and
  samples over the advertisements since the previous event); `recovered: true` when the
  beacon had been reported missing.
- `beacon.telemetry` {beacon, battery_mv, temperature_c, adv_count, uptime_s}: from
  Eddystone-TLM frames, at most once per `telemetry_every` (0: every frame). A TLM frame
  carries no beacon id, so it is attributed by address to the beacon whose UID (or iBeacon)
  frame came from the same address. battery_mv / temperature_c are null when the beacon
  does not measure them.
- `beacon.missing` {beacon, last_seen_ts, silent_ms}: once when a known beacon has not been
  heard for `missing_after` while the scanner was listening (last_seen_ts null: never
  heard since the driver started). So a store learns which beacon's battery died.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drivers.ble.config import Beacons
from drivers.ble.decode import AltBeacon, EddystoneTlm, EddystoneUid, IBeacon
from edge.events import Reading

_FRAME_NAMES = {IBeacon: "ibeacon", AltBeacon: "altbeacon", EddystoneUid: "eddystone_uid"}
_ADDRESS_SLACK = 16


@dataclass(slots=True)
class _Known:
    name: str
    ids: dict[str, Any]
    last_seen: float | None = None
    last_seen_wall: int | None = None
    last_emit: float | None = None
    last_tlm: float | None = None
    n: int = 0
    total: int = 0
    missing: bool = False
    addresses: set[str] = field(default_factory=set)


class BeaconTracker:
    def __init__(self, cfg: Beacons, now: float) -> None:
        self._seen_every = float(cfg.seen_every)
        self._tlm_every = float(cfg.telemetry_every)
        self._missing_after = float(cfg.missing_after)
        self._by_ib: dict[tuple[str, int, int], _Known] = {}
        self._by_ed: dict[tuple[str, str], _Known] = {}
        self._known: list[_Known] = []
        for b in cfg.known:
            if b.ibeacon is not None:
                k = _Known(b.name, {"uuid": b.ibeacon.uuid, "major": b.ibeacon.major, "minor": b.ibeacon.minor})
                self._by_ib[(b.ibeacon.uuid, b.ibeacon.major, b.ibeacon.minor)] = k
            elif b.eddystone is not None:  # the config validates: exactly one of the two
                k = _Known(b.name, {"namespace": b.eddystone.namespace, "instance": b.eddystone.instance})
                self._by_ed[(b.eddystone.namespace, b.eddystone.instance)] = k
            else:
                continue
            self._known.append(k)
        # address -> beacon, for TLM attribution; bounded (beacons may rotate addresses)
        self._by_address: dict[str, _Known] = {}
        self._max_addresses = 4 * len(self._known) + _ADDRESS_SLACK
        self._listening_since = now
        self.unattributed_tlm = 0

    @property
    def configured(self) -> int:
        return len(self._known)

    def match(self, frame: IBeacon | AltBeacon | EddystoneUid) -> _Known | None:
        if isinstance(frame, EddystoneUid):
            return self._by_ed.get((frame.namespace, frame.instance)) if self._by_ed else None
        if not self._by_ib:
            return None
        return self._by_ib.get((frame.uuid, frame.major, frame.minor))

    def is_beacon_address(self, address: str) -> bool:
        return address in self._by_address

    def seen(  # noqa: PLR0917 - hot path, called positionally by the processor
        self, k: _Known, frame: IBeacon | AltBeacon | EddystoneUid, address: str,
             rssi: int, now: float, wall: int) -> Reading | None:
        if address not in self._by_address:
            if len(self._by_address) >= self._max_addresses:
                del self._by_address[next(iter(self._by_address))]
            self._by_address[address] = k
        k.last_seen, k.last_seen_wall = now, wall
        k.n += 1
        k.total += rssi
        recovered = k.missing
        if not recovered and k.last_emit is not None and now - k.last_emit < self._seen_every:
            return None
        data: dict[str, Any] = {"beacon": k.name, "frame": _FRAME_NAMES[type(frame)], **k.ids,
                                "rssi": rssi, "rssi_mean": round(k.total / k.n), "samples": k.n,
                                "tx_power": frame.tx_power}
        if recovered:
            data["recovered"] = True
            k.missing = False
        k.last_emit = now
        k.n = k.total = 0
        return Reading(src="ble", type="beacon.seen", ts=wall, data=data)

    def telemetry(self, address: str, tlm: EddystoneTlm, now: float, wall: int) -> Reading | None:
        k = self._by_address.get(address)
        if k is None:
            self.unattributed_tlm += 1
            return None
        if k.last_tlm is not None and now - k.last_tlm < self._tlm_every:
            return None
        k.last_tlm = now
        return Reading(src="ble", type="beacon.telemetry", ts=wall, data={
            "beacon": k.name,
            "battery_mv": tlm.battery_mv,
            "temperature_c": tlm.temperature_c,
            "adv_count": tlm.adv_count,
            "uptime_s": tlm.uptime_s,
        })

    def resume(self, now: float) -> None:
        """The scanner (re)started: silence before now says nothing about the beacons."""
        self._listening_since = now

    def tick(self, now: float, wall: int) -> list[Reading]:
        out = []
        for k in self._known:
            if k.missing:
                continue
            ref = self._listening_since if k.last_seen is None else max(k.last_seen, self._listening_since)
            if now - ref >= self._missing_after:
                k.missing = True
                silent = now - (k.last_seen if k.last_seen is not None else ref)
                out.append(Reading(src="ble", type="beacon.missing", ts=wall, data={
                    "beacon": k.name, "last_seen_ts": k.last_seen_wall, "silent_ms": round(silent * 1000)}))
        return out

    def forget_addresses(self) -> None:
        self._by_address.clear()
