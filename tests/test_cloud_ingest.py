"""`edge-cloud ingest --config cloud.yaml` as real processes: devices (MQTT 3.1.1) -> NATS cluster ->
JetStream -> worker subprocess(es) -> PostgreSQL, signed acks back.

What must hold: a bad config exits 2 naming the key; every good batch is stored once, in chain
order, and acked `ok` with the cloud's signature; a malformed and a wrong-key batch are counted
as rejects by reason on /metrics while good batches keep flowing; SIGTERM exits 0; kill -9 of one
of two workers during load loses nothing and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiomqtt
import psycopg
import pytest
from support.nats import RunningNats
from test_receiver import CLOUD, Device, cloud_key_file

from cloud.cluster.procs import free_port
from cloud.db.migrate import migrate
from cloud.db.registry import add_device
from edge.wire.uplink import parse_ack, verify_ack

STORE = ("t-a", "s-b")  # the fixture's second store; device names below are this file's own
USER = "t-a.s-b"


def _config(tmp_path: Path, cluster: RunningNats, dsn: str, name: str) -> tuple[Path, int]:
    """A worker's cloud.yaml (passwords in files, as shipped) and its metrics port."""
    userinfo, _, rest = dsn.removeprefix("postgresql://").partition("@")
    role, _, pg_password = userinfo.partition(":")
    (tmp_path / f"{name}.nats").write_text(cluster.password("worker") + "\n")
    (tmp_path / f"{name}.pg").write_text(pg_password + "\n")
    port = free_port()
    servers = "\n".join(f"    - {u}" for u in cluster.nats.client_urls)
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"nats:\n  servers:\n{servers}\n  user: worker\n  password_file: {name}.nats\n"
        f"postgres:\n  dsn: postgresql://{role}@{rest}\n  password_file: {name}.pg\n"
        f"cloud_key: {cloud_key_file(tmp_path)}\n"
        f"max_group: 8\nbackoff:\n  initial: 200ms\n  max: 1s\n"
        f"metrics:\n  listen: 127.0.0.1:{port}\n  lag_interval: 200ms\n"
        f"logging:\n  level: info\n  format: json\n"
    )
    return path, port


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "cloud.cli", "ingest", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of every sample the worker exposes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def _metrics(port: int) -> dict[str, float]:
    for _ in range(100):
        with contextlib.suppress(OSError):
            return await asyncio.to_thread(_scrape, port)
        await asyncio.sleep(0.2)
    raise AssertionError(f"no metrics on port {port}")


def _devices(dsn: str, names: list[str]) -> list[Device]:
    devices = []
    with psycopg.connect(dsn) as conn:
        for name in names:
            d = Device(name)
            d.ids = (STORE[0], STORE[1], name)
            add_device(conn, tenant=STORE[0], store=STORE[1], device=name, public_key=d.raw)
            devices.append(d)
    return devices


async def _publish_until_acked(cluster: RunningNats, devices: list[Device], n_batches: int, *,
                               extra: Sequence[tuple[str, bytes]] = (), during: asyncio.Event | None = None,
                               give_up: float = 120) -> None:  # fmt: skip
    """As devices do: publish what is not acked yet, collect signed acks, resend the rest."""
    sealed = {d.ids[2]: [d.seal(n_events=5) for _ in range(n_batches)] for d in devices}
    acked: dict[str, set[int]] = {d.ids[2]: set() for d in devices}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up
    node = cluster.nats.nodes[0]
    first = True
    while any(len(s) < n_batches for s in acked.values()):
        assert loop.time() < deadline, {k: len(v) for k, v in acked.items()}
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with aiomqtt.Client(node.host, node.mqtt_port, username=USER, password=cluster.password(USER),
                                      identifier="t-a-s-b-ingest", protocol=aiomqtt.ProtocolVersion.V311,
                                      timeout=10) as client:  # fmt: skip
                for d in devices:
                    await client.subscribe(f"edge/v1/t-a/s-b/{d.ids[2]}/ack", qos=1)
                for i in range(n_batches):
                    if first and i == n_batches // 2:
                        for topic, payload in extra:  # refused input in the middle of good traffic
                            await client.publish(topic, payload, qos=1)
                    for d in devices:
                        if i + 1 not in acked[d.ids[2]]:
                            await client.publish(f"edge/v1/t-a/s-b/{d.ids[2]}/batch", sealed[d.ids[2]][i][2], qos=1)
                first = False

                async def collect() -> None:
                    async for m in client.messages:
                        dev = str(m.topic).split("/")[4]
                        ack = parse_ack(bytes(m.payload))
                        assert ack.ok, ack
                        assert verify_ack(ack, tenant="t-a", store="s-b", device=dev, cloud_key=CLOUD.public_key())
                        acked[dev].add(ack.seq)
                        if during is not None and sum(map(len, acked.values())) >= n_batches:
                            during.set()
                        if all(len(s) == n_batches for s in acked.values()):
                            return

                await asyncio.wait_for(collect(), timeout=20)
    assert all(s == set(range(1, n_batches + 1)) for s in acked.values())


def _assert_stored_once_in_order(dsn: str, names: list[str], n_batches: int, events_per_batch: int = 5) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT device, string_agg(seq::text, ',' ORDER BY seq), bool_and(linked), count(*)"
                            " FROM batches WHERE store = 's-b' GROUP BY device ORDER BY device").fetchall()
        assert rows == [(n, ",".join(str(s) for s in range(1, n_batches + 1)), True, n_batches) for n in sorted(names)]
        total = len(names) * n_batches * events_per_batch
        got = conn.execute("SELECT count(*), count(DISTINCT (device, id)) FROM events WHERE store = 's-b'").fetchone()
        assert got == (total, total)


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("nats:\n  servers: [http://x:1]\npostgres:\n  dsn: postgresql://u:secret@h/db\ncloud_key: k\n")
    got = subprocess.run([sys.executable, "-m", "cloud.cli", "ingest", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert got.returncode == 2, got
    assert "nats.servers" in got.stderr, got.stderr
    assert "postgres.dsn: the DSN is not valid: the DSN holds a password" in got.stderr
    assert "secret" not in got.stderr + got.stdout


def test_an_unreadable_password_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("nats:\n  servers: [nats://127.0.0.1:1]\n  password_file: missing\n"
                    "postgres:\n  dsn: postgresql://u@h/db\ncloud_key: k\n")
    got = subprocess.run([sys.executable, "-m", "cloud.cli", "ingest", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert got.returncode == 2, got
    assert "nats.password_file" in got.stderr


@pytest.mark.cloud
async def test_worker_stores_good_batches_once_counts_rejects_and_exits_0_on_sigterm(
    nats_cluster: RunningNats, tmp_path: Path, pg_dsn: str,
) -> None:
    migrate(pg_dsn)
    names = ["ing-1", "ing-2"]
    devices = _devices(pg_dsn, names)
    stranger = Device("ing-stranger")  # its key is in no registry: `unknown-key`
    stranger.ids = (STORE[0], STORE[1], "ing-stranger")
    bad = [("edge/v1/t-a/s-b/ing-1/batch", b"\x00not a batch"),
           ("edge/v1/t-a/s-b/ing-stranger/batch", stranger.seal(n_events=2)[2])]
    config, port = _config(tmp_path, nats_cluster, pg_dsn, "w1")
    proc = _start(config, tmp_path / "w1.log")
    try:
        await _metrics(port)
        await _publish_until_acked(nats_cluster, devices, 8, extra=bad)
        for _ in range(50):
            m = await _metrics(port)
            if m.get('edge_cloud_ingest_rejected_total{reason="unknown-key"}', 0) >= 1 and \
                    m.get('edge_cloud_ingest_rejected_total{reason="malformed"}', 0) >= 1:  # fmt: skip
                break
            await asyncio.sleep(0.2)
        assert m["edge_cloud_ingest_batches_stored_total"] == 16, m
        assert m["edge_cloud_ingest_events_stored_total"] == 80
        # >= : a batch another test left in the shared stream is unknown to this database too
        assert m['edge_cloud_ingest_rejected_total{reason="unknown-key"}'] >= 1
        assert m['edge_cloud_ingest_rejected_total{reason="malformed"}'] >= 1
        assert m["edge_cloud_ingest_unauthenticated_total"] >= 2
        assert m["edge_cloud_ingest_commit_failures_total"] == 0
        assert m["edge_cloud_ingest_ready"] == 1
        assert 'edge_cloud_ingest_consumer_lag{consumer="ingest",stream="EDGE_BATCHES"}' in m
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "w1.log").read_text()[-3000:]
    assert "ingest_stopped" in (tmp_path / "w1.log").read_text()
    _assert_stored_once_in_order(pg_dsn, names, 8)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM batches WHERE device = 'ing-stranger'").fetchone() == (0,)


@pytest.mark.cloud
async def test_kill_9_of_one_of_two_workers_during_load_loses_and_duplicates_nothing(
    nats_cluster: RunningNats, tmp_path: Path, pg_dsn: str,
) -> None:
    migrate(pg_dsn)
    names = [f"ing-k{i}" for i in range(4)]
    devices = _devices(pg_dsn, names)
    procs = []
    for name in ("a", "b"):
        config, port = _config(tmp_path, nats_cluster, pg_dsn, name)
        procs.append(_start(config, tmp_path / f"{name}.log"))
        await _metrics(port)
    under_load = asyncio.Event()

    async def killer() -> None:
        await under_load.wait()
        procs[0].kill()  # SIGKILL: whatever it had fetched and not acked is redelivered to the other

    kill = asyncio.create_task(killer())
    try:
        await _publish_until_acked(nats_cluster, devices, 25, during=under_load)
        await kill
        assert procs[0].wait(timeout=10) == -signal.SIGKILL
    finally:
        kill.cancel()
        codes = [_stop(p) for p in procs]
    assert codes[1] == 0, (tmp_path / "b.log").read_text()[-3000:]
    _assert_stored_once_in_order(pg_dsn, names, 25)
