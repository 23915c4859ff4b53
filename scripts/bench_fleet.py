"""Fleet ingest benchmark (issue 15): NATS JetStream (3 nodes) + PostgreSQL, figures side by side.

    .venv/bin/python scripts/bench_fleet.py [--quick] [--parts a,b,c] [--workers 2] [--scale 1,2,4]

One run starts its own local cloud (`cloud.cluster.local.up`: 3 NATS nodes with JetStream R3 and
MQTT, one PostgreSQL with the shipped schema, one MQTT user per store) in a temporary folder,
runs real `edge-cloud ingest` worker subprocesses with the shipped defaults (config/cloud.yaml:
max_group 64, fetch_wait 1 s, ...), and measures:

(a) drain: `--devices` devices (one per store, keys registered with `add_device`) have sealed
    `--events` events each in real uplink-v1 batches of `--batch` events (edge/wire/uplink.py,
    their own Ed25519 key, chained seq 1..k); the batches are published straight into
    EDGE_BATCHES (JetStream publish on the batch subject, every one acknowledged by the stream)
    with no worker running. Then N workers start against a fresh database; the clock runs from
    the first delivery (consumer info, polled every 50 ms) to the stream being empty (a batch
    leaves the work queue only when acked, after its COMMIT). Checked afterwards by SQL: every
    event once, every chain linked 1..k, nothing rejected; and every batch got a signed ok ack
    (the bench listens on the ack subjects and verifies each with the cloud key). For N = each of
    `--scale`; the default worker count (`--workers`, one per core as docs/cloud.md advises) is
    judged against the baseline.
    Baseline, same run, same server: the same rows (events and batches, as the worker writes
    them) with psycopg `cursor.copy()` into the same schema in a fresh database, one
    transaction, timed from BEGIN to COMMIT; measured before and after the drains, the faster
    one is the reference. Target: drain with the default workers >= 0.5 x COPY.
(b) reconnect storm: `--devices` real fleetsim devices (cloud/fleetsim.py: own SQLite buffer, key,
    chain, the real Uplink) in `--sims` subprocesses, each logged in with its store's MQTT
    credentials, spread over the three nodes, keys registered in PostgreSQL, buffer `--events`
    events offline; then all connect at once. The clock runs from `go` until PostgreSQL holds
    every event (sum(batches.n), polled every 0.25 s); whether every device also heard every ack
    within `--ack-grace` is reported beside it. Then again with kill -9 of one worker and of the
    NATS node leading EDGE_BATCHES at 30 % stored (the node restarted 5 s later, as its service
    manager would). Checked by SQL: 0 lost, 0 duplicates, every chain linked 1..k.
(c) steady rate: the devices generate `--rate` events/s in total for `--steady-seconds`;
    latency = an event's ts (device wall clock) -> the signed ok ack of its batch seen on NATS
    (a worker publishes it only after COMMIT; same machine, same clock), events of the first
    `--warmup` s left out. For each of `--steady-workers`.

Peak RSS per worker: VmHWM of each worker process (/proc/PID/status) just before it is stopped.
`--quick` runs a small fleet (50 devices x 200 events) in well under two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402 - after the path insert
import psycopg  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from nats.aio.client import Client as NATS  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from cloud.cluster.jetstream import BATCH_CONSUMER, BATCH_STREAM  # noqa: E402
from cloud.cluster.local import ADMIN, WORKER, LocalCloud, down, up  # noqa: E402
from cloud.cluster.natsconf import store_user_name, subject_prefix  # noqa: E402
from cloud.cluster.procs import free_port  # noqa: E402
from cloud.db.migrate import migrate  # noqa: E402
from cloud.db.pg_store import capture_time  # noqa: E402
from cloud.db.registry import add_device  # noqa: E402
from cloud.fleetsim import Fleet, FleetSpec, SimDevice, device_config  # noqa: E402
from cloud.jsonlines import json_line_encoder  # noqa: E402
from cloud.keys import create_cloud_key  # noqa: E402
from edge.clock import SystemClock  # noqa: E402
from edge.config import MqttAuth  # noqa: E402
from edge.logs import configure_logging  # noqa: E402
from edge.wire.uplink import encode_event, kid_of, parse_ack, public_raw, seal_batch, verify_ack  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
EDGE_CLOUD = str(Path(sys.executable).parent / "edge-cloud")
PREFIX = "edge/v1"
TENANT = "bench"
TARGET_COPY_RATIO = 0.5
TARGET_STORM_S = 60.0
POLL_S = 0.05
UNSENT = "not stored by the end (still in the devices' buffers)"


def ids(i: int) -> tuple[str, str, str]:
    """(tenant, store, device) of device number `i` (from 1): one device per store."""
    return TENANT, f"store-{i:04d}", f"edge-{i:04d}"


# ------------------------------------------------------------------------------ the cloud


@dataclass
class Worker:
    """One `edge-cloud ingest` subprocess."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def peak_rss_kib(self) -> int:
        """VmHWM of the worker process (0 once it is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


@dataclass
class Bench:
    """The local cloud of one run and the workers started on it."""

    dir: Path
    cloud: LocalCloud
    cloud_key: Ed25519PrivateKey
    workers: list[Worker] = field(default_factory=list)

    @property
    def pg_admin_dsn(self) -> str:
        return self.cloud.postgres().admin_dsn()

    def fresh_db(self, name: str) -> str:
        """DSN (with password) of a new database `name` with the schema migrated."""
        with psycopg.connect(self.pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"'.encode())
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        dsn = self.cloud.postgres().dsn.rsplit("/", 1)[0] + "/" + name
        migrate(dsn)
        return dsn

    def worker_config(self, name: str, db: str) -> tuple[Path, int]:
        base = self.dir / "workers" / name
        base.mkdir(parents=True, exist_ok=True)
        (base / "nats.pw").write_text(self.cloud.state.passwords[WORKER] + "\n")
        pg = self.cloud.postgres()
        (base / "pg.pw").write_text(pg.password + "\n")
        port = free_port()
        servers = "".join(f"\n    - nats://{n.host}:{n.client_port}" for n in self.cloud.node_specs)
        text = (f"nats:\n  servers:{servers}\n  user: {WORKER}\n  password_file: nats.pw\n"
                f"postgres:\n  dsn: postgresql://{pg.role}@{pg.host}:{pg.port}/{db}\n  password_file: pg.pw\n"
                f"cloud_key: {self.dir / 'cloud.key'}\n"
                f"metrics:\n  listen: 127.0.0.1:{port}\n"
                "logging:\n  level: warning\n  format: json\n")  # fmt: skip
        (base / "cloud.yaml").write_text(text)
        return base / "cloud.yaml", port

    def start_worker(self, name: str, db: str) -> Worker:
        conf, port = self.worker_config(name, db)
        log = conf.parent / "worker.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([EDGE_CLOUD, "ingest", "--config", str(conf)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        w = Worker(name, proc, port, log)
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.proc.wait(20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)
        self.workers.clear()

    async def nats(self) -> NATS:
        return await nats.connect(servers=[n.client_url for n in self.cloud.node_specs], user=ADMIN,
                                  password=self.cloud.state.passwords[ADMIN], connect_timeout=5,
                                  max_reconnect_attempts=-1, reconnect_time_wait=0.5)  # fmt: skip


@contextlib.contextmanager
def local_cloud(devices: int, keep: bool = False) -> Iterator[Bench]:
    base = Path(tempfile.mkdtemp(prefix="fleetbench-run-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL's own user (when run as root) must reach its folder
    cloud = None
    try:
        stores = [f"{t}/{s}" for t, s, _ in (ids(i) for i in range(1, devices + 1))]
        try:
            cloud = up(base / "cloud", stores=stores)
        except BaseException:
            with contextlib.suppress(Exception):
                down(base / "cloud")  # whatever came up before the failure
            raise
        key, _ = create_cloud_key(base / "cloud.key")
        bench = Bench(base, cloud, key)
        try:
            yield bench
        finally:
            bench.stop_workers()
    finally:
        if cloud is not None:
            with contextlib.suppress(Exception):
                cloud.nats().stop()
            with contextlib.suppress(Exception):
                cloud.postgres().stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------ (a) drain


@dataclass(slots=True)
class SealedFleet:
    """Every batch of every device, sealed once; the rows the worker will write, for the baseline."""

    keys: list[bytes]  # raw public key per device (index i-1)
    batches: list[tuple[str, bytes]]  # (subject, payload) in publish order
    event_rows: list[tuple[Any, ...]]
    batch_rows: list[tuple[Any, ...]]
    per_device: int  # batches per device

    @property
    def events(self) -> int:
        return len(self.event_rows)


def seal_fleet(devices: int, events: int, batch: int) -> SealedFleet:
    encode = json_line_encoder()
    p = subject_prefix(PREFIX)
    base_ms = int(time.time() * 1000) - 3_600_000
    keys: list[bytes] = []
    per_device: list[list[tuple[str, bytes]]] = []
    event_rows: list[tuple[Any, ...]] = []
    batch_rows: list[tuple[Any, ...]] = []
    now = dt.datetime.now(dt.UTC)
    for i in range(1, devices + 1):
        tenant, store, device = ids(i)
        key = Ed25519PrivateKey.generate()
        raw = public_raw(key.public_key())
        kid = kid_of(raw)
        keys.append(raw)
        prev, out = bytes(32), []
        for seq, first in enumerate(range(1, events + 1, batch), start=1):
            last = min(events, first + batch - 1)
            evs = [{"id": n, "ts": base_ms + n, "src": "edge", "type": "edge.sim", "data": {"i": n}}
                   for n in range(first, last + 1)]
            t_ms = base_ms + last
            payload, hh = seal_batch(tenant=tenant, store=store, device=device, seq=seq, prev=prev,
                                     event_bodies=[encode_event(e) for e in evs], first=first, last=last,
                                     t_ms=t_ms, sync=True, key=key, kid=kid)  # fmt: skip
            out.append((f"{p}.{tenant}.{store}.{device}.batch", payload))
            batch_rows.append((tenant, store, device, 1, seq, hh, prev, kid, True, len(evs), first, last, t_ms,
                               True, now))  # fmt: skip
            event_rows.extend((tenant, store, device, 1, seq, n, capture_time(base_ms + n), base_ms + n, "edge",
                               "edge.sim", encode({"i": n})) for n in range(first, last + 1))  # fmt: skip
            prev = hh
        per_device.append(out)
    # interleave devices (seq 1 of everyone, then seq 2, ...) as a fleet's backlog arrives
    batches = [b for group in zip(*per_device, strict=True) for b in group]
    return SealedFleet(keys, batches, event_rows, batch_rows, len(per_device[0]))


def register_keys(dsn: str, keys: Sequence[bytes]) -> None:
    with psycopg.connect(dsn) as conn:
        for i, raw in enumerate(keys, start=1):
            t, s, d = ids(i)
            add_device(conn, tenant=t, store=s, device=d, public_key=raw)


def copy_baseline(bench: Bench, fleet: SealedFleet, name: str) -> float:
    """Seconds for BEGIN; COPY batches; COPY events; COMMIT of the same rows into a fresh database."""
    dsn = bench.fresh_db(name)
    with psycopg.connect(dsn) as conn:
        for day in sorted({r[6].date() for r in fleet.event_rows}):  # the worker makes it once, too
            conn.execute("SELECT edge_event_partition(%s)", (day,))
        conn.commit()
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY batches (tenant, store, device, epoch, seq, hh, prev, kid, linked, n, first_id,"
                          " last_id, sealed_ms, synced, received_at) FROM STDIN") as copy:  # fmt: skip
                for row in fleet.batch_rows:
                    copy.write_row(row)
            with cur.copy("COPY events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
                          " FROM STDIN") as copy:  # fmt: skip
                for row in fleet.event_rows:
                    copy.write_row(row)
        seconds = time.perf_counter() - t0
        n = conn.execute("SELECT count(*) FROM events").fetchone()
        if n is None or n[0] != fleet.events:
            raise RuntimeError(f"COPY baseline stored {n} events, not {fleet.events}")
    return seconds


async def prefill(bench: Bench, fleet: SealedFleet) -> float:
    """Publish every batch into EDGE_BATCHES (each acknowledged by the stream); returns seconds."""
    nc = await bench.nats()
    js = nc.jetstream()
    gate = asyncio.Semaphore(64)
    t0 = time.perf_counter()

    async def one(subject: str, payload: bytes) -> None:
        async with gate:
            for attempt in range(20):
                try:
                    await js.publish(subject, payload, timeout=10)
                except (nats.errors.TimeoutError, nats.js.errors.APIError):
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.2)
                else:
                    return

    try:
        await asyncio.gather(*(one(s, p) for s, p in fleet.batches))
        info = await js.stream_info(BATCH_STREAM)
        if info.state.messages != len(fleet.batches):
            raise RuntimeError(f"EDGE_BATCHES holds {info.state.messages} batches, not {len(fleet.batches)}")
    finally:
        await nc.close()
    return time.perf_counter() - t0


class AckListener:
    """Every ack the workers publish (subject `edge.v1.*.*.*.ack`), with its arrival time."""

    def __init__(self) -> None:
        self.acks: dict[tuple[str, str, str, int], float] = {}  # first ok ack per (ids, seq): wall ms
        self.raw: list[tuple[str, bytes]] = []
        self.not_ok = 0

    async def on_msg(self, msg: Msg) -> None:
        self.raw.append((msg.subject, msg.data))
        parts = msg.subject.split(".")
        t, s, d = parts[-4], parts[-3], parts[-2]
        try:
            ack = parse_ack(msg.data)
        except ValueError:
            self.not_ok += 1
            return
        if not ack.ok:
            self.not_ok += 1
            return
        self.acks.setdefault((t, s, d, ack.seq), time.time() * 1000)

    def verified(self, cloud_key: Ed25519PrivateKey) -> int:
        """How many distinct batches got an ok ack whose signature checks out."""
        pub = cloud_key.public_key()
        good: set[tuple[str, str, str, int]] = set()
        for subject, data in self.raw:
            parts = subject.split(".")
            t, s, d = parts[-4], parts[-3], parts[-2]
            ack = parse_ack(data)
            if ack.ok and verify_ack(ack, tenant=t, store=s, device=d, cloud_key=pub):
                good.add((t, s, d, ack.seq))
        return len(good)


@dataclass(slots=True)
class Check:
    events: int
    distinct: int
    batches: int
    bad_chains: int  # devices whose batches are not exactly linked seq 1..k, or whose chain row disagrees
    bad_ids: int  # devices whose event ids are not contiguous
    rejected: int

    def lost(self, want: int) -> int:
        return want - self.distinct

    @property
    def duplicates(self) -> int:
        return self.events - self.distinct

    def ok(self, want_events: int, want_batches: int | None) -> bool:
        return (self.events == self.distinct == want_events and want_batches in (None, self.batches)
                and not self.bad_chains and not self.bad_ids and not self.rejected)  # fmt: skip

    def text(self, want: int, missing: str = "lost") -> str:
        return (f"{self.events} events ({self.lost(want)} {missing}, {self.duplicates} duplicates), "
                f"{self.batches} batches,"
                f" {self.bad_chains} broken chains, {self.bad_ids} id gaps, {self.rejected} rejected")


def check_db(dsn: str, devices: int) -> Check:
    """What is in PostgreSQL, checked by SQL on the batches, chains and events tables."""
    with psycopg.connect(dsn) as conn:

        def one(sql: str) -> int:
            row = conn.execute(sql.encode()).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        events = one("SELECT count(*) FROM events")
        distinct = one("SELECT count(*) FROM (SELECT DISTINCT tenant, store, device, epoch, id FROM events) x")
        batches = one("SELECT count(*) FROM batches")
        bad_chains = one(
            "SELECT count(*) FROM (SELECT b.tenant, b.store, b.device, count(*) AS n, min(b.seq) AS lo,"
            " max(b.seq) AS hi, bool_and(b.linked AND NOT b.detached) AS linked, max(c.highest) AS highest,"
            " sum(b.n) AS evn, count(DISTINCT b.epoch) AS epochs"
            " FROM batches b LEFT JOIN chains c USING (tenant, store, device) GROUP BY 1, 2, 3) x"
            " WHERE n <> hi OR lo <> 1 OR NOT linked OR highest IS DISTINCT FROM hi OR epochs <> 1")
        bad_chains += devices - one("SELECT count(DISTINCT (tenant, store, device)) FROM batches")
        bad_ids = one(
            "SELECT count(*) FROM (SELECT tenant, store, device, count(DISTINCT id) AS n, min(id) AS lo, max(id) AS hi"
            " FROM events GROUP BY 1, 2, 3) x WHERE lo <> 1 OR hi - lo + 1 <> n")
        rejected = one("SELECT count(*) FROM rejected_batches")
    return Check(events, distinct, batches, bad_chains, bad_ids, rejected)


async def consumer_state(nc: NATS) -> tuple[int, int, int]:
    """(not yet delivered, delivered not acked, messages in the stream)."""
    js = nc.jetstream()
    info = await js.consumer_info(BATCH_STREAM, BATCH_CONSUMER)
    stream = await js.stream_info(BATCH_STREAM)
    return int(info.num_pending or 0), int(info.num_ack_pending or 0), int(stream.state.messages)


@dataclass(slots=True)
class DrainResult:
    workers: int
    seconds: float  # first delivery -> stream empty
    from_spawn: float  # worker processes spawned -> stream empty
    events: int
    acks_verified: int
    check: Check
    peak_rss_kib: list[int]

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def drain(bench: Bench, fleet: SealedFleet, n_workers: int, devices: int, within: float) -> DrainResult:
    dsn = bench.fresh_db(f"drain_{n_workers}")
    register_keys(dsn, fleet.keys)
    await prefill(bench, fleet)
    nc = await bench.nats()
    listener = AckListener()
    await nc.subscribe(f"{subject_prefix(PREFIX)}.*.*.*.ack", cb=listener.on_msg)
    total = len(fleet.batches)
    try:
        spawned = time.perf_counter()
        workers = [bench.start_worker(f"drain{n_workers}-{k}", dsn.rsplit("/", 1)[1]) for k in range(n_workers)]
        started: float | None = None
        while True:
            undelivered, in_flight, left = await consumer_state(nc)
            now = time.perf_counter()
            if started is None and (undelivered < total or in_flight):
                started = now
            if started is not None and left == 0 and in_flight == 0:
                break
            if now - spawned > within:
                raise RuntimeError(f"drain with {n_workers} workers not done in {within:.0f} s: {left} batches left")
            for w in workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.name} exited {w.proc.returncode}: {w.log.read_text()[-2000:]}")
            await asyncio.sleep(POLL_S)
        done = time.perf_counter()
        rss = [w.peak_rss_kib() for w in workers]
        await asyncio.sleep(0.3)  # the last device acks are flushed before the JetStream acks; let them land
        await nc.flush()
    finally:
        await nc.close()
        bench.stop_workers()
    check = check_db(dsn, devices)
    return DrainResult(n_workers, done - started, done - spawned, fleet.events, listener.verified(bench.cloud_key),
                       check, rss)  # fmt: skip


async def part_a(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    fleet = seal_fleet(args.devices, args.events, args.batch)
    print(f"(a) sealed {len(fleet.batches)} batches, {fleet.events} events of {args.devices} devices in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    copies = [copy_baseline(bench, fleet, "copy_before")]
    print(f"    COPY baseline: {fleet.events / copies[0]:,.0f} events/s ({copies[0]:.2f} s)", flush=True)
    counts = sorted({*args.scale, args.workers})
    drains: dict[int, DrainResult] = {}
    for n in counts:
        r = await drain(bench, fleet, n, args.devices, within=args.timeout)
        drains[n] = r
        print(f"    drain, {n} worker(s): {r.rate:,.0f} events/s ({r.seconds:.2f} s; {r.from_spawn:.2f} s from spawn);"
              f" {r.check.text(fleet.events)}; {r.acks_verified}/{len(fleet.batches)} signed ok acks;"
              f" peak RSS {', '.join(f'{k / 1024:.0f}' for k in r.peak_rss_kib)} MiB", flush=True)  # fmt: skip
    copies.append(copy_baseline(bench, fleet, "copy_after"))
    print(f"    COPY baseline again: {fleet.events / copies[1]:,.0f} events/s ({copies[1]:.2f} s)", flush=True)
    copy_rate = fleet.events / min(copies)
    default = drains[args.workers]
    ratio = default.rate / copy_rate
    all_ok = all(r.check.ok(fleet.events, len(fleet.batches)) and r.acks_verified == len(fleet.batches)
                 for r in drains.values())  # fmt: skip
    return {
        "events": fleet.events, "batches": len(fleet.batches), "devices": args.devices,
        "copy_events_per_s": [round(fleet.events / c) for c in copies],
        "drain": {n: {"events_per_s": round(r.rate), "seconds": round(r.seconds, 2),
                      "from_spawn_s": round(r.from_spawn, 2),
                      "peak_rss_mib": [round(k / 1024, 1) for k in r.peak_rss_kib],
                      "check": r.check.text(fleet.events), "acks_verified": r.acks_verified}
                  for n, r in drains.items()},
        "default_workers": args.workers, "ratio_to_copy": round(ratio, 3),
        "target_met": ratio >= TARGET_COPY_RATIO and all_ok, "verified": all_ok,
    }  # fmt: skip


# ------------------------------------------------------------------------------ (b), (c): simulated devices


SIM_PROGRESS_S = 0.25


def fleet_spec(spec: dict[str, Any]) -> FleetSpec:
    root = Path(spec["dir"])
    return FleetSpec(devices=spec["hi"] - spec["lo"] + 1, events=0, broker=spec["mqtt_urls"][0], state=root / "state",
                     keys_dir=root / "keys", cloud_public_key=spec["cloud_public_key"], tenant=TENANT,
                     rate=spec["rate"], timeout=spec["timeout"])  # fmt: skip


async def open_devices(spec: dict[str, Any], fs: FleetSpec) -> list[SimDevice]:
    """Devices lo..hi logging in with their store's MQTT credentials (spread over the three nodes,
    protocol 3.1.1 as against NATS), keys registered in PostgreSQL."""
    urls: list[str] = spec["mqtt_urls"]
    clock = SystemClock()
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> SimDevice:
        t, s, _ = fs.ids(i)
        user = store_user_name(t, s)
        cfg = device_config(fs, i)
        auth = MqttAuth(username=user, password_file=Path(spec["passwords"]) / f"{user}.pw")
        update: dict[str, Any] = {"auth": auth, "protocol": "3.1.1", "broker": urls[(i - 1) % len(urls)]}
        if spec.get("linger") is not None:
            update["batch"] = cfg.uplink.batch.model_copy(update={"linger": float(spec["linger"])})
        uplink = cfg.uplink.model_copy(update=update)
        async with gate:
            return await SimDevice.open(cfg.model_copy(update={"uplink": uplink}), clock, fs.keys_dir)

    devices = list(await asyncio.gather(*(one(i) for i in range(spec["lo"], spec["hi"] + 1))))
    with psycopg.connect(spec["dsn"]) as conn:
        for dev in devices:
            ident = dev.cfg.identity
            add_device(conn, tenant=ident.tenant, store=ident.store, device=ident.device,
                       public_key=dev.rt.keys.public_key())  # fmt: skip
    return devices


async def sim_child(spec: dict[str, Any]) -> int:
    """One simulator process: open its devices, buffer offline if asked, say `ready`, wait for `go` on
    stdin, run until every event is acked; progress and the report as JSON lines on stdout."""
    fs = fleet_spec(spec)
    total = (spec["hi"] - spec["lo"] + 1) * spec["events"]
    marks: dict[str, float] = {}
    last = [0.0]

    def say(**kv: Any) -> None:
        sys.stdout.write(json.dumps(kv) + "\n")
        sys.stdout.flush()

    def progress(f: Fleet) -> None:
        now = time.time()
        acked = f.acked()
        if acked >= total:
            marks.setdefault("acked", now)
        if now - last[0] >= SIM_PROGRESS_S:
            last[0] = now
            say(acked=acked)

    fleet = Fleet(fs, on_progress=progress)
    fleet.devices = await open_devices(spec, fs)
    if spec["offline"]:  # the storm: everything buffered before any uplink starts
        clock = SystemClock()
        await asyncio.gather(*(d.generate(spec["events"], None, clock) for d in fleet.devices))
        fleet.spec = dataclasses.replace(fs, events=0)
    else:
        fleet.spec = dataclasses.replace(fs, events=spec["events"])
    say(state="ready")
    await asyncio.to_thread(sys.stdin.readline)
    go = time.time()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def read_stop() -> None:  # a "stop" line (or EOF): end the run as it is
        sys.stdin.readline()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stop, daemon=True).start()
    report = await fleet.run(stop)
    say(state="done", acked=report.acked, generated=report.generated, complete=report.complete,
        devices_done=sum(1 for d in report.devices if not d.backlog_events and not d.batches_pending),
        resent=sum(d.resent for d in report.devices), connects=sum(d.connects for d in report.devices),
        backlog=report.backlog_events, go=go, acked_at=marks.get("acked"), rss_peak_kib=report.rss_peak_kib)
    return 0


class Sims:
    """`--sims` simulator subprocesses sharing the devices (one Python process cannot drive 500
    devices at 5,000 events/s); the bench coordinates them through their stdin/stdout."""

    def __init__(self, bench: Bench, name: str, args: argparse.Namespace, dsn: str, *, events: int,
                 rate: float | None, offline: bool) -> None:  # fmt: skip
        self.bench, self.name, self.args, self.dsn = bench, name, args, dsn
        self.events, self.rate, self.offline = events, rate, offline
        self.procs: list[asyncio.subprocess.Process] = []
        self.acked: list[int] = []
        self.done: list[dict[str, Any]] = []
        self._readers: list[asyncio.Task[None]] = []

    @property
    def total(self) -> int:
        n: int = self.args.devices * self.events
        return n

    def acked_now(self) -> int:
        return sum(self.acked)

    async def start(self) -> None:
        """Spawn every simulator; returns once all opened (and buffered) their devices."""
        b = self.bench
        pw_dir = b.dir / "mqtt-passwords"
        pw_dir.mkdir(exist_ok=True)
        for i in range(1, self.args.devices + 1):
            user = store_user_name(*ids(i)[:2])
            pw = pw_dir / f"{user}.pw"
            if not pw.exists():
                pw.write_text(b.cloud.state.passwords[user] + "\n")
                pw.chmod(0o600)
        k = max(1, min(self.args.sims, self.args.devices))
        cuts = [round(j * self.args.devices / k) for j in range(k + 1)]
        for j in range(k):
            spec = {"dir": str(b.dir / self.name), "lo": cuts[j] + 1, "hi": cuts[j + 1], "events": self.events,
                    "rate": self.rate, "offline": self.offline, "timeout": self.args.timeout,
                    "mqtt_urls": [n.mqtt_url for n in b.cloud.node_specs], "passwords": str(pw_dir),
                    "cloud_public_key": public_raw(b.cloud_key.public_key()).hex(), "dsn": self.dsn,
                    "linger": self.args.linger}  # fmt: skip
            path = b.dir / f"{self.name}-sim{j}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the DSN's password
            with os.fdopen(fd, "w") as fh:
                json.dump(spec, fh)
            with (b.dir / f"{self.name}-sim{j}.log").open("ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, SCRIPT, "--child", str(path), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, cwd=ROOT)  # fmt: skip
            self.procs.append(proc)
            self.acked.append(0)
        for j, proc in enumerate(self.procs):
            while True:
                line = await self._line(proc, j)
                if line.get("state") == "ready":
                    break

    async def _line(self, proc: asyncio.subprocess.Process, j: int) -> dict[str, Any]:
        assert proc.stdout is not None  # noqa: S101 - PIPE was asked for
        raw = await proc.stdout.readline()
        if not raw:
            log = (self.bench.dir / f"{self.name}-sim{j}.log").read_text()[-3000:]
            raise RuntimeError(f"simulator {j} of {self.name} exited {await proc.wait()}: {log}")
        got: dict[str, Any] = json.loads(raw)
        return got

    async def _read(self, proc: asyncio.subprocess.Process, j: int) -> None:
        while True:
            line = await self._line(proc, j)
            if "acked" in line:
                self.acked[j] = int(line["acked"])
            if line.get("state") == "done":
                self.done.append(line)
                return

    def go(self) -> float:
        """Every simulator starts its uplinks (and generators) now; returns the wall time."""
        at = time.time()
        for proc in self.procs:
            assert proc.stdin is not None  # noqa: S101 - PIPE was asked for
            proc.stdin.write(b"go\n")
        self._readers = [asyncio.create_task(self._read(p, j)) for j, p in enumerate(self.procs)]
        return at

    def stop(self) -> None:
        """Every simulator ends its run now (what is not acked stays in its devices' buffers)."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(b"stop\n")

    def finished(self) -> bool:
        return len(self.done) == len(self.procs)

    async def wait(self, within: float | None = None) -> dict[str, Any]:
        """Until every simulator reported (after `within` s they are told to stop); their summed reports."""
        if within is not None:
            done, _ = await asyncio.wait(self._readers, timeout=within)
            if len(done) < len(self._readers):
                self.stop()
        await asyncio.gather(*self._readers)
        for proc in self.procs:
            await proc.wait()
        d = self.done
        acked_at = [x["acked_at"] for x in d]
        return {"acked": sum(x["acked"] for x in d), "complete": all(x["complete"] for x in d),
                "devices_done": sum(x["devices_done"] for x in d),
                "resent": sum(x["resent"] for x in d), "connects": sum(x["connects"] for x in d),
                "backlog": sum(x["backlog"] for x in d),
                "acked_at": max(acked_at) if all(a is not None for a in acked_at) else None,
                "sim_rss_peak_mib": [round(x["rss_peak_kib"] / 1024) for x in d]}  # fmt: skip

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()


async def start_workers(bench: Bench, n: int, db: str, tag: str) -> list[Worker]:
    workers = [bench.start_worker(f"{tag}-{k}", db) for k in range(n)]
    deadline = time.monotonic() + 60
    while not all(w.metric("edge_cloud_ingest_ready") == 1 for w in workers):
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.name} exited {w.proc.returncode}: {w.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("workers not ready within 60 s")
        await asyncio.sleep(0.2)
    return workers


async def settle(bench: Bench, within: float = 60.0) -> int:
    """Wait until EDGE_BATCHES is empty (late resends of acked batches are drained by this phase's
    workers, not the next phase's); returns what is left after `within`."""
    nc = await bench.nats()
    deadline = time.monotonic() + within
    try:
        while True:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                undelivered, in_flight, left = await consumer_state(nc)
                if not (undelivered or in_flight or left) or time.monotonic() > deadline:
                    return left
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def stream_leader(bench: Bench) -> str:
    nc = await bench.nats()
    try:
        info = await nc.jetstream().stream_info(BATCH_STREAM)
    finally:
        await nc.close()
    return str(info.cluster.leader if info.cluster else "")


@dataclass(slots=True)
class Storm:
    kill: bool
    events: int
    seconds: float  # uplinks start -> every event committed in PostgreSQL
    acked_s: float | None  # uplinks start -> every device heard every ack (None: not within --ack-grace)
    buffering_s: float
    devices_done: int  # devices whose buffer is empty (every batch acked) at the end
    check: Check
    resent: int
    connects: int
    killed: str
    peak_rss_kib: list[int]


async def storm(bench: Bench, args: argparse.Namespace, *, kill: bool) -> Storm:
    """(b): every device buffers its events offline, then all connect at once."""
    name = "storm_kill" if kill else "storm"
    dsn = bench.fresh_db(name)
    sims = Sims(bench, name, args, dsn, events=args.events, rate=None, offline=True)
    t0 = time.perf_counter()
    killed = ""
    try:
        await sims.start()  # keys registered before any worker starts
        buffering = time.perf_counter() - t0
        workers = await start_workers(bench, args.workers, name, name)

        async def chaos() -> str:
            while await stored(dsn) < sims.total * 0.3:  # noqa: ASYNC110 - polled in PostgreSQL
                await asyncio.sleep(0.1)
            leader = await stream_leader(bench)
            node = next(n for n in bench.cloud.node_specs if n.name == leader)
            cluster = bench.cloud.nats()
            victim = workers[0]
            victim.proc.kill()  # kill -9 of one worker with a group in hand, most likely
            cluster.kill(node)  # kill -9 of the node leading EDGE_BATCHES
            at = await stored(dsn)
            await asyncio.sleep(5.0)  # down 5 s, then restarted as its service manager would
            await asyncio.to_thread(cluster.start_node, node, 60)
            return f"worker {victim.name} and NATS node {node.name} (stream leader) at {at:,} events stored"

        go = sims.go()
        fault = asyncio.create_task(chaos()) if kill else None
        try:
            in_pg = None
            while time.time() - go < args.timeout:
                if await stored(dsn) >= sims.total:
                    in_pg = time.time()
                    break
                if sims.finished():
                    break
                await asyncio.sleep(0.25)
            if fault is not None:
                killed = await fault
            # the devices hear their acks (or resend after ack_timeout and hear the duplicate's)
            report = await sims.wait(within=args.ack_grace)
        finally:
            if fault is not None and not fault.done():
                fault.cancel()
            await settle(bench)
            rss = [w.peak_rss_kib() for w in workers if w.proc.poll() is None]
            bench.stop_workers()
    finally:
        sims.kill()
    acked_at = report["acked_at"]
    return Storm(kill, sims.total, (in_pg or time.time()) - go, None if acked_at is None else acked_at - go,
                 buffering, report["devices_done"], check_db(dsn, args.devices), report["resent"],
                 report["connects"], killed, rss)


async def stored(dsn: str) -> int:
    """Events committed so far (a batch's `n` commits with its events)."""

    def ask() -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT coalesce(sum(n), 0) FROM batches").fetchone()
        return int(row[0]) if row else 0

    return await asyncio.to_thread(ask)


@dataclass(slots=True)
class Steady:
    workers: int
    offered: float  # events/s configured
    achieved: float  # events acked / generation time
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    measured: int  # events in the percentiles (after the warm-up)
    check: Check
    complete: bool
    peak_rss_kib: list[int]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


async def steady(bench: Bench, args: argparse.Namespace, n_workers: int) -> Steady:
    """(c): every device generates `rate` events/s; latency = its event's ts (device clock) -> the signed
    ok ack of its batch on NATS (the worker publishes it only after COMMIT), same machine clock."""
    name = f"steady_{n_workers}"
    dsn = bench.fresh_db(name)
    per_device = args.rate / args.devices
    events = max(1, round(per_device * args.steady_seconds))
    sims = Sims(bench, name, args, dsn, events=events, rate=per_device, offline=False)
    nc = await bench.nats()
    listener = AckListener()
    await nc.subscribe(f"{subject_prefix(PREFIX)}.*.*.*.ack", cb=listener.on_msg)
    try:
        await sims.start()  # keys registered before any worker starts
        workers = await start_workers(bench, n_workers, name, name)
        try:
            go = sims.go()
            report = await sims.wait(within=args.steady_seconds + args.ack_grace)
            seconds = (report["acked_at"] or time.time()) - go
            await settle(bench)
            rss = [w.peak_rss_kib() for w in workers]
        finally:
            bench.stop_workers()
    finally:
        sims.kill()
        await nc.close()
    warm_until = (go + args.warmup) * 1000
    lat: list[float] = []
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tenant, store, device, seq, ts_ms FROM events").fetchall()
    for t, s, d, seq, ts_ms in rows:
        acked = listener.acks.get((t, s, d, int(seq)))
        if acked is not None and ts_ms >= warm_until:
            lat.append(acked - ts_ms)
    lat.sort()
    return Steady(n_workers, args.rate, report["acked"] / seconds, sims.total, percentile(lat, 0.5),
                  percentile(lat, 0.99), lat[-1] if lat else float("nan"), len(lat), check_db(dsn, args.devices),
                  report["complete"], rss)


async def part_b(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kill in (False, True):
        r = await storm(bench, args, kill=kill)
        label = "storm with kill -9" if kill else "storm"
        acked = "not within the grace" if r.acked_s is None else f"{r.acked_s:.1f} s"
        print(f"(b) {label}: {r.events:,} events from {args.devices} devices in PostgreSQL {r.seconds:.1f} s after "
              f"connecting ({r.buffering_s:.1f} s of buffering before); every ack heard: {acked}, "
              f"{r.devices_done}/{args.devices} devices emptied; {r.check.text(r.events)}; {r.resent} resent, "
              f"{r.connects} connects{'; killed ' + r.killed if r.killed else ''}", flush=True)  # fmt: skip
        out["kill" if kill else "normal"] = {
            "events": r.events, "seconds": round(r.seconds, 1),
            "acked_s": None if r.acked_s is None else round(r.acked_s, 1), "buffering_s": round(r.buffering_s, 1),
            "devices_done": r.devices_done, "check": r.check.text(r.events), "resent": r.resent,
            "connects": r.connects, "killed": r.killed, "peak_rss_mib": [round(k / 1024, 1) for k in r.peak_rss_kib],
            "verified": r.check.ok(r.events, None),
        }  # fmt: skip
    out["devices"] = args.devices
    out["target_met"] = out["normal"]["seconds"] <= TARGET_STORM_S and out["normal"]["verified"]
    out["verified"] = out["normal"]["verified"] and out["kill"]["verified"]
    return out


async def part_c(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"offered_per_s": args.rate, "devices": args.devices, "runs": {}}
    for n in args.steady_workers:
        r = await steady(bench, args, n)
        print(f"(c) steady {r.offered:,.0f} events/s offered ({args.devices} devices, {n} worker(s)), "
              f"{r.achieved:,.0f} acked/s: p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, max {r.max_ms:.0f} ms over "
              f"{r.measured:,} events; {r.check.text(r.events, UNSENT)}; peak RSS "
              f"{', '.join(f'{k / 1024:.0f}' for k in r.peak_rss_kib)} MiB", flush=True)  # fmt: skip
        out["runs"][n] = {
            "achieved_per_s": round(r.achieved), "events": r.events, "p50_ms": round(r.p50_ms),
            "p99_ms": round(r.p99_ms), "max_ms": round(r.max_ms), "measured": r.measured,
            "check": r.check.text(r.events, UNSENT), "peak_rss_mib": [round(k / 1024, 1) for k in r.peak_rss_kib],
            "verified": r.complete and r.check.ok(r.events, None),
        }  # fmt: skip
    out["verified"] = all(r["verified"] for r in out["runs"].values())
    return out


# ------------------------------------------------------------------------------ main


def print_table_a(a: dict[str, Any]) -> None:
    copy = max(a["copy_events_per_s"])
    print()
    print(f"(a) drain of a pre-filled stream: {a['events']:,} events in {a['batches']:,} batches of "
          f"{a['events'] // a['batches']:,}, {a['devices']} devices")  # fmt: skip
    print(f"    {'path':<38} {'events/s':>10} {'x COPY':>7} {'seconds':>8}  peak RSS per worker")
    print(f"    {'PostgreSQL COPY, same rows (baseline)':<38} {copy:>10,} {1.0:>7.2f} "
          f"{a['events'] / copy:>8.2f}  (runs: {', '.join(f'{c:,}' for c in a['copy_events_per_s'])} events/s)")
    for n, d in sorted(a["drain"].items()):
        tag = " (default)" if n == a["default_workers"] else ""
        rss = ", ".join(f"{m:.0f}" for m in d["peak_rss_mib"])
        print(f"    {f'JetStream -> {n} worker(s){tag}':<38} {d['events_per_s']:>10,} {d['events_per_s'] / copy:>7.2f} "
              f"{d['seconds']:>8.2f}  {rss} MiB")  # fmt: skip
    verdict = "met" if a["target_met"] else "NOT met"
    print(f"    target: default workers >= {TARGET_COPY_RATIO} x COPY: {a['ratio_to_copy']:.2f} x, "
          f"{'all verified' if a['verified'] else 'VERIFICATION FAILED'}: {verdict}")  # fmt: skip


def print_table_b(b: dict[str, Any]) -> None:
    print()
    n = b["normal"]
    print(f"(b) reconnect storm: {n['events']:,} events buffered offline by {b['devices']} devices, "
          "all connect at once")
    print(f"    {'run':<40} {'in PG s':>8} {'events/s':>9} {'acks s':>7} {'emptied':>8}  check")
    for key, label in (("normal", "storm"), ("kill", "storm, kill -9 of a NATS node + a worker")):
        r = b[key]
        rate = r["events"] / r["seconds"] if r["seconds"] else 0
        acked = "-" if r["acked_s"] is None else f"{r['acked_s']:.1f}"
        print(f"    {label:<40} {r['seconds']:>8.1f} {rate:>9,.0f} {acked:>7} {r['devices_done']:>8}  {r['check']}; "
              f"{r['resent']} resent")  # fmt: skip
    print(f"    killed: {b['kill']['killed']}")
    verdict = "met" if b["target_met"] else "NOT met"
    print(f"    target: all in PostgreSQL, verified, <= {TARGET_STORM_S:.0f} s: {verdict}; with kill -9: "
          f"{'0 lost, 0 duplicates, chains intact' if b['kill']['verified'] else 'VERIFICATION FAILED'}")  # fmt: skip


def print_table_c(c: dict[str, Any]) -> None:
    print()
    print(f"(c) steady rate: {c['offered_per_s']:,.0f} events/s offered by {c['devices']} devices; latency = event ts "
          "on the device -> its batch's signed ok ack (sent after COMMIT)")  # fmt: skip
    print(f"    {'workers':>7} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'measured':>9}  "
          "peak RSS per worker")
    for n, r in sorted(c["runs"].items()):
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mib"])
        print(f"    {n:>7} {r['achieved_per_s']:>9,} {r['p50_ms']:>8,} {r['p99_ms']:>8,} {r['max_ms']:>8,} "
              f"{r['measured']:>9,}  {rss} MiB; {r['check']}")  # fmt: skip


async def run(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "a" in args.parts:
        results["a"] = await part_a(bench, args)
    if "b" in args.parts:
        results["b"] = await part_b(bench, args)
    if "c" in args.parts:
        results["c"] = await part_c(bench, args)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small fleet (50 devices x 200 events, batches of 100)")
    ap.add_argument("--parts", default="a,b,c", help="which figures: comma-separated of a, b, c")
    ap.add_argument("--devices", type=int, default=None, help="devices (one per store); default 500")
    ap.add_argument("--events", type=int, default=None, help="events per device; default 2,000")
    ap.add_argument("--batch", type=int, default=None, help="events per batch in (a); default 1,000")
    ap.add_argument("--workers", type=int, default=2, help="the default worker count (one per core)")
    ap.add_argument("--scale", default=None, help="worker counts for (a); default 1,2,4")
    ap.add_argument("--rate", type=float, default=5000.0, help="(c): events/s of the whole fleet")
    ap.add_argument("--steady-seconds", type=float, default=None, help="(c): how long the steady rate runs")
    ap.add_argument("--steady-workers", default=None, help="(c): worker counts, comma-separated; default --workers")
    ap.add_argument("--warmup", type=float, default=None, help="(c): seconds after the uplinks start not measured")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds any one phase may take")
    ap.add_argument("--ack-grace", type=float, default=None,
                    help="(b), (c): seconds the devices get to hear every ack once it is stored / generated")
    ap.add_argument("--linger", type=float, default=None,
                    help="(b), (c): the devices' uplink.batch.linger in s (default: the edge default, 100 ms)")
    ap.add_argument("--sims", type=int, default=2, help="(b), (c): simulator processes sharing the devices")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (worker and NATS logs) in /tmp")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = ap.parse_args(argv)
    quick = args.quick
    args.devices = args.devices or (50 if quick else 500)
    args.events = args.events or (200 if quick else 2000)
    args.batch = args.batch or (100 if quick else 1000)
    args.steady_seconds = args.steady_seconds or (10.0 if quick else 60.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 10.0)
    if quick and args.rate == 5000.0:
        args.rate = 500.0
    args.ack_grace = args.ack_grace if args.ack_grace is not None else (20.0 if quick else 40.0)
    args.steady_workers = [int(x) for x in (args.steady_workers or str(args.workers)).split(",")]
    args.scale = [int(x) for x in (args.scale or ("1,2" if quick else "1,2,4")).split(",")]
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"a", "b", "c"}:
        ap.error("--parts takes a, b and c")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        configure_logging("warning", "json", sys.stderr)
        return asyncio.run(sim_child(json.loads(Path(args.child).read_text())))
    configure_logging("warning", "console")
    t0 = time.perf_counter()
    with local_cloud(args.devices, keep=args.keep) as bench:
        print(f"local cloud up in {time.perf_counter() - t0:.1f} s ({bench.dir})", flush=True)
        results = asyncio.run(run(bench, args))
    for part, show in (("a", print_table_a), ("b", print_table_b), ("c", print_table_c)):
        if part in results:
            show(results[part])
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(results, default=str))
    ok = all(r.get("verified", True) for r in results.values() if isinstance(r, dict))
    return 0 if ok else 1


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind, so the servers and workers of the run are stopped


if __name__ == "__main__":
    os.umask(0o022)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
