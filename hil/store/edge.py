"""The edge side of the simulated store: the daemon's real processing code, fed directly.

advert -> drivers.ble.processor.BleProcessor (presence, zones) -> card scrub -> normalize ->
privacy (real KeyStore, default policy) -> AnalyticsSink -> StoreAnalytics (one with rotation
inference, one without, over the same events); taps through drivers.nfc.tap.TapBuilder,
receipt text through the normalize stage's receipt parser. The clock is a FakeClock moved to
the store second, so a day runs as fast as the CPU allows.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

from drivers.ble.config import Ble
from drivers.ble.processor import BleProcessor
from drivers.nfc.config import Nfc
from drivers.nfc.tap import TagRead, TapBuilder
from edge.analytics.config import Analytics
from edge.analytics.engine import StoreAnalytics
from edge.analytics.sink import AnalyticsSink
from edge.clock import FakeClock
from edge.config import Privacy
from edge.events import Pending, Reading
from edge.pipeline import Pipeline, build_pipeline
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import PrivacyStage
from hil.store.sim import PRESENCE_ZONES

DAY0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: store second 0 (UTC as local time)


class _Collect:
    def __init__(self) -> None:
        self.events: list[Pending] = []

    def put_nowait(self, p: Pending) -> bool:
        self.events.append(p)
        return True

    async def put(self, p: Pending) -> None:
        self.events.append(p)


class _Fanout:
    """The pipeline's sink: both analytics see every event (aggregate mode: nothing else stays)."""

    def __init__(self, sinks: list[AnalyticsSink]) -> None:
        self._sinks = sinks

    def put_nowait(self, p: Pending) -> bool:
        for s in self._sinks:
            s.put_nowait(p)
        return True

    async def put(self, p: Pending) -> None:
        self.put_nowait(p)


class StoreEdge:
    def __init__(self, state: Path, *, k: int = 5, interval: str = "15m", epsilon: float | None = None,
                 rotation_rssi: int | None = None) -> None:
        self.clock = FakeClock(wall=DAY0_MS, mono=0.0)
        keys = KeyStore(state / "keys", self.clock)
        if not keys.exists():
            keys.init()
        self.ble = Ble.model_validate({"backend": "bleak", "presence": {
            "zones": PRESENCE_ZONES, "zone_events": True, "exit_after": "60s"}})
        self.proc = BleProcessor(self.ble, 0.0)
        self.taps = TapBuilder(Nfc())
        self.analytics: dict[str, StoreAnalytics] = {}
        self.published: dict[str, _Collect] = {}
        sinks = []
        for name, rotation in (("rotation", True), ("no-rotation", False)):
            cfg = Analytics.model_validate({"enabled": True, "k": k, "interval": interval, "rotation": rotation,
                                            "epsilon": epsilon})
            if rotation_rssi is not None:
                cfg = cfg.model_copy(update={"rotation_rssi": rotation_rssi})
            a = StoreAnalytics(cfg, [str(z["name"]) for z in PRESENCE_ZONES], self.clock,
                               exit_after=self.ble.presence.exit_after, tz=UTC)
            self.analytics[name] = a
            self.published[name] = _Collect()
            sinks.append(AnalyticsSink(self.published[name], a, "aggregate"))
        pz = Pseudonymizer(Privacy(), keys, None)
        self.pipeline: Pipeline = build_pipeline(self.clock, PrivacyStage(pz), _Fanout(sinks))[0]
        self.adverts = 0

    def _set(self, t: float) -> tuple[float, int]:
        wall = DAY0_MS + int(t * 1000)
        self.clock.wall, self.clock.mono = wall, t
        return t, wall

    def _submit(self, rs: Any) -> None:
        for r in rs:
            p = self.pipeline.process(r)
            if p is not None:
                self.pipeline._sink.put_nowait(p)  # the pipeline's own sink, synchronously

    def feed(self, kind: str, payload: tuple[Any, ...], t: float) -> None:
        now, wall = self._set(t)
        if kind == "advert":
            self.adverts += 1
            out = self.proc.advert(payload[0], payload[1], {}, {}, now, wall)
            if out:
                self._submit(out)
        elif kind == "tap":
            self._submit([self.taps.build(TagRead("Type2Tag", payload[1], payload[0]), wall)])
        elif kind == "receipt":
            text = {"receipt": str(payload[0])}
            self._submit([Reading("pos", "pos.receipt_text", wall, {"register": "till-1"}, text=text)])

    def second(self, t: float) -> None:
        now, wall = self._set(t)
        self._submit(self.proc.tick(now, wall))
        for name, a in self.analytics.items():
            self.published[name].events.extend(a.tick())

    def finish(self) -> None:
        for name, a in self.analytics.items():
            self.published[name].events.extend(a.flush())

    def rows(self, name: str) -> list[dict[str, Any]]:
        return [dict(p.data) for p in self.published[name].events if p.type == "analytics.interval"]
