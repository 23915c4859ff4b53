"""The cloud side of fleet management (downlink-v1, issue 16) against a real NATS cluster and a
real PostgreSQL: signed retained layers a fresh MQTT 3.1.1 subscriber verifies, config set
validation with key paths and versions from PostgreSQL, commands and their results, consent
revocation (only the changed shard republished, stored events erased), the append-only audit
table, and the fleet view from stored status/reported documents."""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import urlsplit

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.nats import RunningNats

from cloud.fleet.publish import Broker, Publisher
from edge.wire.downlink import document, sign_document, verify_document
from edge.wire.uplink import kid_of, public_raw

pytestmark = pytest.mark.cloud

WAIT = 15.0
PREFIX = "edge/v1"


def admin_broker(cluster: RunningNats) -> Broker:
    return Broker(urls=cluster.nats.mqtt_urls, user="admin", password=cluster.password("admin"), prefix=PREFIX)


async def retained(cluster: RunningNats, topic: str, *, user: str = "t-a.s-a", quiet: float = 1.5) -> list[bytes]:
    """What a fresh MQTT 3.1.1 subscriber (a store's credential) receives on `topic` at once:
    the retained copies, collected until `quiet` seconds pass without one."""
    u = urlsplit(cluster.nats.mqtt_urls[0])
    got: list[bytes] = []
    async with aiomqtt.Client(u.hostname or "", u.port or 0, username=user, password=cluster.password(user),
                              identifier=f"t-{secrets.token_hex(4)}", protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    async with asyncio.timeout(quiet):
                        m = await anext(c.messages)
                    if m.retain and isinstance(m.payload, bytes):
                        got.append(m.payload)
        except TimeoutError:
            pass
    return got


async def test_a_layer_published_over_mqtt_is_retained_for_a_fresh_subscriber_and_verifies(
    nats_cluster: RunningNats,
) -> None:
    """The cloud publishes over MQTT 3.1.1 with retain: a device connecting later gets the document
    and verifies it. A NATS core publish on the subject form reaches no later MQTT subscriber
    (NATS keeps MQTT retained messages only from MQTT publishers): why the cloud speaks MQTT."""
    key = Ed25519PrivateKey.generate()
    kid = kid_of(public_raw(key.public_key()))
    tenant = "t-a"
    topic = "edge/v1/t-a/s-a/_all/desired"
    doc = sign_document(document("desired", tenant, "s-a", "_all", kid, 1, layer="store", ver=1,
                                 config={"logging": {"level": "debug"}}), key)
    async with Publisher(admin_broker(nats_cluster)) as pub:
        await pub.publish(topic, doc, retain=True)
    got = await retained(nats_cluster, topic)
    assert got == [doc]
    verified = verify_document(got[0], topic=topic, prefix=PREFIX, trusted={kid: key.public_key()})
    assert (verified.ver, verified.body["config"]) == (1, {"logging": {"level": "debug"}})

    core_topic = "edge/v1/t-a/s-b/_all/desired"
    nc = await nats_cluster.connect("admin")
    try:
        await nc.publish("edge.v1.t-a.s-b._all.desired", b"core publish")
        await nc.flush()
    finally:
        await nc.close()
    assert await retained(nats_cluster, core_topic, user="t-a.s-b", quiet=1.0) == []
