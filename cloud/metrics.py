"""Prometheus metrics of an ingest worker, served on `/metrics` by a small aiohttp listener.

Design. `prometheus_client` owns the metric types and the text exposition format (the
reference implementation; no format of our own); aiohttp serves it from the worker's own event
loop, so the listener starts and stops with the worker's other tasks and needs no thread. Each
worker has its own `CollectorRegistry` (no process-wide default registry): tests and a process
running several consumer loops stay independent. Counters are monotonic since the worker's start;
"per second" is PromQL's `rate(...)`.

Names (all prefixed `edge_cloud_ingest_`):

    consumer_lag                  gauge   batches not yet delivered + delivered, not acked (JetStream)
    batches_stored_total          counter batches committed to PostgreSQL
    events_stored_total           counter their events
    duplicates_total              counter batches already stored (acked ok again, not rewritten)
    rejected_total{reason}        counter every refusal, by uplink-v1 reason (answered or not)
    unauthenticated_total         counter of those, never answered (unparseable, unknown key, bad signature)
    oversized_total               counter of those, payloads above max_payload (refused `malformed`, unread)
    deferred_total                counter not answered yet (ambiguous against an unlinked held batch)
    commit_failures_total         counter groups whose PostgreSQL transaction failed (nak'ed, redelivered)
    errors_total                  counter messages or groups that failed inside the worker (logged)
    group_seconds                 histogram fetch returned -> group committed, device acks flushed, JetStream acked
    ready                         gauge   1 while subscribed to the consumer with the store open
    nats_connected                gauge   1 while the NATS client is connected

and of the control loop (cloud/control.py):

    edge_cloud_control_messages_total{kind,result}  counter every EDGE_CONTROL message, by kind
        (enroll, status, reported, cmd-result, other) and what became of it (enroll: accepted,
        repeated, token-used, token-expired, token-scope, bad-mac, rate-limited, malformed,
        bad-signature, ..., unavailable = left for a retry; others: counted; too-large, error)
"""

from __future__ import annotations

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cloud.core import GroupResult

log = structlog.get_logger()

NS = "edge_cloud_ingest"
GROUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class IngestMetrics:
    """The worker's metrics (see the module doc); `observe_result` after each group."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lag = Gauge(f"{NS}_consumer_lag", "JetStream consumer lag: pending + ack pending batches",
                         ["stream", "consumer"], registry=r)  # fmt: skip
        self.batches = Counter(f"{NS}_batches_stored", "Batches committed to PostgreSQL", registry=r)
        self.events = Counter(f"{NS}_events_stored", "Events committed to PostgreSQL", registry=r)
        self.duplicates = Counter(f"{NS}_duplicates", "Batches already stored (acked ok again)", registry=r)
        self.rejected = Counter(f"{NS}_rejected", "Batches refused, by uplink-v1 reason", ["reason"], registry=r)
        self.unauthenticated = Counter(f"{NS}_unauthenticated", "Refused input never answered (not authenticated)",
                                       registry=r)  # fmt: skip
        self.oversized = Counter(f"{NS}_oversized", "Payloads above max_payload (refused unread)", registry=r)
        self.deferred = Counter(f"{NS}_deferred", "Batches not answered yet (chain ambiguity)", registry=r)
        self.commit_failures = Counter(f"{NS}_commit_failures", "Groups whose PostgreSQL transaction failed",
                                       registry=r)  # fmt: skip
        self.errors = Counter(f"{NS}_errors", "Messages or groups that failed inside the worker", registry=r)
        self.group_seconds = Histogram(f"{NS}_group_seconds", "Fetch to settled (commit, device acks, JetStream acks)",
                                       buckets=GROUP_BUCKETS, registry=r)  # fmt: skip
        self.ready = Gauge(f"{NS}_ready", "1 while subscribed with the store open", registry=r)
        self.nats_connected = Gauge(f"{NS}_nats_connected", "1 while the NATS client is connected", registry=r)
        self.control = Counter("edge_cloud_control_messages", "EDGE_CONTROL messages by kind and result",
                               ["kind", "result"], registry=r)  # fmt: skip

    def observe_result(self, result: GroupResult) -> None:
        c = result.counts
        if not result.committed:
            self.commit_failures.inc()
        self.batches.inc(c["accepted"])
        self.events.inc(c["events"])
        self.duplicates.inc(c["duplicate"])
        self.unauthenticated.inc(c["unauthenticated"])
        self.deferred.inc(c["deferred"])
        self.errors.inc(c["errors"])
        for reason, n in result.rejected.items():
            self.rejected.labels(reason=reason[:32]).inc(n)

    def observe_group(self, batches: int, seconds: float, committed: bool) -> None:
        self.group_seconds.observe(seconds)

    def totals(self) -> dict[str, int]:
        """Batches and events stored since start (for the last log line)."""
        get = self.registry.get_sample_value
        return {"batches": int(get(f"{NS}_batches_stored_total") or 0),
                "events": int(get(f"{NS}_events_stored_total") or 0)}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """`GET /metrics` (Prometheus text format) on host:port; port 0 picks a free port (`port`)."""

    def __init__(self, metrics: IngestMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("metrics_listening", host=self._host, port=self.port, path="/metrics")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
