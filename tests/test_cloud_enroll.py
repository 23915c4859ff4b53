"""Enrollment end to end (downlink-v1 §Enrollment), on real peers: `edge-cloud tokens create`,
`edge enroll` with the store's MQTT credentials against a real 3-node NATS cluster, an
`edge-cloud ingest` worker subprocess deciding on real PostgreSQL, and then the device's real
uplink (cloud/fleetsim.SimDevice) running on the keys it pinned.

What must hold:
- a token enrolls exactly one (tenant, store, device): the key is registered for that identity
  only, the cloud keys are pinned in cloud_keys.json, `edge check-config` accepts the config
  without uplink.cloud_public_key, and the device's batches are stored and acked;
- a repeat of the accepted request is answered ok again; the same token for another device is
  `token-used`; an expired token `token-expired`; another store's token `token-scope`; a wrong
  secret or an unknown token id `bad-mac` (unauthenticated: nothing pinned);
- a rogue `enrolled` answer signed by an attacker key without the token's secret is ignored:
  the attacker key is never pinned;
- a revoked device's batches are refused `unknown-key` and not stored.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.msg import Msg
from support.nats import RunningNats
from test_cloud_ingest_worker import Fleet, Worker
from test_receiver import CLOUD

from cloud.cluster.js_transport import Backoff
from cloud.cluster.procs import free_port
from cloud.control import ControlLoop, ControlMessage, EnrollHandler, Verdict
from cloud.db.migrate import migrate
from cloud.db.tokens import TokenKey, create_token
from cloud.enroll import Enroller
from cloud.fleetsim import SimDevice
from cloud.metrics import IngestMetrics
from edge.clock import SystemClock
from edge.configload import load_config
from edge.privacy.keys import KeyStore
from edge.wire.downlink import build_enroll_request, verify_enrolled
from edge.wire.uplink import kid_of, pack, public_raw

pytestmark = pytest.mark.cloud

BIN = Path(sys.executable).parent
CLOUD_KID = kid_of(public_raw(CLOUD.public_key()))


async def run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / argv[0]), *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


def store_config(tmp: Path, cluster: RunningNats, device: str, store: str = "s-a") -> Path:
    """A device's store.yaml: identity, its state and keys folders, the broker and the store's
    MQTT credentials; no uplink.cloud_public_key (enrollment provides the cloud keys)."""
    home = tmp / device
    home.mkdir()
    (home / "mqtt.pw").write_text(cluster.password(f"t-a.{store}") + "\n")
    node = cluster.nats.nodes[0]
    path = home / "store.yaml"
    path.write_text(f"""identity:
  tenant: t-a
  store: {store}
  device: {device}
paths:
  state_dir: state
  keys_dir: keys
uplink:
  broker: mqtt://{node.host}:{node.mqtt_port}
  protocol: "3.1.1"
  auth:
    username: t-a.{store}
    password_file: mqtt.pw
  ack_timeout: 3s
  reconnect:
    initial: 200ms
    max: 1s
""")
    return path


def pinned(config: Path) -> list[str]:
    path = config.parent / "state" / "cloud_keys.json"
    if not path.exists():
        return []
    return sorted(kid_of(bytes.fromhex(k)) for k in json.loads(path.read_text())["keys"])


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def control(w: Worker, result: str) -> float:
    return w.metrics().get(f"edge_cloud_control_messages_total{{kind=enroll,result={result}}}", 0.0)


def wait_metric(w: Worker, name: str, at_least: float, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while w.metrics().get(name, 0.0) < at_least:
        assert time.monotonic() < deadline, {k: v for k, v in w.metrics().items() if "control" in k or "rejected" in k}
        time.sleep(0.2)


@pytest.fixture
def cloud(tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str) -> Iterator[tuple[Worker, Path]]:
    migrate(pg_dsn)
    key_path = tmp_path / "token.key"
    TokenKey.load(key_path, create=True)
    fleet = Fleet(tmp_path, nats_cluster, pg_dsn)
    worker = fleet.start("w1", token_key=str(key_path))
    try:
        worker.wait_ready()
        yield worker, key_path
    finally:
        fleet.close()


async def test_a_token_enrolls_one_device_which_then_runs_until_it_is_revoked(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str, cloud: tuple[Worker, Path]
) -> None:
    worker, key_path = cloud
    env = {"EDGE_CLOUD_DSN": pg_dsn, "EDGE_CLOUD_TOKEN_KEY": str(key_path)}
    conf = store_config(tmp_path, nats_cluster, "till-1")

    rc, _, err = await run("edge", "check-config", str(conf))
    assert rc == 2
    assert "uplink.cloud_public_key" in err
    assert "or run edge enroll" in err

    # operator: a one-time token for the store; technician: edge enroll on the device
    rc, token, err = await run("edge-cloud", "tokens", "create", "--tenant", "t-a", "--store", "s-a", "--ttl", "1h",
                               env=env)  # fmt: skip
    assert rc == 0, err
    token = token.strip()
    rc, out, err = await run("edge", "enroll", "--config", str(conf), "--token", token)
    assert rc == 0, out + err
    assert f"pinned cloud key(s) {CLOUD_KID}" in out
    assert pinned(conf) == [CLOUD_KID]
    assert token.split(".", 1)[1] not in out + err  # the secret is never echoed

    rc, out, err = await run("edge-cloud", "devices", "list", "--tenant", "t-a", "--store", "s-a", "--json", env=env)
    assert rc == 0, err
    devices = json.loads(out)
    cfg = load_config(conf)  # trust=True: the pinned key stands in for uplink.cloud_public_key
    pub = KeyStore(cfg.paths.keys_dir, SystemClock()).public_key().hex()
    assert [(d["tenant"], d["store"], d["device"], d["public_key"], d["state"]) for d in devices] == [
        ("t-a", "s-a", "till-1", pub, "active")]
    with psycopg.connect(pg_dsn) as conn:
        used = conn.execute("SELECT used_by_device, used_by_pub FROM enrollment_tokens").fetchall()
    assert used == [("till-1", bytes.fromhex(pub))]
    rc, out, err = await run("edge", "check-config", str(conf))
    assert rc == 0, err
    assert "signed by a pinned cloud key" in out

    # a repeat of the accepted request (the answer was lost, the technician runs it again): ok
    rc, out, err = await run("edge", "enroll", "--config", str(conf), "--token", token)
    assert rc == 0, out + err
    wait_metric(worker, "edge_cloud_control_messages_total{kind=enroll,result=repeated}", 1)

    # the device runs on the pinned key: its batches are stored and the signed acks accepted
    dev = await SimDevice.open(cfg, SystemClock(), tmp_path / "sim-keys")
    try:
        await dev.uplink.start()
        dev.generating = asyncio.create_task(dev.generate(30, None, SystemClock()))
        deadline = time.monotonic() + 20
        while not await dev.drained():
            assert time.monotonic() < deadline, dev.uplink.status()
            await asyncio.sleep(0.1)
        assert dev.uplink.counters["acks_forged"] == 0
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM events WHERE device = 'till-1'").fetchone() == (30,)

        # revoked: its next batches are refused unknown-key, never stored
        rc, out, err = await run("edge-cloud", "devices", "revoke", "--tenant", "t-a", "--store", "s-a",
                                 "--device", "till-1", env=env)  # fmt: skip
        assert rc == 0, err
        assert "revoked t-a/s-a/till-1" in out
        await asyncio.sleep(1.5)  # the worker's registry cache refreshes every key_refresh (1 s)
        before = worker.metrics().get("edge_cloud_ingest_rejected_total{reason=unknown-key}", 0.0)
        dev.generating = asyncio.create_task(dev.generate(5, None, SystemClock()))
        await asyncio.to_thread(wait_metric, worker, "edge_cloud_ingest_rejected_total{reason=unknown-key}",
                                before + 1)  # fmt: skip
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM events WHERE device = 'till-1'").fetchone() == (30,)
    finally:
        await dev.close()
    assert control(worker, "accepted") == 1


async def test_refusals_are_signed_by_the_cloud_and_pin_nothing(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str, cloud: tuple[Worker, Path]
) -> None:
    worker, key_path = cloud
    key = TokenKey.load(key_path)
    with psycopg.connect(pg_dsn) as conn:
        good = create_token(conn, key, tenant="t-a", store="s-a", ttl=3600)
        other_store = create_token(conn, key, tenant="t-a", store="s-b", ttl=3600)
        expired = create_token(conn, key, tenant="t-a", store="s-a", ttl=60,
                               now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))  # fmt: skip
    first, second = store_config(tmp_path, nats_cluster, "pos-1"), store_config(tmp_path, nats_cluster, "pos-2")
    rc, out, err = await run("edge", "enroll", "--config", str(first), "--token", good.text, "--timeout", "30s")
    assert rc == 0, out + err

    cases = [
        (good.text, "token-used"),  # the same token for another device
        (expired.text, "token-expired"),
        (other_store.text, "token-scope"),  # a token of t-a/s-b for a device of t-a/s-a
        (f"{good.token_id}.{b32(secrets.token_bytes(32))}", "bad-mac"),  # a wrong secret
        (f"{secrets.token_hex(8)}.{b32(secrets.token_bytes(32))}", "bad-mac"),  # an unknown token id
    ]
    for token, err_code in cases:
        rc, out, err = await run("edge", "enroll", "--config", str(second), "--token", token, "--timeout", "30s")
        assert rc == 1, out + err
        assert f"refused: {err_code}" in err, err
        assert pinned(second) == []
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT device FROM devices").fetchall()
    assert rows == [("pos-1",)]
    for result, n in (("accepted", 1), ("token-used", 1), ("token-expired", 1), ("token-scope", 1), ("bad-mac", 2)):
        assert control(worker, result) == n, result

    # a rogue on the broker answers first, signed by its own key and listing it, without the secret
    third = store_config(tmp_path, nats_cluster, "pos-3")
    rogue_key = Ed25519PrivateKey.generate()
    rogue_pub = public_raw(rogue_key.public_key())
    with psycopg.connect(pg_dsn) as conn:
        fresh = create_token(conn, key, tenant="t-a", store="s-a", ttl=3600)
    nc = await nats_cluster.connect()
    forged = 0

    async def answer(msg: object) -> None:
        nonlocal forged
        d = pack({"kind": "enrolled", "tenant": "t-a", "store": "s-a", "device": "pos-3", "kid": kid_of(rogue_pub),
                  "t": int(time.time() * 1000), "ok": True, "cloud_keys": [rogue_pub]})  # fmt: skip
        m = hmac.new(b"guessed secret", b"edge-enrolled-v1\n" + d, hashlib.sha256).digest()
        env = pack({"v": 1, "d": d, "s": rogue_key.sign(b"edge-downlink-v1\n" + d), "m": m})
        await nc.publish("edge.v1.t-a.s-a.pos-3.enrolled", env)
        forged += 1

    sub = await nc.subscribe("edge.v1.t-a.s-a.pos-3.enroll", cb=answer)
    try:
        rc, out, err = await run("edge", "enroll", "--config", str(third), "--token", fresh.text, "--timeout", "30s")
    finally:
        await sub.unsubscribe()
        await nc.close()
    assert rc == 0, out + err
    assert forged >= 1
    assert "ignored an answer that does not verify (bad-mac)" in err
    assert pinned(third) == [CLOUD_KID]
    assert kid_of(rogue_pub) not in out + (third.parent / "state" / "cloud_keys.json").read_text()


async def test_the_control_loop_retries_while_postgres_is_down_and_answers_no_garbage(
    tmp_path: Path, nats_cluster: RunningNats, pg_dsn: str
) -> None:
    """PostgreSQL unreachable: the request is nak'ed and counted `unavailable`, then decided once
    the database answers; an unparseable request is counted and never answered."""
    migrate(pg_dsn)
    token_key = TokenKey.load(tmp_path / "token.key", create=True)
    with psycopg.connect(pg_dsn) as conn:
        token = create_token(conn, token_key, tenant="t-a", store="s-a", ttl=3600)
    tag = secrets.token_hex(3)
    device, junk = f"ctl-{tag}", f"ctl-junk-{tag}"
    metrics = IngestMetrics()
    nc = await nats_cluster.connect("worker")
    admin = await nats_cluster.connect()
    clock = SystemClock()
    down = Enroller(f"postgresql://edge@127.0.0.1:{free_port()}/edge", token_key=token_key, cloud_key=CLOUD,
                    prefix="edge/v1", clock=clock)  # fmt: skip
    up = Enroller(pg_dsn, token_key=token_key, cloud_key=CLOUD, prefix="edge/v1", clock=clock)
    seen: list[str] = []

    async def enroll(msg: ControlMessage) -> Verdict:
        if tag not in msg.topic:
            return Verdict("foreign")  # what earlier tests left in the session's stream
        seen.append(msg.topic)
        first = seen.count(msg.topic) == 1 and device in msg.topic
        return await EnrollHandler(nc, down if first else up)(msg)

    loop = ControlLoop(nc, {"enroll": enroll}, metrics, backoff=Backoff(0.1, 0.5), fetch_wait=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    answers: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_answer(msg: Msg) -> None:
        if tag in msg.subject:
            await answers.put((msg.subject, msg.data))

    sub = await admin.subscribe("edge.v1.t-a.s-a.*.enrolled", cb=on_answer)
    try:
        await admin.publish(f"edge.v1.t-a.s-a.{junk}.enroll", b"\xc1 not msgpack")
        key = Ed25519PrivateKey.generate()
        request = build_enroll_request(tenant="t-a", store="s-a", device=device, token_id=token.token_id,
                                       secret=token.secret, key=key, t=clock.wall_ms())  # fmt: skip
        await admin.publish(f"edge.v1.t-a.s-a.{device}.enroll", request)
        subject, payload = await asyncio.wait_for(answers.get(), timeout=30)
        assert subject == f"edge.v1.t-a.s-a.{device}.enrolled"
        doc = verify_enrolled(payload, topic=subject.replace(".", "/"), prefix="edge/v1", secret=token.secret)
        assert doc.body["ok"] is True
        assert doc.body["cloud_keys"] == [public_raw(CLOUD.public_key())]
        await asyncio.sleep(1.0)  # nothing more comes: the junk request gets no answer
        assert answers.empty()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        await sub.unsubscribe()
        await admin.close()
        await nc.close()
        up.close()
        down.close()
    get = metrics.registry.get_sample_value
    for result, n in (("unavailable", 1), ("accepted", 1), ("malformed", 1)):
        assert get("edge_cloud_control_messages_total", {"kind": "enroll", "result": result}) == n, result
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT device FROM devices").fetchall() == [(device,)]
