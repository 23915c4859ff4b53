"""The NATS JetStream transport behind the ingest core's `Transport` seam (cloud/transport.py).

Every worker binds to the one durable pull consumer `ingest` of EDGE_BATCHES and fetches up to
`max_group` batches at a time: one group, one store transaction. After the handler returned (so
after the commit) it publishes the signed device acks on `{p}.{t}.{s}.{d}.ack` (NATS delivers
them to the devices' MQTT subscriptions), flushes them, and only then acks every message of the
group to JetStream. A group whose commit failed is nak'ed with a delay, so JetStream hands it
again (to any worker) once the database is back; a handler that raised settles nothing and
JetStream redelivers after AckWait. Batches the core answered with nothing (deferred) are acked
too: the device keeps them and resends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from cloud.cluster.jetstream import BATCH_CONSUMER, BATCH_STREAM
from cloud.transport import Handler, Inbound

log = structlog.get_logger()
NAK_DELAY = 2.0  # s before a group whose commit failed is offered again


def subject_to_topic(subject: str) -> str:
    return subject.replace(".", "/")


def topic_to_subject(topic: str) -> str:
    return topic.replace("/", ".")


class JetStreamTransport:
    """Pulls groups from the shared durable consumer on an already connected NATS client."""

    def __init__(self, nc: NATS, *, max_group: int = 64, fetch_wait: float = 1.0,
                 stream: str = BATCH_STREAM, consumer: str = BATCH_CONSUMER) -> None:
        self._nc = nc
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
                except (APIError, ConnectionClosedError) as exc:  # a node died: the client reconnects
                    log.warning("jetstream_fetch_failed", error=str(exc)[:200])
                    await asyncio.sleep(0.5)
                    continue
                await self._group(msgs, handler)
        finally:
            self._ready.clear()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _group(self, msgs: Sequence[Msg], handler: Handler) -> None:
        items = [Inbound(subject_to_topic(m.subject), m.data, token=m) for m in msgs]
        try:
            settlement = await handler(items)
        except Exception:
            log.exception("ingest_handler_failed", batches=len(items))
            return  # settle nothing: redelivered after AckWait
        if not settlement.committed:
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.nak(delay=NAK_DELAY)
            return
        for ack in settlement.acks:
            await self._nc.publish(topic_to_subject(ack.topic), ack.payload)
        await self._nc.flush()
        for m in msgs:
            with contextlib.suppress(Exception):  # a lost ack means a redelivery, a duplicate
                await m.ack()
