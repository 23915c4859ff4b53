"""The fleet demo: a chain of simulated stores on a local cloud, checked from PostgreSQL.

`edge-cloud fleet-demo --dir DIR --stores N [--events M]` is the chain's counterpart of
`./scripts/demo`, one command from nothing to a verdict:

1. `edge-cloud up` in DIR (cloud/cluster/local.py): 3 NATS nodes and PostgreSQL, started (and on
   first use initialized) with MQTT credentials for the stores demo/store-0001..N;
2. two ingest workers, `edge-cloud ingest` subprocesses, each with a config written here
   (DIR/fleet-demo/worker-K.yaml: the worker's NATS user, PostgreSQL, the demo's cloud key);
3. the fleet simulator (cloud/fleetsim.py): one device per store on the real uplink, each logged
   in with its store's credentials, its key registered in PostgreSQL's device registry;
4. a summary checked from PostgreSQL alone (cloud/db/audit.py): every event each device ever
   made is stored (its buffer's next id - 1, nothing left in it), none twice, every chain
   intact, no raw identifier in the stored data, nothing of the demo's stores quarantined.

Exit 0 only when all of that holds. The workers are stopped (SIGTERM) at the end; the cluster
keeps running for inspection (`edge-cloud down --dir DIR` stops it). Devices keep their state in
DIR/fleet-demo/devices, so a second run continues their chains and the check covers every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from cloud.cluster.local import WORKER, LocalCloud, up
from cloud.cluster.natsconf import store_user_name
from cloud.cluster.procs import HOST, free_port
from cloud.db.audit import Audit, audit
from cloud.fleetsim import Fleet, FleetReport, FleetSpec, device_config
from cloud.keys import create_cloud_key, load_cloud_key, public_info
from edge.buffer.stats import read_stats
from edge.errors import EdgeError

TENANT = "demo"
WORKERS = 2
SUBDIR = "fleet-demo"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

Say = Callable[[str], None]


class DemoError(EdgeError):
    """The demo could not run (a worker did not start, the cloud did not come up)."""


def store_ids(n: int) -> list[str]:
    """The demo's stores, as `edge-cloud up --store` takes them: demo/store-0001, ... (fleetsim's ids)."""
    return [f"{TENANT}/store-{i:04d}" for i in range(1, n + 1)]


def _secret(path: Path, value: str) -> Path:
    """A one-line secret file, mode 0600 (rewritten each run: passwords are the cloud's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    tmp.replace(path)
    return path


@dataclass(slots=True)
class Workspace:
    """DIR/fleet-demo: secrets, the cloud key, worker configs and logs, device state."""

    cloud: LocalCloud
    root: Path

    @classmethod
    def of(cls, cloud: LocalCloud) -> Workspace:
        root = cloud.dir / SUBDIR
        root.mkdir(mode=0o700, exist_ok=True)
        return cls(cloud, root)

    @property
    def devices(self) -> Path:
        return self.root / "devices"

    @property
    def cloud_key(self) -> Path:
        return self.root / "cloud.key"

    def cloud_public_key(self) -> str:
        """The demo's cloud key (made on first use): workers sign with it, devices trust it."""
        if not self.cloud_key.exists():
            create_cloud_key(self.cloud_key)
        return public_info(load_cloud_key(self.cloud_key)).public_key

    def credentials(self, stores: list[str]) -> dict[str, tuple[str, Path]]:
        """store -> (MQTT user, password file) for each demo store (the cloud's generated passwords)."""
        out: dict[str, tuple[str, Path]] = {}
        for key in stores:
            tenant, store = key.split("/")
            user = store_user_name(tenant, store)
            out[store] = (user, _secret(self.root / "secrets" / f"{user}.password", self.cloud.state.passwords[user]))
        return out

    def worker_config(self, name: str, metrics_port: int) -> Path:
        """An ingest worker's YAML (config/cloud.yaml's options; passwords in files beside it)."""
        state = self.cloud.state
        pg = self.cloud.postgres()
        nats_pw = _secret(self.root / "secrets" / "nats-worker.password", state.passwords[WORKER])
        pg_pw = _secret(self.root / "secrets" / "postgres.password", pg.password)
        servers = "".join(f"\n    - {n.client_url}" for n in self.cloud.node_specs)
        text = (
            f"# written by edge-cloud fleet-demo (cloud/fleetdemo.py); config/cloud.yaml explains every option\n"
            f"nats:\n  servers:{servers}\n  user: {WORKER}\n  password_file: {nats_pw}\n"
            f"postgres:\n  dsn: postgresql://{pg.role}@{pg.host}:{pg.port}/{pg.database}\n  password_file: {pg_pw}\n"
            f"cloud_key: {self.cloud_key}\n"
            f"prefix: {state.prefix}\n"
            f"backoff:\n  initial: 200ms\n  max: 2s\n"
            f"metrics:\n  listen: {HOST}:{metrics_port}\n  lag_interval: 1s\n"
            f"logging:\n  level: info\n  format: json\n"
        )  # fmt: skip
        path = self.root / f"{name}.yaml"
        path.write_text(text)
        path.chmod(0o600)
        return path


@dataclass(slots=True)
class WorkerProcess:
    """One `edge-cloud ingest` subprocess (JSON logs to `log`)."""

    name: str
    config: Path
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            cmd = [sys.executable, "-m", "cloud.cli", "ingest", "--config", str(self.config)]
            # our own interpreter and a config we wrote: no untrusted input
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return False
        return any(line.split() == ["edge_cloud_ingest_ready", "1.0"] for line in text.splitlines())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise DemoError(f"ingest worker {self.name} exited ({code}) before it was ready",
                                hint=f"see {self.log}")
            if time.monotonic() > deadline:
                raise DemoError(f"ingest worker {self.name} not ready after {timeout:.0f} s", hint=f"see {self.log}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT); the exit code (None: never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


@dataclass(slots=True, frozen=True)
class StoreCheck:
    store: str
    device: str
    sent: int  # every event the device ever made: its buffer's next id - 1 (all runs)
    left: int  # events still in its buffer (unsealed or unacked)
    stored: int


@dataclass(slots=True)
class Summary:
    stores: int
    events_per_store: int
    generated: int  # this run
    acked: int  # this run
    complete: bool  # the simulator saw every event acked
    checks: list[StoreCheck]
    audit: Audit
    seconds: dict[str, float] = field(default_factory=dict)
    workers_exit: list[int | None] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.checks)

    @property
    def stored(self) -> int:
        return sum(c.stored for c in self.checks)

    @property
    def left(self) -> int:
        return sum(c.left for c in self.checks)

    @property
    def verdicts(self) -> dict[str, bool]:
        a = self.audit
        return {
            "every event acked": self.complete and self.acked == self.generated and self.left == 0,
            "events sent = stored": all(c.sent == c.stored for c in self.checks) and a.events == self.sent,
            "duplicates 0": a.duplicates == 0,
            "chains intact": a.chains_intact and len(a.devices) == self.stores,
            "raw identifiers 0": not a.findings,
            "quarantined 0": a.rejected == 0,
            "workers stopped cleanly": all(code == 0 for code in self.workers_exit),
        }

    @property
    def ok(self) -> bool:
        return all(self.verdicts.values())

    def as_dict(self) -> dict[str, Any]:
        a = self.audit
        return {
            "ok": self.ok, "stores": self.stores, "events_per_store": self.events_per_store,
            "generated": self.generated, "acked": self.acked, "sent_all_runs": self.sent, "stored": self.stored,
            "left_in_buffers": self.left, "duplicates": a.duplicates, "batches": a.batches,
            "chains_intact": a.chains_intact, "raw_identifiers": len(a.findings), "quarantined": a.rejected,
            "verdicts": self.verdicts, "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "workers_exit": self.workers_exit,
        }  # fmt: skip


def check(dsn: str, spec: FleetSpec) -> tuple[list[StoreCheck], Audit]:
    """Each device's buffer (what it made, what is left) against what PostgreSQL holds."""
    with psycopg.connect(dsn) as conn:
        result = audit(conn, tenant=spec.tenant, stores=[spec.ids(i)[1] for i in range(1, spec.devices + 1)])
    checks = []
    for i in range(1, spec.devices + 1):
        tenant, store, device = spec.ids(i)
        stats = read_stats(device_config(spec, i).buffer_path)
        left = sum(b.events for b in stats.backlog.values())
        pending = stats.batches_pending + stats.batches_quarantined
        checks.append(StoreCheck(store, device, stats.next_event_id - 1, left + pending,
                                 result.stored((tenant, store, device))))  # fmt: skip
    return checks, result


def run_demo(dir: Path, *, stores: int, events: int, timeout: float = 300.0, say: Say = print) -> Summary:
    """Everything `edge-cloud fleet-demo` does (see the module doc); the summary says whether it held."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    ids = store_ids(stores)
    cloud = up(dir, stores=ids)
    times["cloud_up"] = time.perf_counter() - t0
    nodes = cloud.node_specs
    say(f"cloud       3 NATS nodes ({' '.join(n.mqtt_url for n in nodes)} MQTT), PostgreSQL "
        f"{cloud.state.pg_port}; up in {times['cloud_up']:.1f} s ({cloud.dir})")  # fmt: skip
    ws = Workspace.of(cloud)
    public = ws.cloud_public_key()
    workers = []
    for k in range(1, WORKERS + 1):
        port = free_port()
        workers.append(WorkerProcess(f"worker-{k}", ws.worker_config(f"worker-{k}", port), ws.root / f"worker-{k}.log",
                                     port))  # fmt: skip
    pg_dsn = cloud.postgres().dsn
    spec = FleetSpec(
        devices=stores, events=events, broker=nodes[0].mqtt_url, state=ws.devices, keys_dir=ws.root / "device-keys",
        cloud_public_key=public, prefix=cloud.state.prefix, tenant=TENANT, timeout=timeout,
        registry_dsn=pg_dsn, credentials=ws.credentials(ids),
    )  # fmt: skip
    report, exits = asyncio.run(_run(spec, workers, times, say, ws.root))
    checks, result = check(pg_dsn, spec)
    times["total"] = time.perf_counter() - t0
    return Summary(stores, events, report.generated, report.acked, report.complete, checks, result, times, exits)


async def _run(spec: FleetSpec, workers: list[WorkerProcess], times: dict[str, float], say: Say,
               root: Path) -> tuple[FleetReport, list[int | None]]:  # fmt: skip
    """Open the fleet (keys registered), start the workers, run the fleet, stop the workers.

    The keys go into the registry before any worker starts: a worker reads the registry at
    start and again on a miss at most once a second, and a batch refused `unknown-key` is not
    answered (its device resends only after `ack_timeout`)."""
    last = [0.0]
    total = spec.devices * spec.events

    def progress(fleet: Fleet) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            say(f"fleet       {fleet.acked()} of {total} events acked")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # only the main thread gets signals
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    fleet = Fleet(spec, on_progress=progress)
    t = time.perf_counter()
    await fleet.open()
    times["fleet_open"] = time.perf_counter() - t
    say(f"devices     {len(fleet.devices)} simulated stores open, keys in the device registry "
        f"({times['fleet_open']:.1f} s)")  # fmt: skip
    running = False
    try:
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            await asyncio.to_thread(w.wait_ready)
        times["workers_ready"] = time.perf_counter() - t
        say(f"workers     {len(workers)} ingest workers ready in {times['workers_ready']:.1f} s "
            f"(configs and logs in {root})")  # fmt: skip
        t = time.perf_counter()
        running = True
        report = await fleet.run(stop)  # it closes the fleet itself
        times["fleet"] = time.perf_counter() - t
    finally:
        if not running:
            await fleet.close()
        exits = [await asyncio.to_thread(w.stop) for w in workers]
    return report, exits


def format_summary(s: Summary, dir: Path) -> str:
    d = s.as_dict()
    a = s.audit
    lines = [
        "",
        f"fleet demo: {s.stores} stores x {s.events_per_store} events, checked from PostgreSQL",
        f"  generated         {s.generated} events this run, {s.acked} acked (signed by the cloud key)",
        f"  sent (all runs)   {s.sent} events, {s.left} left in device buffers",
        f"  stored            {s.stored} events in {a.batches} batches",
        f"  duplicates        {a.duplicates}",
        f"  chains            {'intact' if a.chains_intact else 'BROKEN'} on {len(a.devices)} device(s)",
        f"  raw identifiers   {len(a.findings)}",
        f"  quarantined       {a.rejected}",
        f"  time              {d['seconds'].get('total', 0)} s (cloud up {d['seconds'].get('cloud_up', 0)} s, "
        f"fleet {d['seconds'].get('fleet', 0)} s)",
    ]
    for c in s.checks:
        if c.sent != c.stored or c.left:
            lines.append(f"  {c.store}/{c.device}: sent {c.sent}, stored {c.stored}, left {c.left}")
    for dev in a.devices.values():
        for problem in dev.chain_problems:
            lines.append(f"  {dev.store}/{dev.device}: {problem}")
    for f in a.findings[:20]:
        lines.append(f"  raw identifier: {f}")
    failed = [k for k, v in s.verdicts.items() if not v]
    lines.append("OK: every check holds" if not failed else "FAILED: " + ", ".join(failed))
    lines.append(f"the cluster keeps running for inspection; stop it with: edge-cloud down --dir {dir}")
    return "\n".join(lines)
