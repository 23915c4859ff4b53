"""`edge-cloud ingest` as a product, on real processes: worker subprocesses, a real 3-node NATS
cluster (devices publish over MQTT 3.1.1 with their store's credentials), real PostgreSQL.

What must hold:
- kill -9 of one of two workers during load, SIGTERM of another: every batch is in PostgreSQL
  exactly once, chains in order, every device gets a signed ok ack for each; SIGTERM exits 0;
- PostgreSQL stopped for 30 s during load: no acks while it is down, nothing lost, ingest
  resumes within seconds of its return;
- malformed bytes, an oversized payload, a wrong-key batch and a cross-store batch are refused
  and counted on /metrics, and the worker keeps storing good batches.
(Config errors and exit codes: tests/test_cloud_ingest.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from support.nats import RunningNats
from support.postgres import fresh_database, running_postgres
from test_receiver import CLOUD, Device, cloud_key_file

from cloud.cluster.jetstream import Layout
from cloud.cluster.postgres import LocalPostgres
from cloud.cluster.procs import free_port
from cloud.db.migrate import migrate
from cloud.db.registry import add_device
from edge.wire.uplink import parse_ack, verify_ack

pytestmark = pytest.mark.cloud

ROOT = Path(__file__).resolve().parent.parent
EDGE_CLOUD = Path(sys.executable).parent / "edge-cloud"


def split_dsn(dsn: str) -> tuple[str, str]:
    """(DSN without the password, the password) of support.postgres's DSNs."""
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.split("@", 1)
    user, password = creds.split(":", 1)
    return f"{scheme}://{user}@{host}", password


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics: `name{label=value,...}` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if self.metrics().get("edge_cloud_ingest_ready") == 1:
                    return
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)


@dataclass
class Fleet:
    """Workers started for one test; every one is killed at the end."""

    tmp: Path
    cluster: RunningNats
    dsn: str
    workers: list[Worker] = field(default_factory=list)

    def config(self, name: str, **extra: str) -> Path:
        base = self.tmp / name
        base.mkdir()
        (base / "nats.pw").write_text(self.cluster.password("worker") + "\n")
        dsn, pw = split_dsn(self.dsn)
        (base / "pg.pw").write_text(pw + "\n")
        servers = "".join(f"\n    - {u}" for u in self.cluster.nats.client_urls)
        lines = [f"nats:\n  servers:{servers}\n  user: worker\n  password_file: nats.pw",
                 f"postgres:\n  dsn: {dsn}\n  password_file: pg.pw",
                 f"cloud_key: {cloud_key_file(self.tmp)}",
                 f"metrics:\n  listen: 127.0.0.1:{free_port()}\n  lag_interval: 0.5s",
                 "max_group: 16\nfetch_wait: 0.5s\nbackoff:\n  initial: 0.2s\n  max: 2s\nlogging:\n  format: json",
                 *(f"{k}: {v}" for k, v in extra.items())]  # fmt: skip
        path = base / "cloud.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, name: str, **extra: str) -> Worker:
        conf = self.config(name, **extra)
        port = int(conf.read_text().split("listen: 127.0.0.1:")[1].split()[0])
        log = conf.parent / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([str(EDGE_CLOUD), "ingest", "--config", str(conf)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        w = Worker(proc, port, log)
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait(timeout=10)


@pytest.fixture
def fleet_factory(tmp_path: Path, nats_cluster: RunningNats) -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for f in made:
        f.close()


def register(dsn: str, devices: list[Device]) -> None:
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        for d in devices:
            add_device(conn, tenant=d.ids[0], store=d.ids[1], device=d.ids[2], public_key=d.raw)


def make_devices(n: int, store: str = "s-a") -> list[Device]:
    tag = secrets.token_hex(3)
    devices = [Device(f"w{tag}-{i}") for i in range(n)]
    for d in devices:
        d.ids = ("t-a", store, d.ids[2])
    return devices


class Load:
    """Devices of store t-a/s-a publishing sealed batches as edges do: everything not acked yet is
    resent on a new connection when acks stop coming. Collects and verifies the signed acks."""

    def __init__(self, cluster: RunningNats, devices: list[Device], n_batches: int, n_events: int = 10) -> None:
        self.cluster = cluster
        self.sealed = {d.ids[2]: [d.seal(n_events=n_events) for _ in range(n_batches)] for d in devices}
        self.n = n_batches
        self.n_events = n_events
        self.acked: dict[str, set[int]] = {d.ids[2]: set() for d in devices}
        self.ack_times: list[float] = []
        self.rejections: list[str] = []

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.acked.values())

    def done(self) -> bool:
        return self.total == self.n * len(self.acked)

    async def run(self, within: float) -> None:
        deadline = time.monotonic() + within
        node = self.cluster.nats.nodes[0]
        while not self.done():
            assert time.monotonic() < deadline, {k: sorted(v) for k, v in self.acked.items()}
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with aiomqtt.Client(node.host, node.mqtt_port, username="t-a.s-a",
                                          password=self.cluster.password("t-a.s-a"),
                                          identifier=f"load-{secrets.token_hex(4)}",
                                          protocol=aiomqtt.ProtocolVersion.V311, timeout=10) as client:
                    for dev in self.acked:
                        await client.subscribe(f"edge/v1/t-a/s-a/{dev}/ack", qos=1)
                    for i in range(self.n):
                        for dev, batches in self.sealed.items():
                            if i + 1 not in self.acked[dev]:
                                await client.publish(f"edge/v1/t-a/s-a/{dev}/batch", batches[i][2], qos=1)
                    await self._collect(client, quiet=6.0)

    async def _collect(self, client: aiomqtt.Client, quiet: float) -> None:
        it = aiter(client.messages)
        while not self.done():
            m = await asyncio.wait_for(anext(it), timeout=quiet)  # quiet: resend what is not acked
            dev = str(m.topic).split("/")[4]
            ack = parse_ack(bytes(m.payload))
            assert verify_ack(ack, tenant="t-a", store="s-a", device=dev, cloud_key=CLOUD.public_key())
            if not ack.ok:
                self.rejections.append(f"{dev}:{ack.seq}:{ack.err}")
                continue
            self.acked[dev].add(ack.seq)
            self.ack_times.append(time.monotonic())


def assert_stored_once_in_order(dsn: str, load: Load) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT device, string_agg(seq::text, ',' ORDER BY seq), bool_and(linked), count(*)"
                            " FROM batches GROUP BY device ORDER BY device").fetchall()
        want = ",".join(str(s) for s in range(1, load.n + 1))
        assert rows == [(dev, want, True, load.n) for dev in sorted(load.acked)]
        want_events = load.n * load.n_events * len(load.acked)
        assert conn.execute("SELECT count(*), count(DISTINCT (device, id)) FROM events").fetchone() == (
            want_events, want_events)
        assert conn.execute("SELECT count(*) FROM rejected_batches").fetchone() == (0,)


async def set_ack_wait(cluster: RunningNats, seconds: float) -> None:
    """The shared consumer's AckWait (the session cluster's; restored by the caller)."""
    nc = await cluster.connect()
    try:
        await nc.jetstream().add_consumer("EDGE_BATCHES", Layout(prefix="edge/v1", ack_wait=seconds).consumer("ingest"))
    finally:
        await nc.close()


def stop_gracefully(w: Worker, timeout: float = 20) -> int:
    w.proc.send_signal(signal.SIGTERM)
    return w.proc.wait(timeout=timeout)


# -- (a) kill -9 and SIGTERM during load ---------------------------------------------------------


async def test_kill9_of_one_worker_and_sigterm_of_another_lose_and_duplicate_nothing(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str, fleet_factory: list[Fleet],
) -> None:
    devices = make_devices(4)
    register(pg_dsn, devices)
    fleet = Fleet(tmp_path, nats_cluster, pg_dsn)
    fleet_factory.append(fleet)
    await set_ack_wait(nats_cluster, 4.0)  # a SIGKILLed worker's batches come back after 4 s, not 30
    try:
        a, b = fleet.start("a"), fleet.start("b")
        await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
        load = Load(nats_cluster, devices, n_batches=25)
        task = asyncio.create_task(load.run(within=60))
        while load.total < 20:
            assert not task.done(), task
            await asyncio.sleep(0.05)
        a.proc.kill()  # SIGKILL mid-load, with a group in hand most likely
        c = fleet.start("c")
        await asyncio.to_thread(c.wait_ready)
        while load.total < 60:
            assert not task.done(), task
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(stop_gracefully, b) == 0, b.log.read_text()[-2000:]
        await task
        assert "ingest_stopped" in b.log.read_text()
        assert_stored_once_in_order(pg_dsn, load)
        assert load.rejections == []
        # the stream holds none of them any more (work queue: acked after commit)
        deadline = time.monotonic() + 20
        while c.metrics()['edge_cloud_ingest_consumer_lag{consumer=ingest,stream=EDGE_BATCHES}'] > 0:
            assert time.monotonic() < deadline, c.metrics()
            await asyncio.sleep(0.3)
        m = c.metrics()
        assert m["edge_cloud_ingest_group_seconds_count"] > 0
        assert await asyncio.to_thread(stop_gracefully, c) == 0
    finally:
        await set_ack_wait(nats_cluster, Layout().ack_wait)


# -- (b) PostgreSQL away for 30 s ----------------------------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL of this test alone (it is stopped and started again)."""
    with running_postgres() as pg:
        yield pg


@pytest.mark.timeout(150)
async def test_postgres_outage_of_30s_stops_acks_loses_nothing_and_ingest_resumes_within_seconds(
    tmp_path: Path, nats_cluster: RunningNats, private_pg: LocalPostgres, fleet_factory: list[Fleet],
) -> None:
    dsn = fresh_database(private_pg)
    devices = make_devices(3)
    register(dsn, devices)
    fleet = Fleet(tmp_path, nats_cluster, dsn)
    fleet_factory.append(fleet)
    w = fleet.start("a")
    await asyncio.to_thread(w.wait_ready)
    load = Load(nats_cluster, devices, n_batches=30)
    task = asyncio.create_task(load.run(within=100))
    while load.total < 10:
        assert not task.done(), task
        await asyncio.sleep(0.05)
    await asyncio.to_thread(private_pg.stop)
    down_at = time.monotonic()
    await asyncio.sleep(30)
    acks_while_down = [t for t in load.ack_times if t > down_at + 1.0]  # 1 s: a group already committing
    await asyncio.to_thread(private_pg.start)
    up_at = time.monotonic()
    before = load.total
    while load.total == before:
        assert time.monotonic() - up_at < 30, "ingest did not resume within 30 s of PostgreSQL's return"
        assert not task.done() or load.done()
        await asyncio.sleep(0.05)
    resumed = time.monotonic() - up_at
    print(f"ingest resumed {resumed:.1f} s after PostgreSQL came back")
    await task
    assert acks_while_down == []
    assert_stored_once_in_order(dsn, load)
    m = w.metrics()
    assert m["edge_cloud_ingest_commit_failures_total"] >= 1
    assert w.proc.poll() is None
    assert await asyncio.to_thread(stop_gracefully, w) == 0


# -- (c) hostile input ---------------------------------------------------------------------------


async def test_malformed_oversized_wrong_key_and_cross_store_batches_are_refused_counted_and_ingest_goes_on(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str, fleet_factory: list[Fleet],
) -> None:
    good = make_devices(1)
    other_store = make_devices(1, store="s-b")  # registered for t-a/s-b
    victim = make_devices(1)  # registered for t-a/s-a; a wrong key signs "its" batch
    register(pg_dsn, good + other_store + victim)
    fleet = Fleet(tmp_path, nats_cluster, pg_dsn)
    fleet_factory.append(fleet)
    w = fleet.start("a", batch="\n  max_bytes: 16KiB")  # max_payload = 4 x 16 KiB + 4 KiB
    await asyncio.to_thread(w.wait_ready)
    before = w.metrics()

    forger = Device("x", key=Ed25519PrivateKey.generate())
    forger.ids, forger.raw = victim[0].ids, victim[0].raw  # kid of the victim's key, signed by another key
    cross = Device("y", key=other_store[0].key)
    cross.ids = ("t-a", "s-a", other_store[0].ids[2])  # B's key, A's topic and header
    node = nats_cluster.nats.nodes[0]
    async with aiomqtt.Client(node.host, node.mqtt_port, username="t-a.s-a", password=nats_cluster.password("t-a.s-a"),
                              identifier=f"bad-{secrets.token_hex(4)}", protocol=aiomqtt.ProtocolVersion.V311) as cl:
        await cl.publish(f"edge/v1/t-a/s-a/{good[0].ids[2]}/batch", b"\x00not msgpack\xff" * 10, qos=1)
        await cl.publish(f"edge/v1/t-a/s-a/{good[0].ids[2]}/batch", os.urandom(100 * 1024), qos=1)
        await cl.publish(f"edge/v1/t-a/s-a/{victim[0].ids[2]}/batch", forger.seal()[2], qos=1)
        await cl.publish(f"edge/v1/t-a/s-a/{cross.ids[2]}/batch", cross.seal()[2], qos=1)
    load = Load(nats_cluster, good, n_batches=5)
    await load.run(within=40)

    def delta(name: str) -> float:
        return w.metrics().get(name, 0.0) - before.get(name, 0.0)

    deadline = time.monotonic() + 15
    while delta("edge_cloud_ingest_unauthenticated_total") < 4:
        assert time.monotonic() < deadline, w.metrics()
        await asyncio.sleep(0.2)
    assert delta("edge_cloud_ingest_rejected_total{reason=malformed}") >= 2
    assert delta("edge_cloud_ingest_oversized_total") >= 1
    assert delta("edge_cloud_ingest_rejected_total{reason=bad-signature}") >= 1
    assert delta("edge_cloud_ingest_rejected_total{reason=unknown-key}") >= 1
    assert delta("edge_cloud_ingest_batches_stored_total") >= 5
    assert delta("edge_cloud_ingest_events_stored_total") >= 50
    assert_stored_once_in_order(pg_dsn, load)  # only the good device's batches are stored
    assert w.proc.poll() is None
    assert await asyncio.to_thread(stop_gracefully, w) == 0
