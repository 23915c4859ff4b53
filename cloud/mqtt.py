"""The MQTT transport (aiomqtt): any broker, a plain or shared subscription to every device's batches.

Design. One client subscribes (QoS 1) to `{prefix}/+/+/+/batch`, as `$share/{group}/...` when a
shared group is configured so several receivers split the load. Messages are handled in groups
(whatever is queued, at most `max_group`): the handler returns after the store committed, then
the acks are published (QoS 1). The broker already has its PUBACK (paho sends it on receipt),
so there is nothing else to settle: a batch lost in a crash before the commit is resent by its
device, which deletes a batch only on our signed `ok` ack. Reconnects with jittered,
escalating backoff (1 s doubling to 30 s).

Bounds. Received messages wait in aiomqtt's queue, capped at `max_queued` messages and
`max_queued_bytes` payload bytes (`Inbox`): beyond either, a message is dropped, counted
(`dropped`) and logged; paho has already sent its PUBACK, so the broker forgets it, but its
device got no ack and resends it later. A group takes at most `max_group` messages and
`max_group_bytes` payload bytes (always at least one message).

Message size. Over MQTT 5 the client announces a Maximum Packet Size (`max_payload` plus topic
and header room), so a conforming broker never delivers a larger message. MQTT 3.1.1 has no
such field: the operator MUST set the broker's own limit (Mosquitto `max_packet_size`, or the
older `message_size_limit`; NATS `max_payload`) to about `max_payload` (docs/security.md, "The receiver"),
or one message can be as large as the broker allows; the core refuses an oversized payload
unread either way, but by then the client has read it into memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud.config import ReceiverConfig
from cloud.transport import Handler, Inbound
from edge.aio import wait_event
from edge.uplink.connect import NO_DELAY
from edge.wire.uplink import batch_filter

log = structlog.get_logger()
PACKET_SLACK = 64 * 1024  # topic, properties and fixed header around a payload


def _not_queue_full(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Message queue is full")  # counted and logged by Inbox


CLIENT_LOG = logging.getLogger("cloud.mqtt.client")  # aiomqtt's, without its line per dropped message
CLIENT_LOG.addFilter(_not_queue_full)


def payload_size(m: aiomqtt.Message) -> int:
    return len(m.payload) if isinstance(m.payload, bytes | bytearray) else 0


@dataclass(slots=True)
class InboxStats:
    dropped: int = 0  # messages dropped because the queue was full (count or bytes)
    dropped_bytes: int = 0


def inbox_type(max_bytes: int, stats: InboxStats) -> type[asyncio.Queue[aiomqtt.Message]]:
    """An asyncio.Queue class (aiomqtt's `queue_type`) that also caps the payload bytes it holds.

    aiomqtt calls `put_nowait` from paho's callback and drops the message on QueueFull; this
    counts every drop. A message larger than `max_bytes` still enters an empty queue, so one
    big (but allowed) message cannot wedge the receiver."""

    class Inbox(asyncio.Queue[aiomqtt.Message]):
        held = 0  # payload bytes queued

        def put_nowait(self, item: aiomqtt.Message) -> None:
            size = payload_size(item)
            if self.held + size > max_bytes and not self.empty():
                self._drop(size)
            try:
                super().put_nowait(item)
            except asyncio.QueueFull:
                self._drop(size)
            self.held += size

        def get_nowait(self) -> aiomqtt.Message:
            item = super().get_nowait()
            self.held -= payload_size(item)
            return item

        def _drop(self, size: int) -> None:
            stats.dropped += 1
            stats.dropped_bytes += size
            if stats.dropped & (stats.dropped - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a flood logs little
                log.warning("receiver_queue_full", dropped=stats.dropped, queued=self.qsize(),
                            queued_bytes=self.held, hint="not acked, the devices resend; raise max_queued(_bytes) "
                            "or add receivers")  # fmt: skip
            raise asyncio.QueueFull

    return Inbox


class MqttTransport:
    """`Transport` over one aiomqtt client (see the module doc)."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self._cfg = cfg
        self._ready = asyncio.Event()
        self.inbox = InboxStats()

    @property
    def ready(self) -> asyncio.Event:
        return self._ready

    def _client(self) -> aiomqtt.Client:
        cfg = self._cfg
        tls = None
        if cfg.use_tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            )
        props = None
        proto = aiomqtt.ProtocolVersion.V311
        if cfg.protocol == "5":
            proto = aiomqtt.ProtocolVersion.V5
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho has no annotation here
            props.MaximumPacketSize = cfg.limits.max_payload + PACKET_SLACK
        return aiomqtt.Client(
            cfg.host, cfg.port, identifier=cfg.client_id, protocol=proto, tls_params=tls, logger=CLIENT_LOG,
            keepalive=cfg.keepalive, socket_options=NO_DELAY, properties=props,
            max_queued_incoming_messages=cfg.max_queued, queue_type=inbox_type(cfg.max_queued_bytes, self.inbox),
        )  # fmt: skip

    async def run(self, stop: asyncio.Event, handler: Handler) -> None:
        cfg = self._cfg
        topic_filter = batch_filter(cfg.prefix, cfg.shared_group)
        delay = 1.0
        try:
            while not stop.is_set():
                try:
                    async with self._client() as client:
                        client.pending_calls_threshold = 4 * cfg.max_group  # acks go out in bursts
                        await client.subscribe(topic_filter, qos=1)
                        log.info("receiver_subscribed", broker=f"{cfg.host}:{cfg.port}", topic=topic_filter)
                        self._ready.set()
                        delay = 1.0
                        await self._pump(client, stop, handler)
                except aiomqtt.MqttError as exc:
                    self._ready.clear()
                    wait = delay * random.uniform(0.5, 1.0)
                    log.warning("receiver_disconnected", error=str(exc), retry_in=round(wait, 2))
                    await wait_event(stop, wait)
                    delay = min(delay * 2, 30.0)
        finally:
            self._ready.clear()
            if self.inbox.dropped:
                log.warning("receiver_dropped_total", dropped=self.inbox.dropped,
                            dropped_bytes=self.inbox.dropped_bytes)  # fmt: skip

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event, handler: Handler) -> None:
        messages = client.messages
        stopped = asyncio.create_task(stop.wait(), name="receiver-stop")
        try:
            while True:
                nxt = asyncio.create_task(anext(messages), name="receiver-next")
                done, _ = await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                group = [nxt.result()]
                size = payload_size(group[0])
                while len(messages) and len(group) < self._cfg.max_group:
                    m = await anext(messages)  # queued: returns at once
                    group.append(m)
                    size += payload_size(m)
                    if size >= self._cfg.max_group_bytes:
                        break
                items: Sequence[Inbound] = [
                    Inbound(m.topic.value, bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b"")
                    for m in group
                ]
                work = asyncio.ensure_future(handler(items))
                try:
                    settled = await asyncio.shield(work)
                except asyncio.CancelledError:
                    await asyncio.wait({work})  # the handler uses the store the receiver is about to close
                    raise
                except Exception:
                    log.exception("receiver_group_failed", batches=len(items))
                    continue
                await asyncio.gather(*(client.publish(a.topic, a.payload, qos=1) for a in settled.acks))
        finally:
            stopped.cancel()
