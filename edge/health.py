"""Health and metrics: `Liveness` (is the pipeline making progress?), the STATUS= line, the
Prometheus families of `/metrics` (through prometheus-client) and the `/healthz` document
(200 ok / 503 with reasons, JSON). The HTTP side (aiohttp, with the store page) lives in
edge/web/server.py; what is healthy is decided here, apart from how it is served.

The endpoint binds `health.listen` (127.0.0.1:9108 by default: local only; scrape it through
an SSH tunnel or a local agent, or bind it wider with a token and TLS, edge/web/access.py).

What the metrics read: the buffer's `stats()` (backlog per source, oldest unsent, batches,
drops per source and reason, last ack), the pipeline's accepted/rejected counters per
source, each driver's `status()` (state, readings, errors, restarts), the uplink's
`status()` (state, counters, last ack), the clock's sync flag and the loop lag the watchdog
measures. No label ever carries an identifier: sources, driver names, states and reasons
are all from configuration or code.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from edge import __version__
from edge.ackwatch import AckAlarm, ack_alarm, refused_acks
from edge.aio import bounded
from edge.buffer import BufferStats
from edge.clock import Clock
from edge.units import format_duration, format_size

if TYPE_CHECKING:
    from edge.supervisor import Runtime
    from edge.web.server import HealthServer

log = structlog.get_logger("edge.health")

STATS_TIMEOUT = 2.0  # seconds a scrape or STATUS= line waits for buffer stats before using the last ones
DRIVER_STATES = ("starting", "running", "degraded", "stopped")
UPLINK_STATES = ("starting", "connecting", "online", "backoff", "stopped")


# ------------------------------------------------------------------------------ liveness


class Liveness:
    """Decides whether the pipeline still makes progress (for the watchdog and /healthz).

    Stalled means, for longer than `stall_timeout` seconds: events are queued for the buffer
    but none was committed, or a driver's pump is inside `pipeline.submit` and has not come
    out. Idle is not stalled: an NFC reader nobody taps is fine. `check()` samples; call it
    regularly (the watchdog does every WATCHDOG_USEC/2, /healthz on every request).
    """

    def __init__(self, clock: Clock, stall_timeout: float) -> None:
        self._clock = clock
        self._stall = stall_timeout
        self._buf: tuple[int, float] | None = None  # (last committed id, since)
        self._pumps: dict[str, tuple[int, float]] = {}  # driver -> (left count, since)
        self.lag_s = 0.0
        self.last_reason: str | None = None

    def note_lag(self, lag_s: float) -> None:
        """How late the last watchdog tick woke up (event-loop lag), seconds."""
        self.lag_s = lag_s

    def check(self, rt: Runtime) -> str | None:
        """None when healthy, else a short reason (no identifiers)."""
        now = self._clock.monotonic()
        reason = self._check_buffer(rt, now) or self._check_pumps(rt, now)
        self.last_reason = reason
        return reason

    def _check_buffer(self, rt: Runtime, now: float) -> str | None:
        committed, queued = rt.buffer.last_committed_id, rt.buffer.queued
        # a degraded buffer (disk full, I/O error) is alive and retrying: a restart would
        # lose its queue and cannot free space, so it is not a stall for the watchdog
        if self._buf is None or self._buf[0] != committed or queued == 0 or rt.buffer.degraded is not None:
            self._buf = (committed, now)
            return None
        idle = now - self._buf[1]
        if idle > self._stall:
            return f"buffer: {queued} events queued, nothing committed for {idle:.0f}s"
        return None

    def _check_pumps(self, rt: Runtime, now: float) -> str | None:
        for name, p in rt.pumps.items():
            seen = self._pumps.get(name)
            if seen is None or seen[0] != p.left or p.entered == p.left:
                self._pumps[name] = (p.left, now)
                continue
            stuck = now - seen[1]
            if stuck > self._stall:
                return f"pipeline: a reading from {name} has been in the pipeline for {stuck:.0f}s"
        return None


# ------------------------------------------------------------------------------ snapshot


@dataclass(slots=True, frozen=True)
class Snapshot:
    """Everything the metrics show, taken on the event loop at one moment."""

    device: str
    tenant: str
    store: str
    wall_ms: int
    synchronized: bool
    stats: BufferStats | None
    stats_fresh: bool
    pipeline: dict[str, Any]
    drivers: list[dict[str, Any]]
    components: dict[str, dict[str, Any]]
    reason: str | None
    lag_s: float
    ack_alarm: AckAlarm | None = None  # batches waiting without a valid ack (edge/ackwatch.py)
    analytics_reason: str | None = None  # store analytics not advancing (edge/analytics/)


async def buffer_stats(rt: Runtime, last: BufferStats | None = None) -> tuple[BufferStats | None, bool]:
    """(stats, fresh): the buffer's stats, or `last` when it does not answer within STATS_TIMEOUT."""
    try:
        return await bounded(rt.buffer.stats(), STATS_TIMEOUT), True
    except Exception as exc:  # a busy or failing buffer must not break a scrape or STATUS=
        log.debug("health_stats_unavailable", error=type(exc).__name__)
        return last, False


async def take_snapshot(rt: Runtime, liveness: Liveness, last: BufferStats | None = None) -> Snapshot:
    stats, fresh = await buffer_stats(rt, last)
    ident = rt.cfg.identity
    components = {c.name: c.status() for c in rt.components}
    return Snapshot(
        device=ident.device,
        tenant=ident.tenant,
        store=ident.store,
        wall_ms=rt.clock.wall_ms(),
        synchronized=rt.clock.synchronized(),
        stats=stats,
        stats_fresh=fresh,
        pipeline=rt.pipeline.status(),
        drivers=[d.status() for d in rt.drivers],
        components=components,
        reason=liveness.check(rt),
        lag_s=liveness.lag_s,
        ack_alarm=snapshot_ack_alarm(stats, components.get("uplink"), rt.clock.wall_ms(),
                                     rt.cfg.health.ack_timeout_alarm),
        analytics_reason=_analytics_reason(rt),
    )


def _analytics_reason(rt: Runtime) -> str | None:
    if rt.analytics is None:
        return None
    try:
        return rt.analytics.health_reason()
    except Exception as exc:  # a scrape must not fail over analytics
        log.debug("health_analytics_unavailable", error=type(exc).__name__)
        return "analytics: status unavailable"


def snapshot_ack_alarm(
    stats: BufferStats | None, uplink: dict[str, Any] | None, now_ms: int, threshold_s: float
) -> AckAlarm | None:
    """The ack alarm from live buffer stats and the uplink's status (None without an uplink)."""
    if stats is None or uplink is None:
        return None
    return ack_alarm(pending=stats.batches_pending, oldest_pending_ms=stats.oldest_pending_sealed_ms,
                     last_ack_ms=stats.last_ack_ms, refused=refused_acks(uplink), now_ms=now_ms,
                     threshold_s=threshold_s)


def _age_s(now_ms: int, then_ms: int | None) -> float | None:
    return None if then_ms is None else max(0.0, (now_ms - then_ms) / 1000)


async def describe(rt: Runtime) -> str:
    """The one-line STATUS= text: backlog, oldest unsent, uplink, drivers, clock."""
    stats, _ = await buffer_stats(rt)
    parts = []
    if stats is None:
        parts.append("backlog unknown (buffer busy)")
    else:
        events = sum(b.events for b in stats.backlog.values())
        size = sum(b.bytes for b in stats.backlog.values())
        text = f"backlog {events} events ({format_size(size)})"
        oldest = _age_s(rt.clock.wall_ms(), stats.oldest_unsent_ts)
        if oldest is not None:
            text += f", oldest {format_duration(oldest)}"
        if stats.batches_pending:
            text += f", {stats.batches_pending} batches unacked"
        parts.append(text)
        if stats.degraded:
            parts.append("buffer DEGRADED")
    up = next((c for c in rt.components if c.name == "uplink"), None)
    parts.append(f"uplink {up.status().get('state', '?')}" if up is not None else "uplink disabled")
    running = sum(1 for d in rt.drivers if d.state == "running")
    drivers = f"drivers {running}/{len(rt.drivers)} running"
    degraded = [d.name for d in rt.drivers if d.state == "degraded"]
    if degraded:
        drivers += f" (degraded: {', '.join(degraded)})"
    parts.append(drivers)
    parts.append("clock synced" if rt.clock.synchronized() else "clock NOT synced")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ metrics


class EdgeCollector(Collector):
    """Prometheus metric families from the latest `Snapshot` (set before each scrape)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        if s is None:
            return []
        return list(self._families(s))

    def _families(self, s: Snapshot) -> Iterator[Metric]:
        yield InfoMetricFamily("edge", "store-edge build and identity",
                               value={"version": __version__, "device": s.device, "tenant": s.tenant,
                                      "store": s.store})
        yield GaugeMetricFamily("edge_clock_synchronized", "1 when the wall clock is NTP-synchronized "
                                "(kernel adjtimex); events captured otherwise carry clock=unsynced",
                                value=int(s.synchronized))
        yield GaugeMetricFamily("edge_healthy", "1 while the pipeline makes progress (what the "
                                "systemd watchdog pings on)", value=int(s.reason is None))
        yield GaugeMetricFamily("edge_loop_lag_seconds", "how late the last watchdog tick woke up",
                                value=s.lag_s)
        yield from _process()
        yield from self._buffer(s)
        yield from self._pipeline(s)
        yield from self._drivers(s)
        yield from self._uplink(s)
        yield from self._downlink(s)

    def _buffer(self, s: Snapshot) -> Iterator[Metric]:
        st = s.stats
        yield GaugeMetricFamily("edge_buffer_stats_fresh", "0 when the buffer did not answer in time and "
                                "the buffer metrics below are from an earlier scrape", value=int(s.stats_fresh))
        if st is None:
            return
        ev = GaugeMetricFamily("edge_buffer_events", "unsent (not yet sealed) events in the buffer",
                               labels=["source"])
        by = GaugeMetricFamily("edge_buffer_bytes", "bytes of unsent events in the buffer", labels=["source"])
        for src, b in sorted(st.backlog.items()):
            ev.add_metric([src], b.events)
            by.add_metric([src], b.bytes)
        yield ev
        yield by
        oldest = _age_s(s.wall_ms, st.oldest_unsent_ts)
        yield GaugeMetricFamily("edge_buffer_oldest_unsent_age_seconds", "age of the oldest unsent "
                                "event by its capture time (0 when none)", value=oldest or 0.0)
        bat = GaugeMetricFamily("edge_buffer_batches", "sealed batches not yet acknowledged", labels=["state"])
        bat.add_metric(["pending"], st.batches_pending)
        bat.add_metric(["quarantined"], st.batches_quarantined)
        yield bat
        bat_b = GaugeMetricFamily("edge_buffer_batches_bytes", "bytes of sealed batches", labels=["state"])
        bat_b.add_metric(["pending"], st.batches_pending_bytes)
        bat_b.add_metric(["quarantined"], st.batches_quarantined_bytes)
        yield bat_b
        yield GaugeMetricFamily("edge_buffer_queued_events", "events waiting for a commit", value=st.queued)
        yield GaugeMetricFamily("edge_buffer_degraded", "1 while commits fail (disk full, I/O error)",
                                value=int(st.degraded is not None))
        drops = CounterMetricFamily("edge_buffer_dropped_events", "events dropped by the buffer, by source "
                                    "(* for whole batches) and reason", labels=["source", "reason"])
        for key, n in sorted(st.drops.items()):
            src, _, reason = key.partition("/")
            drops.add_metric([src, reason], n)
        yield drops
        if st.last_ack_ms is not None:
            yield GaugeMetricFamily("edge_uplink_last_ack_age_seconds", "seconds since the last batch "
                                    "acknowledged by the cloud", value=_age_s(s.wall_ms, st.last_ack_ms) or 0.0)

    def _pipeline(self, s: Snapshot) -> Iterator[Metric]:
        fam = CounterMetricFamily("edge_pipeline_events", "readings through the pipeline by source: accepted "
                                  "into the buffer or rejected by a stage", labels=["source", "outcome"])
        for outcome in ("accepted", "rejected"):
            for src, n in sorted((s.pipeline.get(outcome) or {}).items()):
                fam.add_metric([src, outcome], n)
        yield fam

    def _drivers(self, s: Snapshot) -> Iterator[Metric]:
        labels = ["driver", "kind"]
        state = StateSetMetricFamily("edge_driver_state", "driver state", labels=labels)
        counters = {
            "readings": CounterMetricFamily("edge_driver_readings", "readings from the device", labels=labels),
            "errors": CounterMetricFamily("edge_driver_errors", "device failures", labels=labels),
            "restarts": CounterMetricFamily("edge_driver_restarts", "backend (scanner, reader, port) restarts "
                                            "after a failure", labels=labels),
        }
        for d in s.drivers:
            key = [str(d.get("name")), str(d.get("kind"))]
            state.add_metric(key, {st: d.get("state") == st for st in DRIVER_STATES})
            for name, fam in counters.items():
                fam.add_metric(key, float(d.get(name) or 0))
        yield state
        yield from counters.values()

    def _uplink(self, s: Snapshot) -> Iterator[Metric]:
        up = s.components.get("uplink")
        if up is None:
            return
        yield StateSetMetricFamily("edge_uplink_state", "uplink connection state",
                                   value={st: up.get("state") == st for st in UPLINK_STATES})
        yield GaugeMetricFamily("edge_uplink_inflight_batches", "batches published and awaiting their ack",
                                value=float(up.get("inflight") or 0))
        batches = CounterMetricFamily("edge_uplink_batches", "batches by outcome", labels=["outcome"])
        for outcome in ("published", "resent", "acked", "rejected"):
            batches.add_metric([outcome], float(up.get(outcome) or 0))
        yield batches
        yield CounterMetricFamily("edge_uplink_events_acked", "events in batches acknowledged by the cloud",
                                  value=float(up.get("events_acked") or 0))
        refused = CounterMetricFamily("edge_uplink_acks_refused", "acks that deleted nothing", labels=["reason"])
        for reason in ("forged", "unsigned", "unknown", "malformed"):
            refused.add_metric([reason], float(up.get(f"acks_{reason}") or 0))
        yield refused
        rejections = CounterMetricFamily("edge_uplink_rejections", "signed rejections by the cloud, by reason",
                                         labels=["reason"])
        for reason, n in sorted((up.get("rejections") or {}).items()):
            rejections.add_metric([reason], float(n))
        yield rejections
        yield GaugeMetricFamily("edge_uplink_unsigned_acks_trusted", "1 when acks are not verified (lab only)",
                                value=float(bool(up.get("unsigned_acks_trusted"))))
        yield CounterMetricFamily("edge_uplink_connects", "successful broker connections",
                                  value=float(up.get("connects") or 0))
        yield GaugeMetricFamily("edge_uplink_ack_alarm", "1 while sealed batches wait longer than "
                                "health.ack_timeout_alarm without a valid ack", value=int(s.ack_alarm is not None))


    def _downlink(self, s: Snapshot) -> Iterator[Metric]:
        dl = s.components.get("downlink")
        if dl is None:
            return
        yield CounterMetricFamily("edge_downlink_received", "messages received on the downlink topics",
                                  value=float(dl.get("received") or 0))
        acc = CounterMetricFamily("edge_downlink_accepted", "verified documents by kind", labels=["kind"])
        for kind, n in sorted((dl.get("accepted") or {}).items()):
            acc.add_metric([kind], float(n))
        yield acc
        drop = CounterMetricFamily("edge_downlink_dropped", "downlink messages dropped (never applied), by "
                                   "reason", labels=["reason"])
        for reason, n in sorted((dl.get("dropped") or {}).items()):
            drop.add_metric([reason], float(n))
        yield drop
        desired = dl.get("desired") or {}
        ver = GaugeMetricFamily("edge_downlink_layer_version", "desired config layer ver applied (0: none)",
                                labels=["layer"])
        for layer, v in sorted((desired.get("layers") or {}).items()):
            ver.add_metric([layer], float(v))
        yield ver
        outcomes = CounterMetricFamily("edge_downlink_desired", "desired layers by outcome in this run",
                                       labels=["outcome"])
        for outcome in ("applied", "rejected", "rolled_back", "stale"):
            outcomes.add_metric([outcome], float(desired.get(outcome) or 0))
        yield outcomes


def _process() -> Iterator[Metric]:
    """RSS, CPU and open files of this process, from /proc/self only (works with ProcSubset=pid)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        yield GaugeMetricFamily("edge_process_resident_memory_bytes", "resident memory of the daemon",
                                value=pages * os.sysconf("SC_PAGE_SIZE"))
    with contextlib.suppress(OSError):
        yield GaugeMetricFamily("edge_process_open_fds", "open file descriptors",
                                value=len(os.listdir("/proc/self/fd")))
    yield CounterMetricFamily("edge_process_cpu_seconds", "user + system CPU time of the daemon",
                              value=time.process_time())


def health_doc(s: Snapshot) -> dict[str, Any]:
    """The /healthz body: "ok"; "unhealthy" when the pipeline is stalled or the buffer cannot
    commit; "degraded" when only the ack alarm is up (data is kept but not delivered) or store
    analytics has stopped advancing (its ticker failing: events flow, the aggregates do not)."""
    reasons = [s.reason] if s.reason else []
    if s.stats is not None and s.stats.degraded:
        reasons.append("buffer degraded")
    status = "ok" if not reasons else "unhealthy"
    if s.ack_alarm is not None:
        reasons.append(f"uplink: {s.ack_alarm.reason}")
        status = "degraded" if status == "ok" else status
    if s.analytics_reason is not None:  # events still flow; the aggregates do not
        reasons.append(s.analytics_reason)
        status = "degraded" if status == "ok" else status
    up = s.components.get("uplink")
    return {
        "status": status,
        "reasons": reasons,
        "ack_alarm": s.ack_alarm.to_json() if s.ack_alarm is not None else None,
        "device": s.device,
        "version": __version__,
        "clock_synchronized": s.synchronized,
        "uplink": up.get("state") if up is not None else "disabled",
        "drivers": {str(d.get("name")): d.get("state") for d in s.drivers},
        "backlog_events": sum(b.events for b in s.stats.backlog.values()) if s.stats else None,
    }


# ------------------------------------------------------------------------------ server


def health_component(liveness: Liveness, config_path: str | None = None) -> Callable[[Runtime], HealthServer]:
    """A supervisor component factory for the health endpoint sharing `liveness` with the watchdog;
    `config_path` is shown on the store page as the config applied."""

    def factory(rt: Runtime) -> HealthServer:
        from edge.web.server import HealthServer  # aiohttp is imported only when the endpoint runs

        return HealthServer(rt, liveness, config_path)

    return factory
