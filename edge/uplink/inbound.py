"""A cap on inbound MQTT packets where the protocol has none (MQTT 3.1.1).

MQTT 5 lets the client announce a Maximum Packet Size in CONNECT and the broker never sends more
(edge/uplink/service.py does that). MQTT 3.1.1 has no such field: paho reads the fixed header,
then asks the socket for the whole remaining length at once and keeps appending until the packet
is complete, so one 200 MiB message on the ack topic took the daemon from 57 to 665 MiB
(scripts/bench_ack_flood.py, docs/benchmarks.md) before anything could look at it.

`cap_inbound(client, limit)` wraps the receive call of aiomqtt's paho client: once paho has decoded
a packet's remaining length, a packet longer than `limit` ends the connection (paho sees a lost
connection, the uplink reconnects with its usual backoff) instead of being read; reads are done in
chunks of at most `limit` bytes. paho exposes no hook for this, so the wrapper relies on two of
its internals (`_sock_recv` and the `_in_packet` dict, stable since paho 1.x); when they are not
there the cap is skipped with a warning and only the broker-side limit (Mosquitto
`max_packet_size`, NATS `max_payload`: docs/security.md) protects the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

log = structlog.get_logger("edge.uplink")


class InboundTooLarge(ConnectionAbortedError):
    """The broker started sending a packet above the inbound cap; the connection is dropped."""


def cap_inbound(client: aiomqtt.Client, limit: int, on_refused: Callable[[int], None] | None = None) -> bool:
    """Refuse inbound packets longer than `limit` bytes on `client`; False if paho lacks the hooks."""
    paho: Any = getattr(client, "_client", None)
    recv = getattr(paho, "_sock_recv", None)
    if recv is None or not isinstance(getattr(paho, "_in_packet", None), dict):
        log.warning("uplink_inbound_cap_unavailable", hint="set max_packet_size on the broker (docs/security.md)")
        return False

    def capped(bufsize: int) -> bytes:
        packet = paho._in_packet
        if packet.get("have_remaining") and packet.get("remaining_length", 0) > limit:
            size = int(packet["remaining_length"])
            if on_refused is not None:
                on_refused(size)
            raise InboundTooLarge(f"inbound packet of {size} bytes exceeds {limit}")
        data: bytes = recv(min(bufsize, limit))
        return data

    paho._sock_recv = capped
    return True


class InboundBytes:
    """A bound on the bytes aiomqtt holds between the socket and the uplink's consumer.

    aiomqtt queues received messages by count only (`max_queued_incoming_messages`); with the
    downlink's 4 MiB packets that is up to count x 4 MiB (1024 x 4 MiB = 4 GiB) while the consumer
    awaits. `install(client)` wraps aiomqtt's `on_message`: a message that would take the queued
    bytes above `limit` (or find the count queue full) is dropped before it is queued, counted
    (`dropped`), and logged rate-limited; `taken(n)` is called by the consumer for each message it
    takes off. QoS 1 messages dropped here were already acknowledged by paho: retained documents
    come again on the next subscribe, commands are re-sent by the cloud (downlink-v1)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0
        self.dropped = 0

    def install(self, client: aiomqtt.Client) -> bool:
        paho: Any = getattr(client, "_client", None)
        original = getattr(client, "_on_message", None)
        queue: Any = getattr(client, "_queue", None)
        if paho is None or original is None or queue is None:
            log.warning("uplink_inbound_bytes_bound_unavailable")
            return False
        self.queued = 0  # a new session's queue is empty

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            size = len(message.payload or b"")
            if queue.full() or self.queued + size > self.limit:
                self.dropped += 1
                if self.dropped <= 10 or self.dropped % 1000 == 0:
                    log.warning("uplink_inbound_dropped", reason="queue-full", size=size, queued=self.queued,
                                max_bytes=self.limit, count=self.dropped)  # fmt: skip
                return
            self.queued += size
            original(c, userdata, message)

        paho.on_message = on_message
        return True

    def taken(self, size: int) -> None:
        self.queued = max(0, self.queued - size)
