"""Fleet downlink benchmark (issue 16): config layers and consent shards reaching 500 devices.

    .venv/bin/python scripts/bench_fleet_downlink.py [--devices 500] [--parts d,e] [--json] [--keep]

One run starts its own local cloud (`cloud.cluster.local.up` in a temporary folder: 3 NATS nodes
with JetStream R3 and MQTT, PostgreSQL with the shipped schema, one MQTT user per store), two
`edge-cloud ingest` workers (cloud/fleetdemo.py's helpers: they store `status`, `reported` and
`cmd-result` in PostgreSQL), and the fleet simulator in this process with the downlink on
(cloud/fleetsim.py `FleetSpec.downlink`: per device the real uplink, downlink component,
DesiredState, ConsentSync and CommandRunner; one device per store, each logged in as its store).
The cloud side is the code `edge-cloud config set` and `edge-cloud consent revoke` run
(cloud/fleet/desired.py `set_layer`, cloud/fleet/consent.py `change`: version from PostgreSQL,
signed, audited, published retained over MQTT 3.1.1 with QoS 1).

(d) config: a store-layer change for every store, the 500 `config set --tenant T --store S`
    published at once (16 publishers, each its own PostgreSQL connection and MQTT session), a
    retention change (`buffer.retention.ble`: beyond drivers, so the device takes the restart
    path: validate, persist, restart, watch for the settle time, `applied`); then the same as
    ONE tenant layer. Clock: from just before the first publish to the moment every device's
    `reported` row in PostgreSQL (`fleet_device_state.reported`) shows the new layer version
    applied; per device the row's `reported_at` gives the percentiles.
(e) consent: one pseudonym granted (one shard), then revoked: clock from just before `change()`
    to every device having applied the shard's new revision (the devices' own ConsentSync, the
    withdrawn pseudonym out of its set, the buffer purge run) and to every `reported` row
    showing the shard count and no consented pseudonym.

Targets: each <= 10 s for 500 devices. `--devices N` for a quick run (e.g. 20). Exit 1 when a
phase did not complete within `--timeout` (the figures say which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402 - after the path insert
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from cloud.cluster.local import ADMIN, LocalCloud, down, up  # noqa: E402
from cloud.cluster.procs import free_port  # noqa: E402
from cloud.fleet.consent import Change, change  # noqa: E402
from cloud.fleet.desired import Target, set_layer  # noqa: E402
from cloud.fleet.layers import load_layer  # noqa: E402
from cloud.fleet.publish import Broker, Publisher  # noqa: E402
from cloud.fleetdemo import WorkerProcess, Workspace  # noqa: E402
from cloud.fleetsim import Fleet, FleetSpec, rss_kib  # noqa: E402
from cloud.keys import load_cloud_key  # noqa: E402
from edge.events import Ident  # noqa: E402
from edge.logs import configure_logging  # noqa: E402
from edge.privacy.pseudonym import stable_pseudonym  # noqa: E402
from edge.wire.downlink import consent_shard  # noqa: E402

TENANT = "bench"
TARGET_S = 10.0
PUBLISHERS = 16  # concurrent `config set`s (each a PostgreSQL connection and an MQTT session)
WORKERS = 2
THREADS = 32  # the simulator's thread pool (see run())
POLL_S = 0.1
ACTOR = "bench_fleet_downlink"

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


@dataclass(slots=True)
class Bench:
    dir: Path
    cloud: LocalCloud
    ws: Workspace
    key: Ed25519PrivateKey
    broker: Broker
    dsn: str
    spec: FleetSpec
    workers: list[WorkerProcess]


@contextlib.contextmanager
def local_cloud(devices: int, keep: bool) -> Iterator[Bench]:
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-downlink-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL's own user (when run as root) must reach its folder
    stores = [f"{TENANT}/store-{i:04d}" for i in range(1, devices + 1)]  # FleetSpec.ids
    cloud = None
    workers: list[WorkerProcess] = []
    try:
        try:
            cloud = up(base / "cloud", stores=stores)
        except BaseException:
            with contextlib.suppress(Exception):
                down(base / "cloud")
            raise
        ws = Workspace.of(cloud)
        public = ws.cloud_public_key()
        for k in range(1, WORKERS + 1):
            port = free_port()
            workers.append(WorkerProcess(f"worker-{k}", ws.worker_config(f"worker-{k}", port),
                                         ws.root / f"worker-{k}.log", port))  # fmt: skip
        nodes = cloud.node_specs
        dsn = cloud.postgres().dsn
        spec = FleetSpec(devices=devices, events=0, broker=nodes[0].mqtt_url, state=ws.devices,
                         keys_dir=ws.root / "device-keys", cloud_public_key=public, prefix=cloud.state.prefix,
                         tenant=TENANT, registry_dsn=dsn, credentials=ws.credentials(stores),
                         downlink=True)  # fmt: skip
        broker = Broker(urls=[n.mqtt_url for n in nodes], user=ADMIN, password=cloud.state.passwords[ADMIN],
                        prefix=cloud.state.prefix)  # fmt: skip
        yield Bench(base, cloud, ws, load_cloud_key(ws.cloud_key), broker, dsn, spec, workers)
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                w.stop()
        if cloud is not None:
            with contextlib.suppress(Exception):
                cloud.nats().stop()
            with contextlib.suppress(Exception):
                cloud.postgres().stop()
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------ measuring


@dataclass(slots=True)
class Reach:
    """How long until every device got there: seen in-process and in PostgreSQL's `reported` rows."""

    name: str
    devices: int
    publish_s: float  # from the first publish until the last was acknowledged by the broker
    devices_s: float | None  # every device applied it (its own state, in this process)
    reported_s: float | None  # every device's `reported` row in PostgreSQL shows it
    reported_p50_s: float | None = None  # per device: `reported_at` - start
    reported_p99_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.devices_s is not None and self.reported_s is not None

    def as_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "publish_s": r3(self.publish_s), "devices_s": r3(self.devices_s),
                "reported_s": r3(self.reported_s), "reported_p50_s": r3(self.reported_p50_s),
                "reported_p99_s": r3(self.reported_p99_s), "target_s": TARGET_S,
                "met": self.ok and (self.reported_s or 0) <= TARGET_S}  # fmt: skip


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def reported_times(conn: Conn, where: str, params: Sequence[Any]) -> list[float]:
    """`reported_at` (Unix s) of the tenant's devices whose `reported` matches `where`."""
    # `where` is one of this module's constants; the values go as parameters
    sql = "SELECT extract(epoch FROM reported_at)::float8 FROM fleet_device_state WHERE tenant = %s AND " + where  # noqa: S608
    cur = await conn.execute(sql.encode(), (TENANT, *params))
    return [float(r[0]) for r in await cur.fetchall()]


async def measure(  # noqa: PLR0917 - one phase's whole context
    name: str, bench: Bench, fleet: Fleet, conn: Conn, publish: Callable[[], Coroutine[Any, Any, float]],
    on_device: Callable[[Fleet], int], where: str, params: Sequence[Any], within: float,
) -> Reach:
    """Run `publish`; poll the devices (`on_device` counts those there) and PostgreSQL (`where`)."""
    n = len(fleet.devices)
    wall0, t0 = time.time(), time.perf_counter()
    pub = asyncio.create_task(publish())
    devices_s = reported_s = None
    times: list[float] = []
    deadline = t0 + within
    while time.perf_counter() < deadline and (devices_s is None or reported_s is None):
        if devices_s is None and on_device(fleet) >= n:
            devices_s = time.perf_counter() - t0
        if reported_s is None:
            times = await reported_times(conn, where, params)
            if len(times) >= n:
                reported_s = time.perf_counter() - t0
        if pub.done() and pub.exception() is not None:
            break
        await asyncio.sleep(POLL_S)
    if not pub.done():
        print(f"  {name}: the publish is still running after {within:.0f} s; waiting for it", flush=True)
    publish_s = await pub  # raises what the publish raised
    rel = [max(0.0, t - wall0) for t in times]
    reach = Reach(name, n, publish_s, devices_s, reported_s)
    if rel:
        reach.reported_p50_s, reach.reported_p99_s = percentile(rel, 0.5), percentile(rel, 0.99)
    if not reach.ok:
        got = sum(1 for d in fleet.devices if d.downlink is not None and d.downlink.received)
        print(f"  {name}: INCOMPLETE after {within:.0f} s (publish took {publish_s:.1f} s): {on_device(fleet)} "
              f"devices applied, {len(times)} reported rows; {got} devices received any downlink message so far",
              flush=True)  # fmt: skip
    return reach


def layer_file(bench: Bench, name: str, text: str) -> dict[str, Any]:
    """The layer as `config set FILE.yaml` reads it (checked against the edge's models)."""
    path = bench.dir / f"{name}.yaml"
    path.write_text(text)
    return load_layer(path)


def applied(layer: str, ver: int) -> Callable[[Fleet], int]:
    def count(fleet: Fleet) -> int:
        n = 0
        for d in fleet.devices:
            dl = d.downlink
            res = dl.desired.apply_result() if dl is not None else None
            if dl is not None and dl.desired.layers().get(layer) == ver and res is not None \
                    and (res.get("state"), res.get("layer"), res.get("ver")) == ("applied", layer, ver):
                n += 1
        return n

    return count


REPORTED_APPLIED = ("(reported->'layers'->>%s)::int = %s AND reported->'apply'->>'state' = 'applied'"
                    " AND reported->'apply'->>'layer' = %s AND (reported->'apply'->>'ver')::int = %s")


async def part_d(bench: Bench, fleet: Fleet, conn: Conn, within: float) -> dict[str, Any]:
    """500 store layers at once, then one tenant layer (see the module doc)."""
    stores = [bench.spec.ids(i)[1] for i in range(1, bench.spec.devices + 1)]
    store_cfg = layer_file(bench, "store-layer", "buffer:\n  retention:\n    ble: 3d\n")

    async def publish_stores() -> float:
        t0 = time.perf_counter()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for s in stores:
            queue.put_nowait(s)

        async def publisher() -> None:
            async with await psycopg.AsyncConnection.connect(bench.dsn) as c, Publisher(bench.broker) as pub:
                while not queue.empty():
                    store = queue.get_nowait()
                    await set_layer(c, pub, bench.key, ACTOR, Target(TENANT, store), store_cfg)

        await asyncio.gather(*(publisher() for _ in range(min(PUBLISHERS, len(stores)))))
        return time.perf_counter() - t0

    store = await measure("store layers", bench, fleet, conn, publish_stores, applied("store", 1),
                          REPORTED_APPLIED, ("store", 1, "store", 1), within)  # fmt: skip
    tenant_cfg = layer_file(bench, "tenant-layer", "buffer:\n  retention:\n    nfc: 10d\n")

    async def publish_tenant() -> float:
        t0 = time.perf_counter()
        async with Publisher(bench.broker) as pub:
            await set_layer(conn, pub, bench.key, ACTOR, Target(TENANT), tenant_cfg)
        return time.perf_counter() - t0

    tenant = await measure("tenant layer", bench, fleet, conn, publish_tenant, applied("tenant", 1),
                           REPORTED_APPLIED, ("tenant", 1, "tenant", 1), within)  # fmt: skip
    restarts = sum(d.downlink.restarts for d in fleet.devices if d.downlink is not None)
    return {"store_layers": store.as_dict(), "tenant_layer": tenant.as_dict(), "restarts_in_process": restarts,
            "verified": store.ok and tenant.ok}  # fmt: skip


def shard_at(shard: str, rev: int) -> Callable[[Fleet], int]:
    def count(fleet: Fleet) -> int:
        return sum(1 for d in fleet.devices if d.rt.consent_sync is not None
                   and d.rt.consent_sync.revs().get(shard) == rev)  # fmt: skip

    return count


REPORTED_CONSENT = "reported->'consent' = %s::jsonb"


async def part_e(bench: Bench, fleet: Fleet, conn: Conn, within: float) -> dict[str, Any]:
    """One pseudonym granted, then revoked; every device subscribes to the tenant's shards."""
    # a stable pseudonym as every store of a tenant computes it (here: a tenant key made for the run)
    pseudonym = stable_pseudonym(Ident("loyalty_id", "4006381333931"), secrets.token_hex(4), secrets.token_bytes(32))
    if pseudonym is None:
        raise RuntimeError("no stable pseudonym for a loyalty id")
    shard = consent_shard(pseudonym)
    results: dict[str, Any] = {"shard": shard}
    steps: list[tuple[int, Change, int]] = [(1, "grant", 1), (2, "revoke", 0)]
    for rev, what, members in steps:

        async def publish(what: Change = what) -> float:
            t0 = time.perf_counter()
            async with Publisher(bench.broker) as pub:
                await change(conn, pub, bench.key, ACTOR, TENANT, what, [pseudonym])
            return time.perf_counter() - t0

        expect = json.dumps({"shards": 1, "pseudonyms": members})
        reach = await measure(f"consent {what}", bench, fleet, conn, publish, shard_at(shard, rev),
                              REPORTED_CONSENT, (expect,), within)  # fmt: skip
        results[what] = reach.as_dict()
        results.setdefault("verified", True)
        results["verified"] = results["verified"] and reach.ok
    purged = sum(1 for d in fleet.devices if d.rt.consent_sync is not None and pseudonym not in d.rt.consent_sync)
    results["devices_without_it"] = purged
    return results


# ------------------------------------------------------------------------------ the run


async def wait_fleet_ready(fleet: Fleet, conn: Conn, within: float) -> float:
    """Every uplink online and every device's first `reported` stored."""
    t0 = time.perf_counter()
    n = len(fleet.devices)
    while time.perf_counter() - t0 < within:
        if fleet.online() >= n and len(await reported_times(conn, "reported IS NOT NULL", ())) >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.5)
    stored = len(await reported_times(conn, "reported IS NOT NULL", ()))
    sent = sum(1 for d in fleet.devices if d.downlink is not None and d.downlink.reported)
    raise RuntimeError(f"fleet not ready after {within:.0f} s: {fleet.online()} of {n} online, {sent} sent "
                       f"`reported`, {stored} stored")


SUBS_PER_DEVICE = 6  # QoS 1 filters: the uplink's ack, three desired layers, the consent shards, commands


def mqtt_consumers(bench: Bench) -> int | None:
    """JetStream consumers on `$MQTT_msgs` (one per QoS 1 subscription), from node 1's monitoring port."""
    node = bench.cloud.node_specs[0]
    url = f"http://{node.host}:{node.http_port}/jsz?accounts=true&streams=true"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    for acc in doc.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st.get("name") == "$MQTT_msgs":
                return int(st.get("state", {}).get("consumer_count", 0))
    return None


async def run(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"devices": args.devices}
    # every device runs its blocking steps (validation, fsync'd state files, SQLite) in threads; a
    # real device has its own, here they share one pool: wider than asyncio's default of cores + 4
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="fleetsim"))
    rss0 = rss_kib()[0]
    fleet = Fleet(bench.spec)
    t = time.perf_counter()
    await fleet.open()  # keys into the registry before any worker starts (cloud/fleetdemo.py)
    results["fleet_open_s"] = round(time.perf_counter() - t, 1)
    try:
        for w in bench.workers:
            w.start()
        for w in bench.workers:
            await asyncio.to_thread(w.wait_ready)
        async with await psycopg.AsyncConnection.connect(bench.dsn, autocommit=True) as conn:
            await fleet.start()
            results["fleet_ready_s"] = round(await wait_fleet_ready(fleet, conn, args.timeout), 1)
            print(f"fleet       {len(fleet.devices)} devices online, first `reported` stored "
                  f"(opened in {results['fleet_open_s']} s, ready in {results['fleet_ready_s']} s)", flush=True)
            consumers = await asyncio.to_thread(mqtt_consumers, bench)
            results["mqtt_consumers"] = consumers
            if consumers is not None and consumers < SUBS_PER_DEVICE * len(fleet.devices):
                print(f"WARNING     only {consumers} JetStream consumers on $MQTT_msgs for "
                      f"{SUBS_PER_DEVICE * len(fleet.devices)} QoS 1 subscriptions: the broker refused some "
                      f"(see the NATS log, --keep); their devices get nothing on them", flush=True)  # fmt: skip
            if "d" in args.parts:
                results["d"] = await part_d(bench, fleet, conn, args.timeout)
            if "e" in args.parts:
                results["e"] = await part_e(bench, fleet, conn, args.timeout)
        now, peak = rss_kib()
        results["rss_kib"] = {"start": rss0, "now": now, "peak": peak,
                              "per_device": round((peak - rss0) / max(1, len(fleet.devices)), 1)}  # fmt: skip
        results["dropped"] = sum(sum(d.downlink.dropped.values()) for d in fleet.devices if d.downlink is not None)
    finally:
        await fleet.close()
    return results


def line(name: str, r: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "   -  " if x is None else f"{x:6.2f}"

    verdict = "MET" if r["met"] else "MISSED"
    return (f"  {name:<22} publish {s(r['publish_s'])} s  devices applied {s(r['devices_s'])} s  "
            f"reported (PostgreSQL) {s(r['reported_s'])} s  [p50 {s(r['reported_p50_s'])}, "
            f"p99 {s(r['reported_p99_s'])}]  target <= {TARGET_S:.0f} s: {verdict}")  # fmt: skip


def print_results(res: dict[str, Any]) -> None:
    n = res["devices"]
    if "d" in res:
        d = res["d"]
        print(f"(d) a store-layer config change to {n} devices (real downlink, reported in PostgreSQL)")
        print(line(f"{n} store layers", d["store_layers"]))
        print(line("1 tenant layer", d["tenant_layer"]))
    if "e" in res:
        e = res["e"]
        print(f"(e) a consent shard update to {n} devices")
        print(line("grant (rev 1)", e["grant"]))
        print(line("revoke (rev 2)", e["revoke"]))
    rss = res.get("rss_kib")
    if rss:
        print(f"  simulator RSS {rss['start'] // 1024} MiB at start, {rss['peak'] // 1024} MiB peak "
              f"({rss['per_device']} KiB per device); downlink messages dropped: {res.get('dropped')}")  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=500, help="devices (one per store); default 500")
    ap.add_argument("--parts", default="d,e", help="which figures: comma-separated of d, e")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any one phase may take")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (worker and NATS logs) in /tmp")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = ap.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"d", "e"}:
        ap.error("--parts takes d and e")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", "console")
    t0 = time.perf_counter()
    with local_cloud(args.devices, args.keep) as bench:
        print(f"local cloud up in {time.perf_counter() - t0:.1f} s ({bench.dir})", flush=True)
        results = asyncio.run(run(bench, args))
    print_results(results)
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
