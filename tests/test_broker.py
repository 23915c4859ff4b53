"""edge.uplink.broker.EmbeddedBroker: the amqtt broker `edge demo` starts, exercised with aiomqtt.

Also pins what the docstring promises about amqtt's limits (no MQTT 5, no shared subscriptions), so
an amqtt upgrade that changes them is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiomqtt
import pytest
from support.mosquitto import free_port

from edge.uplink.broker import EmbeddedBroker


async def receive(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes, bool]]:
    """Messages arriving within `seconds`: (topic, payload, retain)."""
    got: list[tuple[str, bytes, bool]] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.append((str(message.topic), message.payload, message.retain))
    except TimeoutError:
        pass
    return got


def client(broker: EmbeddedBroker, name: str, *, max_inflight_messages: int | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, identifier=name, timeout=5,
                          max_inflight_messages=max_inflight_messages)


async def test_free_port_on_loopback_and_url() -> None:
    """Without a port the broker takes a free one on 127.0.0.1 and reports it in `url`."""
    async with EmbeddedBroker() as broker:
        assert broker.host == "127.0.0.1"
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()


async def test_given_port_is_used_and_released_on_exit() -> None:
    """An explicit port is honoured; after the block the port refuses connections and can be reused."""
    port = free_port()
    async with EmbeddedBroker(port=port) as broker:
        assert broker.port == port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    async with EmbeddedBroker(port=port) as again:
        assert again.port == port


async def test_qos1_messages_reach_a_subscriber_in_order() -> None:
    """QoS 1 publishes with many in flight are all acknowledged and delivered, in order."""
    async with EmbeddedBroker() as broker, client(broker, "sub") as sub, \
            client(broker, "pub", max_inflight_messages=100) as pub:
        await sub.subscribe("edge/v1/t/s/d/batch", qos=1)
        payloads = [i.to_bytes(2, "big") * 1000 for i in range(200)]
        await asyncio.gather(*(pub.publish("edge/v1/t/s/d/batch", p, qos=1) for p in payloads))
        received = []
        async with asyncio.timeout(10):
            async for message in sub.messages:
                received.append(message.payload)
                if len(received) == len(payloads):
                    break
    assert received == payloads


async def test_retained_message_goes_to_later_subscribers_only() -> None:
    """A retained status reaches a client that subscribes later, and no client that did not subscribe."""
    async with EmbeddedBroker() as broker:
        async with client(broker, "edge") as edge:
            await edge.publish("edge/v1/t/s/d/status", b'{"state": "online"}', qos=1, retain=True)
        async with client(broker, "watcher") as watcher:
            await watcher.subscribe("edge/v1/+/+/+/status", qos=1)
            assert await receive(watcher, 0.5) == [("edge/v1/t/s/d/status", b'{"state": "online"}', True)]
            async with client(broker, "bystander") as bystander:  # connects while watcher's filter exists
                await bystander.subscribe("edge/v1/t/s/d/ack", qos=1)
                assert await receive(bystander, 0.5) == []


async def test_mqtt5_clients_are_refused() -> None:
    """amqtt speaks MQTT 3.1.1 only: an MQTT 5 CONNECT gets 'unsupported protocol version'."""
    async with EmbeddedBroker() as broker:
        v5 = aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5)
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)protocol version"):
            async with v5:
                pass


async def test_shared_subscriptions_are_not_supported() -> None:
    """`$share/group/filter` is granted but matches nothing; the demo must use plain subscriptions."""
    async with EmbeddedBroker() as broker, client(broker, "a") as member, client(broker, "p") as pub:
        await member.subscribe("$share/cloud/edge/v1/+/+/+/batch", qos=1)
        await pub.publish("edge/v1/t/s/d/batch", b"b", qos=1)
        assert await receive(member, 0.5) == []


async def test_broker_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt's own loggers are at WARNING: a normal session logs nothing from them."""
    caplog.set_level(logging.DEBUG)
    async with EmbeddedBroker() as broker, client(broker, "c") as c:
        await c.subscribe("x/y", qos=1)
        await c.publish("x/y", b"1", qos=1)
        await receive(c, 0.2)
    noisy = [r for r in caplog.records if r.name.startswith(("amqtt", "transitions"))]
    assert noisy == []
