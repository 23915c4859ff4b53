"""Fleet management (downlink-v1, issue 16) through the whole chain on real processes: a real
`edge run` daemon (simulated drivers; restarted on exit 75 as systemd does) speaking MQTT 3.1.1
to a node of the real 3-node NATS cluster with its store's credentials, a real `edge-cloud
ingest` worker storing `status`, `reported` and `cmd-result` in a real PostgreSQL, and the real
`edge-cloud` commands run as subprocesses, as an operator runs them.

What must hold:
- `config set --device` of a driver option is applied live, reported, stored and shown by
  `fleet status` (`applied`, the new device layer ver); a layer that makes a driver fail is
  rolled back and `fleet status --problems` shows it `rolled-back` with the reason;
- `cmd send --wait`: `status` answered and stored in PostgreSQL; `restart` drains, exits 75 and
  comes back online; `keys.rotate` shreds the old ephemeral key file;
- consent: a customer consented with `consent grant` is pseudonymized stably; `consent revoke`
  erases the cloud's stored events and, within seconds, every buffered unsent event of the
  device carrying the pseudonym (read from its SQLite buffer); neither `reported` nor the
  daemon's log ever carries it;
- a daemon killed (-9) is marked offline by its last will and listed by `--problems`.

The sandbox's kernel clock is not NTP-synchronized, and a device refuses commands while it
cannot estimate the time (edge/downlink/seen.py). Before the daemon starts, the test records
with the device's own SeenIds that the clock was synchronized a moment ago in this boot (what
timesyncd would have let it observe), so commands run by the spec's estimate rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import secrets
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import psycopg
import pytest
import yaml
from support.nats import RunningNats
from test_cloud_daemon_e2e import CLOUD_PUBLIC, STORE, TENANT
from test_cloud_ingest_worker import EDGE_CLOUD, Fleet, Worker, stop_gracefully
from test_integration import EDGE, edge
from test_receiver import cloud_key_file

from cloud.db.migrate import migrate
from cloud.db.registry import add_device
from cloud.fleet.publish import Broker, Publisher
from edge.buffer.bounds import boot_id
from edge.buffer.schema import decode_batch_events, decode_body
from edge.clock import SystemClock
from edge.downlink.seen import SeenIds
from edge.events import Ident
from edge.privacy.keys import tenant_kid
from edge.privacy.pseudonym import stable_pseudonym
from edge.wire.downlink import consent_shard

# nats-py (the worker helpers) may leave a socket unclosed when a worker stops
pytestmark = [pytest.mark.cloud, pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")]

TENANT_KEY = bytes(range(140, 172))  # a test tenant key, the devices' and the cloud's
LOYALTY = "512345678901"  # not in the POS simulation's customer pool (those start with 9)
WAIT = 30.0


class _SyncedNow(SystemClock):
    def synchronized(self) -> bool:
        return True


def _clock_seen_synchronized(state: Path) -> None:
    """Record in the device's commands.db that its clock was synchronized now, in this boot."""
    seen = SeenIds(state, _SyncedNow(), boot_id())
    try:
        seen.observe()
    finally:
        seen.close()


class Daemon:
    """`edge run`, started again whenever it exits 75 (as the systemd unit does)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.exits: list[int] = []
        self.log_path = config.parent / "daemon.log"
        self._log = self.log_path.open("ab")
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stopping:
            self._proc = await asyncio.create_subprocess_exec(
                EDGE, "run", "--config", str(self.config), cwd=self.config.parent, stdout=self._log,
                stderr=self._log)
            rc = await self._proc.wait()
            self.exits.append(rc)
            if rc != 75:
                return

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the running process (SIGKILL: a crash) and wait for the loop to end."""
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)
        try:
            await asyncio.wait_for(self._task, 30)
        finally:
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
            self._log.close()
        return self.exits[-1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Chain:
    """One device's whole chain: its config, its daemon, the worker, the operator's environment."""

    tmp: Path
    cluster: RunningNats
    dsn: str
    device: str
    config: Path
    fleet: Fleet
    env: dict[str, str]
    worker: Worker | None = None
    daemon: Daemon | None = None
    layers: int = 0  # device layers written so far (their file names)
    retained: set[str] = field(default_factory=set)  # topics the test made the cloud retain

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    async def cli(self, *args: str, rc: int = 0) -> str:
        """`edge-cloud ARGS` as a subprocess; its stdout (exit status `rc` asserted)."""
        res = await asyncio.to_thread(subprocess.run, [str(EDGE_CLOUD), *args], capture_output=True, text=True,
                                      timeout=60, env=self.env, cwd=self.tmp, check=False)
        assert res.returncode == rc, f"edge-cloud {' '.join(args)}: exit {res.returncode}\n{res.stdout}{res.stderr}"
        return res.stdout

    async def set_layer(self, config: dict[str, Any]) -> str:
        self.layers += 1
        path = self.tmp / f"layer-{self.layers}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.retained.add(f"edge/v1/{TENANT}/{STORE}/{self.device}/desired")
        return await self.cli("config", "set", "--tenant", TENANT, "--store", STORE, "--device", self.device,
                              str(path))

    async def row(self, *flags: str) -> dict[str, Any] | None:
        """This device's row of `fleet status --json` (with `flags`), None when not listed."""
        out = await self.cli("fleet", "status", "--tenant", TENANT, "--store", STORE, "--json", *flags)
        return next((r for r in json.loads(out) if r["device"] == self.device), None)

    async def until_row(self, pred: Callable[[dict[str, Any]], bool], what: str, *flags: str,
                        within: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + within
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = await self.row(*flags)
            if last is not None and pred(last):
                return last
            await asyncio.sleep(0.5)
        log = self.daemon.log()[-3000:] if self.daemon is not None else ""
        control = {}
        if self.worker is not None and self.worker.proc.poll() is None:
            control = {k: v for k, v in (await asyncio.to_thread(self.worker.metrics)).items() if "control" in k}
        raise AssertionError(f"{what}; last row: {last}\nworker: {control}\n{log}")

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def start_daemon(self) -> Daemon:
        self.daemon = Daemon(self.config)
        return self.daemon

    def start_worker(self, name: str) -> Worker:
        self.worker = self.fleet.start(name)
        self.worker.wait_ready()
        return self.worker


def device_config(tmp: Path, device: str, cluster: RunningNats, *, drivers: dict[str, Any],
                  privacy: dict[str, Any] | None = None, window: int = 4) -> Path:
    """`edge run`'s file: uplink over MQTT 3.1.1 to node 0 with the store's credential, the worker's
    key as the trusted cloud key (acks and downlink documents), downlink on (the default)."""
    state = tmp / "state"
    state.mkdir()
    pw = tmp / "mqtt.password"
    pw.write_text(cluster.password(f"{TENANT}.{STORE}") + "\n")
    pw.chmod(0o600)
    node = cluster.nats.nodes[0]
    doc: dict[str, Any] = {
        "identity": {"tenant": TENANT, "store": STORE, "device": device},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"broker": f"mqtt://{node.host}:{node.mqtt_port}", "protocol": "3.1.1",
                   "auth": {"username": f"{TENANT}.{STORE}", "password_file": str(pw)},
                   "cloud_public_key": CLOUD_PUBLIC, "window": window, "batch": {"max_events": 20, "linger": "100ms"},
                   "ack_timeout": "3s", "reconnect": {"initial": "200ms", "max": "1s"}, "keepalive": 5},
        "drivers": drivers,
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s", "apply_grace": "3s"},
        "logging": {"level": "info", "format": "json"},
        "downlink": {"enabled": True},
    }
    if privacy is not None:
        doc["privacy"] = privacy
    cfg = tmp / "edge.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


SIM_DRIVERS: dict[str, Any] = {
    "ble": {"backend": "sim", "sim": {"rate": 20, "seed": 1}},
    "nfc": {"enabled": False},
    "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 2, "seed": 3}}],
}


@contextlib.asynccontextmanager
async def chain(tmp: Path, cluster: RunningNats, dsn: str, *, drivers: dict[str, Any] = SIM_DRIVERS,
                privacy: dict[str, Any] | None = None, window: int = 4) -> AsyncIterator[Chain]:
    """A registered device with keys (and the tenant key), a running worker; the daemon is the
    test's to start. Everything started is stopped at the end."""
    device = f"fe-{secrets.token_hex(3)}"
    cfg = device_config(tmp, device, cluster, drivers=drivers, privacy=privacy, window=window)
    res = await asyncio.to_thread(edge, "keys", "init", "--config", str(cfg), cwd=tmp)
    assert res.returncode == 0, res.stderr
    shown = await asyncio.to_thread(edge, "keys", "show", "--config", str(cfg), "--json", cwd=tmp)
    assert shown.returncode == 0, shown.stderr
    for folder in (tmp / "state" / "keys", tmp / "tenants" / TENANT):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tenant.key").write_bytes(TENANT_KEY)
        (folder / "tenant.key").chmod(0o600)
    _clock_seen_synchronized(tmp / "state")
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        add_device(conn, tenant=TENANT, store=STORE, device=device,
                   public_key=bytes.fromhex(json.loads(shown.stdout)["public_key"]))
    env = {**os.environ, "EDGE_CLOUD_DSN": dsn, "EDGE_CLOUD_BROKER": ",".join(cluster.nats.mqtt_urls),
           "EDGE_CLOUD_BROKER_USER": "admin", "EDGE_CLOUD_BROKER_PASSWORD": cluster.password("admin"),
           "EDGE_CLOUD_KEY": str(cloud_key_file(tmp)), "EDGE_CLOUD_TENANT_KEYS": str(tmp / "tenants"),
           "EDGE_CLOUD_ACTOR": "ops-e2e"}
    c = Chain(tmp, cluster, dsn, device, cfg, Fleet(tmp, cluster, dsn), env)
    try:
        await asyncio.to_thread(c.start_worker, "w1")
        yield c
    finally:
        if c.daemon is not None:
            with contextlib.suppress(Exception):
                await c.daemon.stop(signal.SIGKILL)
        c.fleet.close()
        await clear_retained(cluster, c.retained)


async def clear_retained(cluster: RunningNats, topics: set[str]) -> None:
    """Empty the retained copies the test left (the cluster is the session's: a consent shard of
    tenant t-a signed with this file's key would be a foreign document to every later test)."""
    if not topics:
        return
    broker = Broker(urls=cluster.nats.mqtt_urls, user="admin", password=cluster.password("admin"))
    async with Publisher(broker) as pub:
        for topic in sorted(topics):
            await pub.publish(topic, b"", retain=True)


def online(r: dict[str, Any]) -> bool:
    return bool(r["state"] == "online" and r["software"])


@pytest.mark.timeout(90)
async def test_a_layer_is_applied_live_a_failing_one_rolled_back_and_a_killed_daemon_shown_offline(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str,
) -> None:
    async with chain(tmp_path, nats_cluster, pg_dsn) as c:
        daemon = c.start_daemon()
        first = await c.until_row(lambda r: online(r) and r["layers"] == {"tenant": 0, "store": 0, "device": 0},
                                  "the device never showed up online with its reported state")
        assert first["problems"] == []

        out = await c.set_layer({"drivers": {"ble": {"sim": {"rate": 7}}}})
        assert out.startswith(f"device layer {TENANT}/{STORE}/{c.device}: ver 1, hash ")
        applied = await c.until_row(lambda r: r["layers"]["device"] == 1, "the driver option was not applied")
        assert (applied["apply"], applied["problems"]) == ("applied", [])
        assert daemon.exits == []  # a driver option: applied live, the daemon did not restart

        # check-config cannot judge a pyserial URL (edge/preflight.py): the driver finds out at run time
        bad = {"drivers": {"pos": [{"name": "till-1", "backend": "serial", "port": "socket://127.0.0.1:9",
                                    "framing": "lines"}]}}
        out = await c.set_layer(bad)
        assert ": ver 2, hash " in out
        rolled = await c.until_row(lambda r: r["apply"] == "rolled-back", "the failing layer was not rolled back",
                                   "--problems")
        assert rolled["problems"] == ["rolled-back"]
        assert rolled["layers"]["device"] == 1  # back on ver 1
        assert any("driver pos:till-1 is degraded" in e for e in rolled["apply_detail"]), rolled
        text = await c.cli("fleet", "status", "--tenant", TENANT, "--store", STORE, "--problems")
        line = next(x for x in text.splitlines() if c.device in x)
        assert "rolled-back (1 errors)" in line
        assert daemon.exits == []

        # a crash: the broker publishes the daemon's last will, the worker stores it
        assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        gone = await c.until_row(lambda r: r["state"] == "offline", "the last will did not mark it offline",
                                 "--problems")
        assert gone["problems"] == ["offline", "rolled-back"]


async def _command(c: Chain, name: str) -> tuple[str, dict[str, Any]]:
    """`cmd send DEVICE NAME --wait 30 --json` (exit 0: the device answered ok): (id, result)."""
    out = await c.cli("cmd", "send", c.device, name, "--tenant", TENANT, "--store", STORE, "--wait", "30", "--json")
    [sent] = json.loads(out)
    assert (sent["device"], sent["name"], sent["state"]) == (f"{TENANT}/{STORE}/{c.device}", name, "ok"), sent
    return str(sent["id"]), dict(sent["result"])


@pytest.mark.timeout(90)
async def test_commands_status_restart_and_keys_rotate_run_on_the_daemon_and_their_results_are_stored(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str,
) -> None:
    async with chain(tmp_path, nats_cluster, pg_dsn) as c:
        daemon = c.start_daemon()
        await c.until_row(online, "the device never showed up online")

        cid, printed = await _command(c, "status")
        [(state, result)] = c.sql("SELECT state, result FROM fleet_commands WHERE id = %s", cid)
        assert state == "ok"
        assert result == printed
        assert result["device"] == c.device
        assert result["runtime"]["state"] == "running"
        assert result["runtime"]["components"]["downlink"]["commands"]["results"] == {}  # counted after it
        assert c.sql("SELECT last_cmd_id, last_cmd_ok FROM fleet_device_state WHERE device = %s", c.device) == [
            (cid, True)]

        # restart: result first, then a drained stop with exit 75; the harness starts it again
        before = c.sql("SELECT status_at FROM fleet_device_state WHERE device = %s", c.device)[0][0]
        _, result = await _command(c, "restart")
        assert result == {"restarting": True}
        deadline = time.monotonic() + WAIT
        while daemon.exits != [75]:
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            await asyncio.sleep(0.2)

        def back_online(r: dict[str, Any]) -> bool:
            rows = c.sql("SELECT status, status_at FROM fleet_device_state WHERE device = %s", c.device)
            return online(r) and rows[0][0] == "online" and rows[0][1] > before

        await c.until_row(back_online, "the restarted daemon did not come back online")
        events = [json.loads(x) for x in daemon.log().splitlines() if x.startswith("{")]
        drained = next(e for e in events if e["event"] == "drained")
        assert next(e for e in events if e["event"] == "exit_for_restart")["exit_status"] == 75
        reopened = [e for e in events if e["event"] == "buffer_opened"][-1]
        assert reopened["next_event_id"] == drained["last_committed_id"] + 1  # no committed event lost

        # keys.rotate: a new ephemeral epoch, the old key file overwritten with zeros and unlinked
        keys = c.state / "keys"
        [old] = sorted(keys.glob("ephemeral-*.key"))
        witness = tmp_path / "old-ephemeral.link"  # a second name of the old file's inode
        os.link(old, witness)
        assert witness.read_bytes().strip(b"\0")
        _, result = await _command(c, "keys.rotate")
        assert result == {"epoch": int(old.stem.split("-")[1]) + 1}
        [new] = sorted(keys.glob("ephemeral-*.key"))
        assert new != old
        assert int(new.stem.split("-")[1]) == result["epoch"]
        size = witness.stat().st_size
        assert size > 0
        assert witness.read_bytes() == bytes(size)  # shredded: every byte zero
        witness.unlink()

        states = c.sql("SELECT name, state FROM fleet_commands WHERE device = %s ORDER BY created_at", c.device)
        assert states == [("status", "ok"), ("restart", "ok"), ("keys.rotate", "ok")]
        assert await daemon.stop() == 0
        assert daemon.exits == [75, 0]


def buffered(state: Path, needle: str) -> tuple[int, int, list[dict[str, Any]]]:
    """The device's SQLite buffer, read only: (unsent events carrying `needle`, events in sealed
    unacked batches carrying it, the edge.consent_purged events)."""
    raw = needle.encode()
    db = sqlite3.connect(f"file:{state / 'buffer.db'}?mode=ro", uri=True, timeout=5)
    try:
        bodies = [bytes(b) for (b,) in db.execute("SELECT body FROM events")]
        payloads = [bytes(p) for (p,) in db.execute("SELECT payload FROM batches WHERE state = 'pending'")]
    finally:
        db.close()
    sealed = [e for p in payloads for e in decode_batch_events(p)]
    purged = [e for e in map(decode_body, bodies) if e["type"] == "edge.consent_purged"]
    return sum(raw in b for b in bodies), sum(needle in json.dumps(e, default=str) for e in sealed), purged


async def watch_downlink_reports(cluster: RunningNats, device: str, got: list[bytes], ready: asyncio.Event) -> None:
    """Every `reported`, `status` and `cmd-result` of the device, as the broker's admin sees them."""
    u = urlsplit(cluster.nats.mqtt_urls[1])
    async with aiomqtt.Client(u.hostname or "", u.port or 0, username="admin", password=cluster.password("admin"),
                              identifier=f"watch-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        for kind in ("reported", "status", "cmd-result"):
            await client.subscribe(f"edge/v1/{TENANT}/{STORE}/{device}/{kind}", qos=1)
        ready.set()
        async for m in client.messages:
            got.append(bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b"")


async def until(cond: Callable[[], bool], what: str, within: float = WAIT) -> float:
    """Poll `cond` (in a thread) until true; the seconds it took."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        assert time.monotonic() - t0 < within, what
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


@pytest.mark.timeout(120)
async def test_a_revoked_consent_purges_the_devices_buffer_and_the_clouds_events_and_is_never_reported(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str,
) -> None:
    master, slave = pty.openpty()  # the till's serial line: the test types the receipts
    drivers = {"ble": {"backend": "sim", "sim": {"rate": 10, "seed": 1}}, "nfc": {"enabled": False},
               "pos": [{"name": "till-9", "backend": "serial", "port": os.ttyname(slave), "framing": "lines"}]}
    privacy = {"classes": {"loyalty_id": {"policy": "stable", "fallback": "ephemeral"}}}
    pseudonym = stable_pseudonym(Ident("loyalty_id", LOYALTY), tenant_kid(TENANT_KEY), TENANT_KEY)
    assert pseudonym is not None
    receipts = 0

    def receipt() -> None:
        nonlocal receipts
        receipts += 1
        os.write(master, f"SHOP 1\nReceipt no: {receipts}\nTOTAL EUR 1.00\nLoyalty: {LOYALTY}\n\f".encode())

    def carrying_in_pg() -> int:
        return int(c.sql("SELECT count(*) FROM events WHERE tenant = %s AND strpos(data::text, %s) > 0",
                         TENANT, pseudonym)[0][0])

    def consented(n: int) -> Callable[[], bool]:
        def check() -> bool:
            rows = c.sql("SELECT reported->'consent'->>'pseudonyms' FROM fleet_device_state WHERE device = %s",
                         c.device)
            return bool(rows) and rows[0][0] == str(n)
        return check

    seen: list[bytes] = []
    ready = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    try:
        async with chain(tmp_path, nats_cluster, pg_dsn, drivers=drivers, privacy=privacy, window=2) as c:
            watcher = asyncio.create_task(watch_downlink_reports(nats_cluster, c.device, seen, ready))
            async with asyncio.timeout(WAIT):
                await ready.wait()
            daemon = c.start_daemon()
            await c.until_row(online, "the device never showed up online")
            grant = tmp_path / "optin.txt"
            grant.write_text(f"{LOYALTY}\n")
            out = await c.cli("consent", "grant", "--tenant", TENANT, str(grant))
            c.retained.add(f"edge/v1/{TENANT}/_all/_all/consent/{consent_shard(pseudonym)}")
            assert out.startswith(f"{TENANT}: granted 1, unchanged 0"), out
            await until(consented(1), "the device never reported the consented pseudonym's shard")

            # consented: the customer's receipt carries the stable pseudonym into PostgreSQL
            receipt()
            await until(lambda: carrying_in_pg() == 1, "the consented receipt never reached PostgreSQL")

            # the cloud stops acking (worker stopped): the window fills, later events stay buffered unsent
            assert c.worker is not None
            assert await asyncio.to_thread(stop_gracefully, c.worker) == 0
            await until(lambda: _pending(c.state) >= 2, "the window never filled")
            for _ in range(3):
                receipt()
            await until(lambda: buffered(c.state, pseudonym)[0] == 3, "the receipts were not buffered")
            assert buffered(c.state, pseudonym)[1] == 0  # none sealed: the window was full before

            revoke = tmp_path / "withdrawn.txt"
            revoke.write_text(f"{LOYALTY[:4]} {LOYALTY[4:]}\n")  # another spelling of the same number
            t_revoke = time.monotonic()
            out = await c.cli("consent", "revoke", "--tenant", TENANT, str(revoke))
            assert out.splitlines()[0] == f"{TENANT}: revoked 1, unchanged 0, 1 stored event(s) erased", out
            assert carrying_in_pg() == 0
            await until(lambda: buffered(c.state, pseudonym)[:2] == (0, 0),
                        "buffered events still carry the withdrawn pseudonym", within=10)
            took = time.monotonic() - t_revoke  # the command (signing, PostgreSQL, publish) included
            _, _, purged = buffered(c.state, pseudonym)
            assert [e["data"]["events"] for e in purged] == [3], purged
            assert set(purged[0]["data"]) == {"shard", "rev", "events"}

            # from now on the customer gets the fallback (ephemeral): nothing stable is buffered again
            assert _pos_events(c.state) == 0  # till-9 is the only POS: its buffered receipts were the 3 purged
            receipt()
            await until(lambda: _pos_events(c.state) == 1, "the receipt after the withdrawal was not buffered")
            assert buffered(c.state, pseudonym)[:2] == (0, 0)

            # the cloud acks again: the backlog drains, nothing carrying the pseudonym arrives
            c.start_worker("w2")
            await until(consented(0), "the device never reported the withdrawal")
            await until(lambda: _pos_events(c.state) == 0, "the backlog did not drain")  # acked: deleted
            assert carrying_in_pg() == 0
            # stored: the consented receipt erased by the revoke, the purged three never sent, the last one
            # with an ephemeral pseudonym (the class's fallback)
            [(data,)] = c.sql("SELECT data FROM events WHERE device = %s AND src = 'pos'", c.device)
            assert data["receipt_id"] == str(receipts)
            assert data["loyalty"].startswith("loy:e")
            assert await daemon.stop() == 0
            stored = c.sql("SELECT reported::text, status FROM fleet_device_state WHERE device = %s", c.device)
            worker_logs = [w.log.read_text() for w in c.fleet.workers]
            log = daemon.log()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        os.close(master)
        os.close(slave)
    assert len(seen) >= 3
    for text in (*(p.decode(errors="replace") for p in seen), stored[0][0], log, *worker_logs):
        assert pseudonym not in text
        assert LOYALTY not in text
    print(f"buffer purged {took:.1f} s after the revoke started; {len(seen)} reported/status/cmd-result copies")


def _query(state: Path, sql: str) -> int:
    db = sqlite3.connect(f"file:{state / 'buffer.db'}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


def _pending(state: Path) -> int:
    return _query(state, "SELECT count(*) FROM batches WHERE state = 'pending'")


def _pos_events(state: Path) -> int:
    return _query(state, "SELECT count(*) FROM events WHERE src = 'pos'")
