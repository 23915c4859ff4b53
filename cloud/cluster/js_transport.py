"""The NATS JetStream transport behind the ingest core's `Transport` seam (cloud/transport.py).

Every worker binds to the one durable pull consumer `ingest` of EDGE_BATCHES and fetches up to
`max_group` batches at a time: one group, one store transaction. After the handler returned (so
after the commit) it publishes the signed device acks on `{p}.{t}.{s}.{d}.ack` (NATS delivers
them to the devices' MQTT subscriptions), flushes them, and only then acks every message of the
group to JetStream. A group whose commit failed is nak'ed with a delay, so JetStream hands it
again (to any worker) once the database is back; a handler that raised settles nothing and
JetStream redelivers after AckWait. Batches the core answered with nothing (deferred) are acked
too: the device keeps them and resends.

After a failed group (commit failed, handler raised) the transport stops fetching for a
jittered, doubling delay (`backoff`), so a database outage costs one attempt every few seconds,
not a redelivery storm; the first group that commits resets it. Device acks that cannot be
flushed (NATS reconnecting) leave the group unacked at JetStream: it comes back, is found stored,
and is acked again. `observe(batches, seconds, committed)` is told about every settled group.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from cloud.cluster.jetstream import BATCH_CONSUMER, BATCH_STREAM
from cloud.transport import Handler, Inbound

log = structlog.get_logger()
NAK_DELAY = 2.0  # s before a group whose commit failed is offered again
Observer = Callable[[int, float, bool], None]  # (batches, seconds from fetch to settled, committed)


@dataclass(slots=True)
class Backoff:
    """Jittered, doubling delay between attempts after failures; `reset()` after a success."""

    initial: float = 0.5
    max: float = 5.0
    _next: float = 0.0

    def delay(self) -> float:
        self._next = min(self.max, self._next * 2 if self._next else self.initial)
        return self._next * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self._next = 0.0

    @property
    def failing(self) -> bool:
        return self._next > 0


def subject_to_topic(subject: str) -> str:
    return subject.replace(".", "/")


def topic_to_subject(topic: str) -> str:
    return topic.replace("/", ".")


class JetStreamTransport:
    """Pulls groups from the shared durable consumer on an already connected NATS client."""

    def __init__(self, nc: NATS, *, max_group: int = 64, fetch_wait: float = 1.0,
                 stream: str = BATCH_STREAM, consumer: str = BATCH_CONSUMER, backoff: Backoff | None = None,
                 observe: Observer | None = None) -> None:  # fmt: skip
        self._nc = nc
        self._backoff = backoff or Backoff()
        self._observe = observe
        self._max_group = max_group
        self._fetch_wait = fetch_wait
        self._stream = stream
        self._consumer = consumer
        self._ready = asyncio.Event()

    @property
    def ready(self) -> asyncio.Event:
        return self._ready

    async def run(self, stop: asyncio.Event, handler: Handler) -> None:
        sub = await self._nc.jetstream().pull_subscribe_bind(self._consumer, stream=self._stream)
        self._ready.set()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self._max_group, timeout=self._fetch_wait)
                except (TimeoutError, NatsTimeout):
                    continue
                except (APIError, NatsError) as exc:  # a node died, or reconnecting: the client reconnects
                    log.warning("jetstream_fetch_failed", error=str(exc)[:200])
                    await _sleep_unless(stop, 0.5)
                    continue
                started = time.monotonic()
                ok = await self._group(msgs, handler)
                if self._observe is not None:
                    self._observe(len(msgs), time.monotonic() - started, ok)
                if ok:
                    self._backoff.reset()
                else:  # the store is failing: do not fetch (and fail) again at once
                    await _sleep_unless(stop, self._backoff.delay())
        finally:
            self._ready.clear()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _group(self, msgs: Sequence[Msg], handler: Handler) -> bool:
        """Handle and settle one group; False when it was not committed (or not settled)."""
        items = [Inbound(subject_to_topic(m.subject), m.data, token=m) for m in msgs]
        try:
            settlement = await handler(items)
        except Exception:
            log.exception("ingest_handler_failed", batches=len(items))
            return False  # settle nothing: redelivered after AckWait
        if not settlement.committed:
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.nak(delay=NAK_DELAY)
            return False
        try:
            for ack in settlement.acks:
                await self._nc.publish(topic_to_subject(ack.topic), ack.payload)
            await self._nc.flush()
        except (NatsError, TimeoutError) as exc:
            # stored, but the device acks may not have left: leave the group to AckWait; it comes
            # back, is found stored, and its devices are answered then
            log.warning("device_acks_not_flushed", batches=len(msgs), error=str(exc)[:200])
            return True
        for m in msgs:
            with contextlib.suppress(Exception):  # a lost ack means a redelivery, a duplicate
                await m.ack()
        return True


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
