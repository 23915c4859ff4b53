"""Where analytics meets the pipeline: a sink between the privacy stage and the buffer.

    PrivacyStage -> AnalyticsSink.put_nowait(p) -> StoreAnalytics.observe(p)
                                                -> Buffer (unless the event stays on the device)

What never reaches the buffer:
- `presence.zone` (made only for analytics: the daemon turns `zone_events` on for it);
- with `privacy.mode: aggregate`, every event except `analytics.*` and `edge.*`: per-person
  events (presence enter/exit, taps and receipts with their pseudonyms, simulated adverts)
  and the rest stay in memory, only the aggregates leave.

`run_ticker` is the task that advances analytics once a second and puts the intervals it
publishes into the buffer.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from edge.analytics.engine import StoreAnalytics
from edge.events import Pending
from edge.pipeline import Sink

Mode = Literal["events", "aggregate"]
LEAVES_IN_AGGREGATE = ("analytics.", "edge.")
INTERNAL = frozenset({"presence.zone"})


class AnalyticsSink:
    """A `Sink` feeding `analytics` (may be None: only the aggregate filter) and then `inner`.

    `kept` counts events that stayed on the device. `put` after a refused `put_nowait` of
    the same event does not observe it twice.
    """

    def __init__(self, inner: Sink, analytics: StoreAnalytics | None, mode: Mode = "events") -> None:
        self._inner = inner
        self._observe = analytics.observe if analytics is not None else None
        self._aggregate = mode == "aggregate"
        self._last: Pending | None = None
        self.kept = 0

    def _stays(self, p: Pending) -> bool:
        t = p.type
        if t in INTERNAL or (self._aggregate and not t.startswith(LEAVES_IN_AGGREGATE)):
            self.kept += 1
            return True
        return False

    def put_nowait(self, p: Pending) -> bool:
        if self._observe is not None:
            self._observe(p)
        if self._stays(p):
            return True
        if self._inner.put_nowait(p):
            return True
        self._last = p  # refused: `put` follows with the same event
        return False

    async def put(self, p: Pending) -> None:
        if p is self._last:
            self._last = None
        else:
            if self._observe is not None:
                self._observe(p)
            if self._stays(p):
                return
        await self._inner.put(p)


async def run_ticker(analytics: StoreAnalytics, sink: Sink, every: float = 1.0) -> None:
    """Advance `analytics` every `every` seconds and store what it publishes, until cancelled."""
    while True:
        for p in analytics.tick():
            if not sink.put_nowait(p):
                await sink.put(p)
        await asyncio.sleep(every)
