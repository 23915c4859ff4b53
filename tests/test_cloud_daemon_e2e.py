"""The whole chain on real processes: a real edge daemon (`edge run`, simulated drivers) whose
uplink speaks MQTT 3.1.1 to one node of a real 3-node NATS cluster with its store's credentials;
a real ingest worker (`edge-cloud ingest`) storing into a real PostgreSQL.

What must hold when the NATS node the edge is connected to is killed (-9) during load and comes
back: every event the edge generated is in PostgreSQL exactly once (the edge's own buffer is
the truth: nothing is left unsent, its acked count equals what is stored, and its event ids
1..n are all there), every epoch's batches run seq 1..k with each prev the previous batch's
hash, nothing of the device is quarantined, and no stored event holds a raw identifier. The
edge is connected to the node that leads the batch stream, so its death also costs the stream
its leader mid-load.

The uplink takes one broker URL, so the edge reconnects to the same node once it is back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support.nats import RunningNats
from test_cloud_ingest_worker import Fleet, set_ack_wait, stop_gracefully
from test_integration import EDGE, device_doc, edge
from test_receiver import CLOUD

from cloud.cluster.jetstream import Layout
from cloud.db.audit import audit
from cloud.db.migrate import migrate
from cloud.db.registry import add_device

pytestmark = pytest.mark.cloud

TENANT, STORE = "t-a", "s-a"  # a store the session cluster has credentials for (tests/conftest.py)
CLOUD_PUBLIC = CLOUD.public_key().public_bytes_raw().hex()  # the workers' key (test_receiver.cloud_key_file)


def edge_yaml(tmp: Path, device: str, broker: str, password: str, *, drivers: bool) -> Path:
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    pw = tmp / "mqtt.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    doc: dict[str, Any] = device_doc(state, rate=300.0, uplink={
        "broker": broker, "protocol": "3.1.1", "auth": {"username": f"{TENANT}.{STORE}", "password_file": str(pw)},
        "cloud_public_key": CLOUD_PUBLIC, "window": 8, "batch": {"max_events": 50, "linger": "100ms"},
        "ack_timeout": "3s", "reconnect": {"initial": "200ms", "max": "1s"}, "keepalive": 5,
    })  # fmt: skip
    doc["identity"] = {"tenant": TENANT, "store": STORE, "device": device}
    if not drivers:  # the second run only sends what the first one left
        doc["drivers"] = {"ble": {"enabled": False}, "nfc": {"enabled": False}, "pos": []}
    cfg = tmp / "edge.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def status(cfg: Path) -> dict[str, Any]:
    res = edge("status", "--config", str(cfg), "--json", cwd=cfg.parent)
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def uplink_counters(doc: dict[str, Any]) -> dict[str, int]:
    """The uplink's counters as the daemon last wrote them (at its stop, their final values)."""
    up: dict[str, Any] = ((doc.get("runtime") or {}).get("components") or {}).get("uplink") or {}
    return {k: int(v) for k, v in up.items() if isinstance(v, int) and not isinstance(v, bool)}


def start_edge(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([EDGE, "run", "--config", str(cfg)], cwd=cfg.parent, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def stop_edge(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]


def stored(dsn: str, device: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE tenant = %s AND store = %s AND device = %s",
                           (TENANT, STORE, device)).fetchone()  # fmt: skip
    return int(row[0]) if row else 0


async def stream_leader(cluster: RunningNats) -> str:
    nc = await cluster.connect()
    try:
        info = await nc.jetstream().stream_info("EDGE_BATCHES")
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader
    return info.cluster.leader


async def until(cond: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


# nats-py (in the worker's test helpers) may leave a killed server's socket unclosed
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
@pytest.mark.timeout(120)
async def test_a_daemons_events_reach_postgresql_once_in_chain_order_across_a_kill_9_of_its_nats_node(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str,
) -> None:
    t0 = time.monotonic()
    device = f"e2e-{secrets.token_hex(3)}"
    nodes = nats_cluster.nats.nodes
    leader = await stream_leader(nats_cluster)
    node = next(n for n in nodes if n.name == leader)  # the worst node to lose
    broker = f"mqtt://{node.host}:{node.mqtt_port}"
    password = nats_cluster.password(f"{TENANT}.{STORE}")
    cfg = edge_yaml(tmp_path, device, broker, password, drivers=True)
    assert edge("keys", "init", "--config", str(cfg), cwd=tmp_path).returncode == 0
    shown = edge("keys", "show", "--config", str(cfg), "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    migrate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        add_device(conn, tenant=TENANT, store=STORE, device=device,
                   public_key=bytes.fromhex(json.loads(shown.stdout)["public_key"]))  # fmt: skip

    fleet = Fleet(tmp_path, nats_cluster, pg_dsn)
    log = tmp_path / "edge.log"
    proc: subprocess.Popen[bytes] | None = None
    await set_ack_wait(nats_cluster, 4.0)  # a group whose JetStream ack died with the node returns in 4 s
    try:
        worker = fleet.start("w1")
        await asyncio.to_thread(worker.wait_ready)
        proc = start_edge(cfg, log)
        await until(lambda: stored(pg_dsn, device) >= 100, 30, "the edge's first events never reached PostgreSQL")
        before_kill = stored(pg_dsn, device)
        nats_cluster.nats.kill(node)  # the edge's node: its connection and the batch stream's leader die
        killed_at = time.monotonic()
        await asyncio.sleep(3.0)  # the edge keeps generating, buffering, retrying its one broker
        assert proc.poll() is None, log.read_text()[-3000:]
        await asyncio.to_thread(nats_cluster.nats.start_node, node)
        back_after = time.monotonic() - killed_at
        await until(lambda: stored(pg_dsn, device) > before_kill + 200, 40,
                    "ingest did not resume once the edge's node was back")  # fmt: skip
        stop_edge(proc, log)
        first = uplink_counters(status(cfg))
        # a second run without drivers sends whatever the first left (unsealed or unacked)
        cfg = edge_yaml(tmp_path, device, broker, password, drivers=False)
        proc = start_edge(cfg, log)

        def drained() -> bool:
            b = status(cfg)["buffer"]
            return bool(b["backlog_events"] == 0 and b["batches_pending"] == 0)

        await until(drained, 30, "the edge's buffer did not drain")
        stop_edge(proc, log)
        proc = None
        final = status(cfg)
        second = uplink_counters(final)
        assert await asyncio.to_thread(stop_gracefully, worker) == 0, worker.log.read_text()[-2000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        fleet.close()
        await set_ack_wait(nats_cluster, Layout().ack_wait)
        if not nats_cluster.nats.running(node):  # the cluster is the session's: leave it whole
            nats_cluster.nats.start_node(node)

    buf = final["buffer"]
    generated = int(buf["next_event_id"]) - 1
    assert (buf["backlog_events"], buf["batches_pending"], buf["batches_quarantined"]) == (0, 0, 0)
    acked = int(first["events_acked"]) + int(second["events_acked"])
    with psycopg.connect(pg_dsn) as conn:
        result = audit(conn, tenant=TENANT, stores=[STORE])
        ids = [int(r[0]) for r in conn.execute(
            "SELECT id FROM events WHERE tenant = %s AND store = %s AND device = %s ORDER BY id",
            (TENANT, STORE, device)).fetchall()]  # fmt: skip
    mine = result.devices[(TENANT, STORE, device)]
    assert ids == list(range(1, generated + 1))  # every event the edge made, once
    assert mine.events == acked == generated
    assert mine.duplicates == 0
    assert mine.chain_problems == []
    assert mine.chain_intact
    assert mine.rejected == 0
    assert [f for f in result.findings if f.device == device] == []
    assert first["connects"] >= 2  # it did lose its node and come back
    took = time.monotonic() - t0
    print(f"{generated} events in {mine.batches} batches; node back after {back_after:.1f} s; "
          f"resent {first['resent'] + second['resent']}; {took:.1f} s")
