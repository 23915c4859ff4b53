"""The distributed engine on real processes: a 3-node NATS cluster with JetStream and MQTT.

What must hold: MQTT 3.1.1 publishes of a store's devices land in the batch stream replicated on
3 nodes; a store's credentials cannot publish as another store nor read its acks; the death of a
node (kill -9) loses nothing the stream holds and the shared consumer keeps delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiomqtt
import nats
import pytest
from nats.js.api import StreamInfo
from support.nats import RunningNats

pytestmark = pytest.mark.cloud


def _mqtt(cluster: RunningNats, user: str, client_id: str, node: int = 0, wait: float = 10) -> aiomqtt.Client:
    n = cluster.nats.nodes[node]
    return aiomqtt.Client(n.host, n.mqtt_port, username=user, password=cluster.password(user), identifier=client_id,
                          protocol=aiomqtt.ProtocolVersion.V311, clean_session=True, timeout=wait)


async def _stream_count(cluster: RunningNats, subject: str) -> int:
    nc = await cluster.connect()
    try:
        info: StreamInfo = await nc.jetstream().stream_info("EDGE_BATCHES", subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def _eventually_count(cluster: RunningNats, subject: str, want: int) -> int:
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        got = await _stream_count(cluster, subject)
        if got >= want or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.1)


async def test_streams_are_r3_file_work_queue_with_one_shared_consumer(nats_cluster: RunningNats) -> None:
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream()
        info = await js.stream_info("EDGE_BATCHES")
        assert info.config.subjects == ["edge.v1.*.*.*.batch"]
        assert info.config.num_replicas == 3
        assert str(info.config.storage) in ("StorageType.FILE", "file")
        assert str(info.config.retention) in ("RetentionPolicy.WORK_QUEUE", "workqueue")
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2
        consumer = await js.consumer_info("EDGE_BATCHES", "ingest")
        assert consumer.config.durable_name == "ingest"
        assert consumer.config.ack_wait == 30.0
        assert consumer.config.max_deliver == 50
        control = await js.stream_info("EDGE_CONTROL")
        assert sorted(control.config.subjects or []) == sorted(
            ["edge.v1.*.*.*.status", "edge.v1.*.*.*.reported", "edge.v1.*.*.*.cmd-result", "edge.v1.*.*.*.enroll"])
    finally:
        await nc.close()


async def test_mqtt_311_batches_on_any_node_land_in_the_r3_stream(nats_cluster: RunningNats) -> None:
    for node in range(3):
        async with _mqtt(nats_cluster, "t-a.s-a", f"t-a-s-a-land-{node}", node=node) as client:
            for i in range(5):
                await client.publish(f"edge/v1/t-a/s-a/land-{node}/batch", f"batch {i}".encode(), qos=1)
    for node in range(3):
        assert await _eventually_count(nats_cluster, f"edge.v1.t-a.s-a.land-{node}.batch", 5) == 5


async def test_status_is_captured_in_the_control_stream(nats_cluster: RunningNats) -> None:
    async with _mqtt(nats_cluster, "t-a.s-a", "t-a-s-a-status") as client:
        await client.publish("edge/v1/t-a/s-a/status-dev/status", json.dumps({"state": "online"}).encode(),
                             qos=1, retain=True)
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream()
        for _ in range(100):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_last_msg("EDGE_CONTROL", "edge.v1.t-a.s-a.status-dev.status")
                assert json.loads(msg.data or b"") == {"state": "online"}
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("status never reached EDGE_CONTROL")
    finally:
        await nc.close()


async def test_a_store_cannot_publish_as_another_store(nats_cluster: RunningNats) -> None:
    async with _mqtt(nats_cluster, "t-a.s-a", "t-a-s-a-forger") as client:
        # NATS drops a publish violation silently (MQTT 3.1.1 has no negative PUBACK); nothing lands
        await client.publish("edge/v1/t-a/s-b/victim/batch", b"forged", qos=1)
        await client.publish("edge/v1/t-b/s-a/victim/batch", b"forged", qos=1)
        await client.publish("edge/v1/t-a/s-a/forger/batch", b"own", qos=1)  # its own subtree still works
    assert await _eventually_count(nats_cluster, "edge.v1.t-a.s-a.forger.batch", 1) == 1
    await asyncio.sleep(0.5)
    assert await _stream_count(nats_cluster, "edge.v1.t-a.s-b.victim.batch") == 0
    assert await _stream_count(nats_cluster, "edge.v1.t-b.s-a.victim.batch") == 0


async def test_a_store_cannot_publish_downlink_kinds_nor_read_another_stores_acks(nats_cluster: RunningNats) -> None:
    got: list[str] = []
    async with (_mqtt(nats_cluster, "t-a.s-a", "t-a-s-a-reader") as a,
                _mqtt(nats_cluster, "t-a.s-b", "t-a-s-b-owner") as b):
        await a.subscribe("edge/v1/t-a/s-b/owner/ack", qos=1)
        await a.subscribe("edge/v1/t-a/s-a/reader/ack", qos=1)
        await b.subscribe("edge/v1/t-a/s-b/owner/ack", qos=1)
        # a store cannot forge acks or desired state for itself either
        await a.publish("edge/v1/t-a/s-a/reader/ack", b"self-ack", qos=1)
        await a.publish("edge/v1/t-a/s-a/_all/desired", b"self-desired", qos=1)
        nc = await nats_cluster.connect("worker")
        try:
            await nc.publish("edge.v1.t-a.s-b.owner.ack", b"ack for B")
            await nc.publish("edge.v1.t-a.s-a.reader.ack", b"ack for A")
            await nc.flush()
        finally:
            await nc.close()

        async def collect(client: aiomqtt.Client, name: str) -> None:
            async for message in client.messages:
                got.append(f"{name}:{message.topic}:{message.payload!r}")

        tasks = [asyncio.create_task(collect(a, "A")), asyncio.create_task(collect(b, "B"))]
        await asyncio.sleep(1.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(got) == ["A:edge/v1/t-a/s-a/reader/ack:b'ack for A'", "B:edge/v1/t-a/s-b/owner/ack:b'ack for B'"]


# nats-py leaves the socket of a killed server unclosed while it reconnects (not ours to fix)
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
@pytest.mark.filterwarnings("ignore:Exception ignored in.*StreamWriter:pytest.PytestUnraisableExceptionWarning")
async def test_kill_9_of_a_node_while_publishing_loses_nothing_and_the_consumer_keeps_delivering(
    nats_cluster: RunningNats,
) -> None:
    """A follower of the stream dies mid-load: every MQTT publish via a live node is in the stream
    (a publish left without PUBACK is resent, as a device does); then the stream leader dies too
    (after the follower is back): the shared durable
    consumer still delivers every message to a worker (at least once: an ack lost with the leader
    means a redelivery, which the database's dedupe row absorbs)."""
    nc = await nats_cluster.connect(max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    info = await js.stream_info("EDGE_BATCHES")
    assert info.cluster is not None
    leader = info.cluster.leader
    nodes = nats_cluster.nats.nodes
    follower = next(n for n in nodes if n.name != leader)
    entry = next(n for n in nodes if n.name not in (leader, follower.name))
    total = 300
    # As a device does: a publish whose PUBACK does not come (NATS may never PUBACK a QoS 1 message
    # whose store raced a leader change of its MQTT streams) is published again on a new
    # connection. Resends may duplicate; the database's dedupe absorbs them, nothing may be lost.
    i = 0
    try:
        while i < total:
            try:
                async with _mqtt(nats_cluster, "t-a.s-a", "t-a-s-a-crash", node=nodes.index(entry)) as client:
                    while i < total:
                        if i == total // 3 and nats_cluster.nats.running(follower):
                            nats_cluster.nats.kill(follower)
                        await client.publish("edge/v1/t-a/s-a/crash/batch", f"{i}".encode(), qos=1)
                        i += 1
            except aiomqtt.MqttError:
                continue
        assert await _eventually_count(nats_cluster, "edge.v1.t-a.s-a.crash.batch", total) >= total
    finally:
        nats_cluster.nats.start_node(follower)
    seen_in_stream = await _stream_count(nats_cluster, "edge.v1.t-a.s-a.crash.batch")

    # now the stream leader dies while a worker drains the shared consumer
    psub = await js.pull_subscribe_bind("ingest", stream="EDGE_BATCHES")
    seen: list[int] = []
    killed = False
    deadline = asyncio.get_running_loop().time() + 60
    while len(seen) < seen_in_stream and asyncio.get_running_loop().time() < deadline:
        try:
            msgs = await psub.fetch(50, timeout=2)
        except (nats.errors.TimeoutError, nats.js.errors.APIError, nats.errors.ConnectionClosedError):
            continue
        for m in msgs:
            if m.subject == "edge.v1.t-a.s-a.crash.batch":
                seen.append(int(m.data))
            with contextlib.suppress(nats.errors.Error):
                await m.ack_sync(timeout=5)
        if not killed and len(seen) >= total // 3:
            killed = True
            nats_cluster.nats.kill(next(n for n in nodes if n.name == leader))
    nats_cluster.nats.start_node(next(n for n in nodes if n.name == leader))
    await nc.close()
    assert sorted(set(seen)) == list(range(total))
