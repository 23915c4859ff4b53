"""End to end on real processes: device (MQTT 3.1.1) -> NATS cluster -> JetStream -> ingest worker
(ingest core + JetStream transport + PostgreSQL store) -> signed ack back to the device.

What must hold: every batch is stored once, in chain order, with its events; every device gets a
signed `ok` ack for every batch only after it is in PostgreSQL; resends are duplicates; the
JetStream stream is empty afterwards (work queue: acked after commit).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import psycopg
import pytest
from support.nats import RunningNats
from test_receiver import CLOUD, Device, cloud_key_file

from cloud.cluster.js_transport import JetStreamTransport
from cloud.config import ReceiverConfig
from cloud.db.migrate import migrate
from cloud.db.pg_store import PgStore
from cloud.receiver import Receiver
from edge.clock import FakeClock
from edge.wire.uplink import parse_ack, verify_ack

pytestmark = pytest.mark.cloud




async def test_device_batches_reach_postgresql_once_in_chain_order_with_signed_acks(
    nats_cluster: RunningNats, tmp_path: Path, pg_dsn: str,
) -> None:
    migrate(pg_dsn)
    keys = tmp_path / "keys"
    keys.mkdir()
    devices = [Device(f"e2e-{i}") for i in range(3)]
    for d in devices:
        d.ids = ("t-a", "s-a", d.ids[2])
        d.register(keys)
    cfg = ReceiverConfig(broker="mqtt://127.0.0.1:1", keys_dir=keys, db=tmp_path / "unused.db",
                         out=tmp_path / "unused.jsonl", cloud_key=cloud_key_file(tmp_path))
    nc = await nats_cluster.connect("worker")
    receiver = Receiver(cfg, clock=FakeClock(), store=PgStore(pg_dsn), transport=JetStreamTransport(nc, max_group=16))
    stop = asyncio.Event()
    worker = asyncio.create_task(receiver.run(stop))
    n_batches = 10
    acked: dict[str, set[int]] = {d.ids[2]: set() for d in devices}
    try:
        sealed = {d.ids[2]: [d.seal(n_events=4) for _ in range(n_batches)] for d in devices}
        topic = {d.ids[2]: d.topic.replace("acme/s001", "t-a/s-a") for d in devices}
        deadline = asyncio.get_running_loop().time() + 90
        # as a device does: publish what is not acked yet, wait for acks, resend the rest on a new
        # connection (right after a node restart the cluster may hold PUBACKs for a while)
        while any(len(s) < n_batches for s in acked.values()):
            assert asyncio.get_running_loop().time() < deadline, acked
            node = nats_cluster.nats.nodes[1]
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with aiomqtt.Client(node.host, node.mqtt_port, username="t-a.s-a",
                                          password=nats_cluster.password("t-a.s-a"), identifier="t-a-s-a-e2e",
                                          protocol=aiomqtt.ProtocolVersion.V311, timeout=10) as client:
                    for d in devices:
                        await client.subscribe(f"edge/v1/t-a/s-a/{d.ids[2]}/ack", qos=1)
                    for i in range(n_batches):
                        for dev, batches in sealed.items():
                            if i + 1 not in acked[dev]:
                                await client.publish(topic[dev], batches[i][2], qos=1)
                    await client.publish(topic["e2e-0"], sealed["e2e-0"][3][2], qos=1)  # a resend

                    async def collect(client: aiomqtt.Client) -> None:
                        async for m in client.messages:
                            dev = str(m.topic).split("/")[4]
                            ack = parse_ack(bytes(m.payload))
                            assert ack.ok
                            assert verify_ack(ack, tenant="t-a", store="s-a", device=dev, cloud_key=CLOUD.public_key())
                            acked[dev].add(ack.seq)
                            if all(len(s) == n_batches for s in acked.values()):
                                return

                    await asyncio.wait_for(collect(client), timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=15)
        await nc.close()
    assert all(s == set(range(1, n_batches + 1)) for s in acked.values())
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT device, string_agg(seq::text, ',' ORDER BY seq), bool_and(linked), count(*)"
                            " FROM batches GROUP BY device ORDER BY device").fetchall()
        assert rows == [(f"e2e-{i}", ",".join(str(s) for s in range(1, n_batches + 1)), True, n_batches)
                        for i in range(3)]
        assert conn.execute("SELECT count(*), count(DISTINCT (device, id)) FROM events").fetchone() == (120, 120)
    check = await nats_cluster.connect()
    try:
        info = await check.jetstream().stream_info("EDGE_BATCHES", subjects_filter="edge.v1.t-a.s-a.*.batch")
        assert not any(k.split(".")[4].startswith("e2e-") for k in (info.state.subjects or {}))
    finally:
        await check.close()
