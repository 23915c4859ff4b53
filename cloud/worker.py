"""One ingest worker: the ingest core over the PostgreSQL store, fed by the JetStream transport.

Design. `IngestWorker.run(stop)` is one consumer loop; the command (cloud/commands/ingest.py)
runs it beside other tasks (the lag poller, the metrics listener, later the control consumer)
on one NATS connection. Nothing here gives up: the NATS connection, the PostgreSQL store, the
registry and the consumer binding are retried forever with jittered, doubling delays
(`cfg.backoff`), each failure logged as one structured line, so a worker started before its
peers, or across an outage, simply waits and goes on.

Guarantees (see docs/cloud.md "What is exactly-once where"): a group is one PostgreSQL
transaction; the device acks and the JetStream acks leave only after its COMMIT; a group whose
commit failed is nak'ed and the transport backs off. `stop` (SIGTERM/SIGINT) ends the loop
after the group in hand is settled; a SIGKILL at any moment loses nothing (JetStream
redelivers what was not acked, PostgreSQL deduplicates what was committed but not acked).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS

from cloud.ack import AckSigner, DuplicateAcks
from cloud.chain import Deferrals
from cloud.cluster.jetstream import pending
from cloud.cluster.js_transport import Backoff, JetStreamTransport
from cloud.core import IngestCore
from cloud.db.keys import RegistryKeys
from cloud.db.pg_store import PgStore
from cloud.ingest_config import IngestConfig
from cloud.metrics import IngestMetrics
from cloud.transport import Inbound, Settlement
from edge.clock import Clock

log = structlog.get_logger()
T = TypeVar("T")


def _backoff(cfg: IngestConfig) -> Backoff:
    return Backoff(initial=cfg.backoff.initial, max=cfg.backoff.max)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def retry(stop: asyncio.Event, backoff: Backoff, what: str, attempt: Callable[[], Awaitable[T]],
                errors: tuple[type[BaseException], ...]) -> T | None:  # fmt: skip
    """`attempt()` until it succeeds (its result) or `stop` is set (None); every failure logged."""
    n = 0
    while not stop.is_set():
        try:
            got = await attempt()
        except errors as exc:
            n += 1
            delay = backoff.delay()
            log.warning("peer_unavailable", peer=what, attempt=n, retry_in=round(delay, 2), error=str(exc)[:200])
            await _sleep_unless(stop, delay)
            continue
        if n:
            log.info("peer_available", peer=what, after_attempts=n)
        backoff.reset()
        return got
    return None


def _tls_context(cfg: IngestConfig) -> ssl.SSLContext | None:
    t = cfg.nats.tls
    if t.ca_file is None and t.cert_file is None and not any(u.startswith("tls://") for u in cfg.nats.servers):
        return None
    ctx = ssl.create_default_context(cafile=str(t.ca_file) if t.ca_file else None)
    if t.cert_file is not None and t.key_file is not None:
        ctx.load_cert_chain(str(t.cert_file), str(t.key_file))
    return ctx


async def connect_nats(cfg: IngestConfig, password: str | None, metrics: IngestMetrics,
                       stop: asyncio.Event) -> NATS | None:  # fmt: skip
    """A NATS client that reconnects forever once connected; None when stopped before connecting."""

    async def disconnected() -> None:
        metrics.nats_connected.set(0)
        log.warning("nats_disconnected")

    async def reconnected() -> None:
        metrics.nats_connected.set(1)
        log.info("nats_reconnected", server=str(getattr(nc.connected_url, "netloc", "")).rpartition("@")[2])

    async def error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc)[:200])

    nc = NATS()
    tls = _tls_context(cfg)

    async def attempt() -> NATS:
        options: dict[str, Any] = {"tls": tls} if tls is not None else {}
        await nc.connect(servers=cfg.nats.servers, user=cfg.nats.user, password=password, name="edge-cloud-ingest",
                         connect_timeout=max(1, int(cfg.nats.connect_timeout)), allow_reconnect=True,
                         max_reconnect_attempts=-1, reconnect_time_wait=1, disconnected_cb=disconnected,
                         reconnected_cb=reconnected, error_cb=error, **options)  # fmt: skip
        return nc

    got = await retry(stop, _backoff(cfg), "nats", attempt, (OSError, TimeoutError, nats.errors.Error))
    if got is not None:
        metrics.nats_connected.set(1)
        log.info("nats_connected", servers=len(cfg.nats.servers), user=cfg.nats.user)
    return got


async def poll_lag(nc: NATS, cfg: IngestConfig, metrics: IngestMetrics, stop: asyncio.Event) -> None:
    """Keep the consumer-lag gauge current (one consumer-info request every `lag_interval`)."""
    gauge = metrics.lag.labels(stream=cfg.nats.stream, consumer=cfg.nats.consumer)
    failing = False
    while not stop.is_set():
        try:
            gauge.set(await asyncio.wait_for(pending(nc, cfg.nats.stream, cfg.nats.consumer), timeout=5))
            failing = False
        except (TimeoutError, nats.errors.Error) as exc:
            if not failing:
                log.warning("consumer_lag_unavailable", error=str(exc)[:200])
            failing = True
        await _sleep_unless(stop, cfg.metrics.lag_interval)


class IngestWorker:
    """One consumer loop of the shared durable consumer (see the module doc)."""

    def __init__(self, cfg: IngestConfig, *, nc: NATS, dsn: str, cloud_key: Ed25519PrivateKey, clock: Clock,
                 metrics: IngestMetrics) -> None:  # fmt: skip
        self._cfg = cfg
        self._nc = nc
        self._clock = clock
        self._metrics = metrics
        self._store = PgStore(dsn)
        self._keys = RegistryKeys(dsn, clock, refresh=cfg.key_refresh)
        self._core = IngestCore(store=self._store, keys=self._keys, signer=AckSigner(cloud_key, cfg.prefix),
                                limits=cfg.limits, prefix=cfg.prefix, clock=clock,
                                duplicate_acks=DuplicateAcks(cfg.duplicate_ack_interval),
                                deferrals=Deferrals(cfg.defer_max_resends, cfg.defer_max_age))  # fmt: skip

    def _open(self) -> None:
        self._store.open()
        self._keys.load()

    async def _handle(self, items: Sequence[Inbound]) -> Settlement:
        limit = self._cfg.limits.max_payload
        self._metrics.oversized.inc(sum(1 for i in items if len(i.payload) > limit))
        result = await asyncio.to_thread(self._core.process, items)
        self._metrics.observe_result(result)
        for name, kv in result.notes:
            log.warning(name, **kv)
        return Settlement(acks=result.acks, committed=result.committed)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; returns once the group in hand is settled."""
        cfg = self._cfg

        async def open_store() -> bool:
            await asyncio.to_thread(self._open)
            return True

        if await retry(stop, _backoff(cfg), "postgres", open_store, (psycopg.Error, OSError)) is None:
            return
        log.info("postgres_connected", device_keys=len(self._keys))
        transport = JetStreamTransport(self._nc, max_group=cfg.max_group, fetch_wait=cfg.fetch_wait,
                                       stream=cfg.nats.stream, consumer=cfg.nats.consumer, backoff=_backoff(cfg),
                                       observe=self._metrics.observe_group)  # fmt: skip
        bind_backoff = _backoff(cfg)
        self._metrics.ready.set_function(lambda: 1.0 if transport.ready.is_set() else 0.0)
        try:
            while not stop.is_set():
                log.info("ingest_consuming", stream=cfg.nats.stream, consumer=cfg.nats.consumer,
                         max_group=cfg.max_group)  # fmt: skip
                try:
                    await transport.run(stop, self._handle)
                except nats.errors.Error as exc:  # consumer missing, no responders while a node restarts
                    delay = bind_backoff.delay()
                    log.warning("consumer_unavailable", stream=cfg.nats.stream, consumer=cfg.nats.consumer,
                                retry_in=round(delay, 2), error=str(exc)[:200])  # fmt: skip
                    await _sleep_unless(stop, delay)
        finally:
            self._metrics.ready.set_function(lambda: 0.0)
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._store.close()
        self._keys.close()
