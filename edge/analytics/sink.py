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

Failures are contained: an exception in `observe` is counted (`observe_errors` in the
analytics status) and logged by type only (an exception's text could carry a pseudonym), and
the event still goes on to the buffer; an exception in `tick` is counted (`tick_errors`),
logged the same way, and the ticker retries with backoff (1 s doubling to 30 s). While no
tick completes, `StoreAnalytics.health_reason()` puts a reason in /healthz.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import structlog

from edge.analytics.engine import StoreAnalytics
from edge.events import Pending
from edge.pipeline import Sink

Mode = Literal["events", "aggregate"]
LEAVES_IN_AGGREGATE = ("analytics.", "edge.")
INTERNAL = frozenset({"presence.zone"})
BACKOFF_MAX_S = 30.0

log = structlog.get_logger("edge.analytics")


class AnalyticsSink:
    """A `Sink` feeding `analytics` (may be None: only the aggregate filter) and then `inner`.

    `kept` counts events that stayed on the device. `put` after a refused `put_nowait` of
    the same event does not observe it twice.
    """

    def __init__(self, inner: Sink, analytics: StoreAnalytics | None, mode: Mode = "events") -> None:
        self._inner = inner
        self._analytics = analytics
        self._aggregate = mode == "aggregate"
        self._last: Pending | None = None
        self.kept = 0

    def _stays(self, p: Pending) -> bool:
        t = p.type
        if t in INTERNAL or (self._aggregate and not t.startswith(LEAVES_IN_AGGREGATE)):
            self.kept += 1
            return True
        return False

    def _observe(self, p: Pending) -> None:
        a = self._analytics
        if a is None:
            return
        try:
            a.observe(p)
        except Exception as exc:  # analytics must never cost an event or the driver's pump
            a.counters["observe_errors"] += 1
            n = a.counters["observe_errors"]
            if n == 1 or n % 1000 == 0:  # a repeating fault does not flood the log
                log.error("analytics_observe_failed", type=p.type, error=type(exc).__name__, count=n)

    def put_nowait(self, p: Pending) -> bool:
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
            self._observe(p)
            if self._stays(p):
                return
        await self._inner.put(p)


async def run_ticker(analytics: StoreAnalytics, sink: Sink, every: float = 1.0, backoff_min: float = 1.0) -> None:
    """Advance `analytics` every `every` seconds and store what it publishes, until cancelled.
    A failing `tick` is counted and logged, and retried after `backoff_min` doubling up to
    BACKOFF_MAX_S."""
    analytics.ticker_started()
    backoff = 0.0
    while True:
        try:
            for p in analytics.tick():
                if not sink.put_nowait(p):
                    await sink.put(p)
        except Exception as exc:
            analytics.counters["tick_errors"] += 1
            backoff = min(BACKOFF_MAX_S, backoff * 2 or backoff_min)
            log.error("analytics_tick_failed", error=type(exc).__name__,
                      count=analytics.counters["tick_errors"], retry_s=backoff)
            await asyncio.sleep(backoff)
            continue
        backoff = 0.0
        await asyncio.sleep(every)
