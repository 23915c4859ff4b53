"""The MQTT transport (aiomqtt): any broker, a plain or shared subscription to every device's batches.

Design. One client subscribes (QoS 1) to `{prefix}/+/+/+/batch`, as `$share/{group}/...` when a
shared group is configured so several receivers split the load. Messages are handled in groups
(whatever is queued, at most `max_group`): the handler returns after the store committed, then
the acks are published (QoS 1). The broker already has its PUBACK (paho sends it on receipt),
so there is nothing else to settle: a batch lost in a crash before the commit is resent by its
device, which deletes a batch only on our signed `ok` ack. Reconnects with jittered,
escalating backoff (1 s doubling to 30 s).

Bounds. Over MQTT 5 the client announces a Maximum Packet Size (`max_payload` plus topic and
header room), so a conforming broker never delivers a larger message; over 3.1.1 there is no
such field, and the broker's own limit (mosquitto `message_size_limit`, NATS `max_payload`)
should be set (docs/security-receiver.md); the core refuses an oversized payload unread either way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

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


class MqttTransport:
    """`Transport` over one aiomqtt client (see the module doc)."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self._cfg = cfg
        self._ready = asyncio.Event()

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
            cfg.host, cfg.port, identifier=cfg.client_id, protocol=proto, tls_params=tls,
            keepalive=cfg.keepalive, socket_options=NO_DELAY, properties=props,
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
                while len(messages) and len(group) < self._cfg.max_group:
                    group.append(await anext(messages))
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
