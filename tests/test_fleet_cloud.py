"""The cloud side of fleet management (downlink-v1, issue 16) against a real NATS cluster and a
real PostgreSQL: signed retained layers a fresh MQTT 3.1.1 subscriber verifies, config set
validation with key paths and versions from PostgreSQL, commands and their results, consent
revocation (only the changed shard republished, stored events erased), the append-only audit
table, and the fleet view from stored status/reported documents."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import msgpack
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.nats import RunningNats

from cloud.cli import main
from cloud.db.migrate import migrate
from cloud.fleet.publish import Broker, Publisher
from edge.events import Ident
from edge.wire.downlink import document, sign_document, verify_document
from edge.wire.uplink import kid_of, public_raw

pytestmark = pytest.mark.cloud

WAIT = 15.0
PREFIX = "edge/v1"


CLOUD_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))  # a test key
CLOUD_KID = kid_of(public_raw(CLOUD_KEY.public_key()))
TRUSTED = {CLOUD_KID: CLOUD_KEY.public_key()}


@pytest.fixture
def opts(pg_dsn: str, nats_cluster: RunningNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The options every fleet command gets here: a migrated database, the cluster's MQTT nodes as
    admin (password in the environment, never on the command line), the cloud key, an actor."""
    migrate(pg_dsn)
    key = tmp_path / "cloud.key"
    key.write_text(bytes(range(100, 132)).hex() + "\n")
    key.chmod(0o600)
    monkeypatch.setenv("EDGE_CLOUD_BROKER_PASSWORD", nats_cluster.password("admin"))
    return ["--dsn", pg_dsn, "--broker", nats_cluster.nats.mqtt_urls[1], "--broker", nats_cluster.nats.mqtt_urls[0],
            "--broker-user", "admin", "--cloud-key", str(key), "--as", "ops-alice"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def rows(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def admin_broker(cluster: RunningNats) -> Broker:
    return Broker(urls=cluster.nats.mqtt_urls, user="admin", password=cluster.password("admin"), prefix=PREFIX)


async def retained(cluster: RunningNats, topic: str, *, user: str = "t-a.s-a", quiet: float = 1.5) -> list[bytes]:
    """What a fresh MQTT 3.1.1 subscriber (a store's credential) receives on `topic` at once:
    the retained copies, collected until `quiet` seconds pass without one."""
    u = urlsplit(cluster.nats.mqtt_urls[0])
    got: list[bytes] = []
    async with aiomqtt.Client(u.hostname or "", u.port or 0, username=user, password=cluster.password(user),
                              identifier=f"t-{secrets.token_hex(4)}", protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    async with asyncio.timeout(quiet):
                        m = await anext(c.messages)
                    if m.retain and isinstance(m.payload, bytes):
                        got.append(m.payload)
        except TimeoutError:
            pass
    return got


async def test_a_layer_published_over_mqtt_is_retained_for_a_fresh_subscriber_and_verifies(
    nats_cluster: RunningNats,
) -> None:
    """The cloud publishes over MQTT 3.1.1 with retain: a device connecting later gets the document
    and verifies it. A NATS core publish on the subject form reaches no later MQTT subscriber
    (NATS keeps MQTT retained messages only from MQTT publishers): why the cloud speaks MQTT."""
    key = Ed25519PrivateKey.generate()
    kid = kid_of(public_raw(key.public_key()))
    tenant = "t-a"
    topic = "edge/v1/t-a/s-a/_all/desired"
    doc = sign_document(document("desired", tenant, "s-a", "_all", kid, 1, layer="store", ver=1,
                                 config={"logging": {"level": "debug"}}), key)
    async with Publisher(admin_broker(nats_cluster)) as pub:
        await pub.publish(topic, doc, retain=True)
    got = await retained(nats_cluster, topic)
    assert got == [doc]
    verified = verify_document(got[0], topic=topic, prefix=PREFIX, trusted={kid: key.public_key()})
    assert (verified.ver, verified.body["config"]) == (1, {"logging": {"level": "debug"}})

    core_topic = "edge/v1/t-a/s-b/_all/desired"
    nc = await nats_cluster.connect("admin")
    try:
        await nc.publish("edge.v1.t-a.s-b._all.desired", b"core publish")
        await nc.flush()
    finally:
        await nc.close()
    assert await retained(nats_cluster, core_topic, user="t-a.s-b", quiet=1.0) == []


def test_config_set_refuses_an_invalid_layer_whole_with_every_key_path(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Keys, value types and the remotely-settable rule are checked before signing: exit 2, one line
    per problem with file:line and the dotted key path, nothing stored or audited."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging:\n  level: loud\nbuffer:\n  file: other.db\n  max_bytes: 12xb\n"
                   "uplink:\n  brokr: x\n  window: 0\npaths:\n  state_dir: /x\n")
    rc, out, err = run(capsys, "config", "set", *opts, "--tenant", "t-a", "--store", "s-a", str(bad))
    assert rc == 2
    assert out == ""
    for line, path in ((2, "logging.level"), (4, "buffer.file"), (5, "buffer.max_bytes"), (7, "uplink.brokr"),
                       (8, "uplink.window"), (9, "paths")):
        assert f"{bad}:{line}: {path}: " in err, path
    assert "may not be set remotely" in err
    assert "6 problem(s)" in err
    dsn = opts[1]
    assert rows(dsn, "SELECT count(*) FROM fleet_desired") == [(0,)]
    assert rows(dsn, "SELECT count(*) FROM fleet_audit") == [(0,)]


def test_config_set_versions_come_from_postgresql_and_the_retained_layer_verifies(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], nats_cluster: RunningNats,
) -> None:
    """Each set on a topic takes the next ver (1, 2; another topic starts at 1), prints it and the
    layer's hash; a fresh subscriber gets only the newest retained copy, which verifies with the
    cloud key; show merges tenant then store; history lists both; every publish is audited."""
    layer = tmp_path / "layer.yaml"
    layer.write_text("logging:\n  level: debug\nbuffer:\n  max_events: null\n")
    rc, out, err = run(capsys, "config", "set", *opts, "--tenant", "t-a", "--store", "s-b", str(layer))
    assert (rc, err) == (0, "")
    assert out.startswith("store layer t-a/s-b/_all: ver 1, hash ")
    layer.write_text("logging:\n  level: warning\n")
    rc, out, _ = run(capsys, "config", "set", *opts, "--tenant", "t-a", "--store", "s-b", "--json", str(layer))
    assert rc == 0
    doc = json.loads(out)
    assert (doc["ver"], doc["layer"], doc["config"]) == (2, "store", {"logging": {"level": "warning"}})
    tenant_layer = tmp_path / "tenant.yaml"
    tenant_layer.write_text("health:\n  stall_timeout: 2m\nlogging:\n  level: info\n")
    rc, out, _ = run(capsys, "config", "set", *opts, "--tenant", "t-a", str(tenant_layer))
    assert (rc, out.split(":")[0]) == (0, "tenant layer t-a/_all/_all")
    assert "ver 1," in out

    topic = "edge/v1/t-a/s-b/_all/desired"
    got = asyncio.run(retained(nats_cluster, topic, user="t-a.s-b"))
    assert len(got) == 1
    verified = verify_document(got[0], topic=topic, prefix=PREFIX, trusted=TRUSTED)
    assert (verified.ver, verified.body["layer"]) == (2, "store")
    assert verified.body["config"] == {"logging": {"level": "warning"}}
    assert verified.digest == doc["doc_sha256"]

    rc, out, _ = run(capsys, "config", "show", "--dsn", opts[1], "--tenant", "t-a", "--store", "s-b", "--json")
    shown = json.loads(out)
    assert [(x["layer"], x["ver"]) for x in shown["layers"]] == [("tenant", 1), ("store", 2)]
    assert shown["merged"] == {"health": {"stall_timeout": "2m"}, "logging": {"level": "warning"}}
    device_layer = tmp_path / "device.yaml"
    device_layer.write_text("health:\n  stall_timeout: null\n")  # back to the local file's (or the default)
    rc, out, _ = run(capsys, "config", "set", *opts, "--tenant", "t-a", "--store", "s-b", "--device", "d-7",
                     str(device_layer))
    assert out.startswith("device layer t-a/s-b/d-7: ver 1, hash ")
    rc, out, _ = run(capsys, "config", "show", "--dsn", opts[1], "--tenant", "t-a", "--store", "s-b", "--device",
                     "d-7", "--json")
    shown = json.loads(out)
    assert [x["layer"] for x in shown["layers"]] == ["tenant", "store", "device"]
    assert shown["merged"] == {"health": {}, "logging": {"level": "warning"}}
    rc, out, _ = run(capsys, "config", "history", "--dsn", opts[1], "--tenant", "t-a", "--store", "s-b")
    assert rc == 0
    assert re.findall(r"store +(\S+) +ver (\d+)", out) == [("t-a/s-b/_all", "2"), ("t-a/s-b/_all", "1")]
    audit = rows(opts[1], "SELECT actor, action, target, detail->>'ver', encode(doc_sha256, 'hex') FROM fleet_audit"
                          " ORDER BY id")
    assert [a[:4] for a in audit] == [("ops-alice", "config.set", "t-a/s-b/_all", "1"),
                                      ("ops-alice", "config.set", "t-a/s-b/_all", "2"),
                                      ("ops-alice", "config.set", "t-a/_all/_all", "1"),
                                      ("ops-alice", "config.set", "t-a/s-b/d-7", "1")]
    assert audit[1][4] == verified.digest


def register(dsn: str, *devices: tuple[str, str, str]) -> None:
    from cloud.db.registry import add_device

    with psycopg.connect(dsn) as conn:
        for tenant, store, device in devices:
            add_device(conn, tenant=tenant, store=store, device=device,
                       public_key=public_raw(Ed25519PrivateKey.generate().public_key()))


async def fake_device(cluster: RunningNats, ids: tuple[str, str, str], ready: asyncio.Event,
                      answered: list[dict[str, object]], user: str | None = None) -> None:
    """A device's command loop in miniature: verify each cmd document, answer on cmd-result."""
    u = urlsplit(cluster.nats.mqtt_urls[2])
    tenant, store, device = ids
    user = user or f"{tenant}.{store}"
    base = f"edge/v1/{tenant}/{store}/{device}"
    async with aiomqtt.Client(u.hostname or "", u.port or 0, username=user, password=cluster.password(user),
                              identifier=f"dev-{secrets.token_hex(4)}", protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe(f"{base}/cmd", qos=1)
        ready.set()
        async for m in c.messages:
            assert isinstance(m.payload, bytes)
            doc = verify_document(m.payload, topic=m.topic.value, prefix=PREFIX, trusted=TRUSTED)
            result = {"t": 1234, "name": doc.body["name"]} if doc.body["name"] != "ping" else {"t": 1765000000000}
            answer = {"id": doc.body["id"], "ok": True, "result": result}
            answered.append(dict(doc.body))
            await c.publish(f"{base}/cmd-result", json.dumps(answer).encode(), qos=1)


async def test_cmd_send_waits_for_the_result_and_stores_it(
    opts: list[str], capsys: pytest.CaptureFixture[str], nats_cluster: RunningNats,
) -> None:
    """`cmd send DEVICE NAME --wait`: a signed document with a fresh id and exp reaches the device,
    whose cmd-result is stored in PostgreSQL and printed; the send is audited."""
    dsn = opts[1]
    register(dsn, ("t-a", "s-a", "d-1"), ("t-a", "s-a", "d-2"))
    ready, answered = asyncio.Event(), list[dict[str, object]]()
    dev = asyncio.create_task(fake_device(nats_cluster, ("t-a", "s-a", "d-1"), ready, answered))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        rc, out, err = await asyncio.to_thread(
            run, capsys, "cmd", "send", *opts, "d-1", "log.level", "level=debug", "for=10m", "--wait", "10")
    finally:
        dev.cancel()
    assert (rc, err) == (0, ""), err
    device, name, cid, state, result = out.strip().split("  ")
    assert (device, name, state, json.loads(result)) == ("t-a/s-a/d-1", "log.level", "ok", {"name": "log.level",
                                                                                              "t": 1234})
    assert answered[0]["id"] == cid
    assert answered[0]["args"] == {"level": "debug", "for": "10m"}
    exp, t = answered[0]["exp"], answered[0]["t"]
    assert isinstance(exp, int)
    assert isinstance(t, int)
    assert 9 * 60_000 <= exp - t <= 10 * 60_000
    assert rows(dsn, "SELECT state, result FROM fleet_commands WHERE id = %s", cid) == [
        ("ok", {"t": 1234, "name": "log.level"})]
    assert rows(dsn, "SELECT last_cmd_id, last_cmd_ok FROM fleet_device_state") == [(cid, True)]
    assert rows(dsn, "SELECT action, target, detail->>'id' FROM fleet_audit") == [("cmd.send", "t-a/s-a/d-1", cid)]


async def test_cmd_send_across_a_store_and_results_stored_by_the_handler(
    opts: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    """`_all --store S`: one document per registered device, each its own id; a simulated
    cmd-result stored by handle_cmd_result settles its command once; garbage raises a ValueError
    and stores nothing."""
    from cloud.fleet.handlers import ControlMessageError, handle_cmd_result

    dsn = opts[1]
    register(dsn, ("t-a", "s-a", "d-1"), ("t-a", "s-a", "d-2"), ("t-a", "s-b", "d-3"))
    rc, out, _ = await asyncio.to_thread(run, capsys, "cmd", "send", *opts, "_all", "ping", "--tenant", "t-a",
                                         "--store", "s-a", "--json")
    assert rc == 0
    sent = json.loads(out)
    assert [(s["device"], s["state"]) for s in sent] == [("t-a/s-a/d-1", "sent"), ("t-a/s-a/d-2", "sent")]
    assert len({s["id"] for s in sent}) == 2
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        answer = json.dumps({"id": sent[1]["id"], "ok": False, "error": "expired", "detail": "exp passed"}).encode()
        await handle_cmd_result(conn, ("t-a", "s-a", "d-2"), answer)
        again = json.dumps({"id": sent[1]["id"], "ok": True, "result": {}}).encode()
        await handle_cmd_result(conn, ("t-a", "s-a", "d-2"), again)  # a duplicate: the first result stays
        foreign = json.dumps({"id": sent[0]["id"], "ok": True, "result": {}}).encode()
        await handle_cmd_result(conn, ("t-a", "s-b", "d-3"), foreign)  # another device's command: ignored
        for garbage in (b"", b"\xff", b"[1]", b'{"id": 5, "ok": true}', b'{"id": "x", "ok": "yes"}',
                        b'{"id": "x", "ok": false, "error": "NOT A CODE"}', b"{" * 100_000, b'{"a": NaN}',
                        b'{"id": "x\\u0000", "ok": true}', b" " * (300 * 1024)):
            with pytest.raises(ControlMessageError):
                await handle_cmd_result(conn, ("t-a", "s-a", "d-1"), garbage)
        with pytest.raises(ValueError, match="invalid"):
            await handle_cmd_result(conn, ("t-a", "../x", "d-1"), again)
    got = rows(dsn, "SELECT device, state, error, detail FROM fleet_commands ORDER BY device")
    assert got == [("d-1", "sent", None, None), ("d-2", "error", "expired", "exp passed")]


TENANT_KEY = bytes(range(7, 39))


def loyalty_numbers_in_two_shards() -> tuple[str, str, str]:
    """Three loyalty numbers, the first alone in its shard (so revoking it changes one shard)."""
    from edge.privacy.keys import tenant_kid
    from edge.privacy.pseudonym import stable_pseudonym
    from edge.wire.downlink import consent_shard

    kid = tenant_kid(TENANT_KEY)
    shards: dict[str, str] = {}
    for n in range(1000, 2000):
        p = stable_pseudonym(Ident("loyalty_id", f"LOY{n}"), kid, TENANT_KEY)
        assert p is not None
        shards.setdefault(consent_shard(p), f"LOY{n}")
        if len(shards) == 3:
            break
    a, b, c = shards.values()
    return a, b, c


async def test_consent_revoke_republishes_only_the_changed_shard_and_erases_stored_events(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], nats_cluster: RunningNats,
) -> None:
    """Loyalty numbers become the stable pseudonyms the devices compute (any spelling); revoking
    one gives its shard rev+1 without it, republishes that shard only, and in the same transaction
    erases every stored event carrying it (a field or inside text); nothing printed or audited
    holds a number or a pseudonym."""
    from edge.clock import FakeClock
    from edge.config import Privacy
    from edge.privacy.keys import KeyStore
    from edge.privacy.pseudonym import Pseudonymizer
    from edge.wire.downlink import consent_shard

    dsn = opts[1]
    keys = tmp_path / "tenants"
    (keys / "t-a").mkdir(parents=True)
    (keys / "t-a" / "tenant.key").write_bytes(TENANT_KEY)
    (keys / "t-a" / "tenant.key").chmod(0o600)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "tenant.key").write_bytes(TENANT_KEY)
    (tmp_path / "dev" / "tenant.key").chmod(0o600)
    device = Pseudonymizer(Privacy.model_validate({"classes": {"loyalty_id": {"policy": "stable"}}}),
                           KeyStore(tmp_path / "dev", FakeClock()), consent=frozenset())
    a, b, c = loyalty_numbers_in_two_shards()
    pa, pb, pc = (device.stable_pseudonym(Ident("loyalty_id", x)) for x in (a, b, c))
    assert pa is not None
    assert pb is not None
    assert pc is not None
    grant = tmp_path / "grant.txt"
    grant.write_text(f"# opted in at the till\n{a}\n{b}\n{pc}\n")
    common = [*opts, "--tenant", "t-a", "--tenant-keys", str(keys)]
    rc, out, err = await asyncio.to_thread(run, capsys, "consent", "grant", *common, "--json", str(grant))
    assert (rc, err) == (0, ""), err
    granted = json.loads(out)
    assert (granted["changed"], sorted(granted["published"])) == (3, sorted(consent_shard(p) for p in (pa, pb, pc)))

    day = "2026-12-01"
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT edge_event_partition(%s)", (day,))
        for i, data in enumerate(({"customer": pa}, {"text": f"receipt for {pa} ok"}, {"customer": pb}, {"n": 1})):
            conn.execute("INSERT INTO events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
                         " VALUES ('t-a', 's-a', 'd-1', 1, 1, %s, %s, 0, 'pos', 'receipt', %s)",
                         (i, day, json.dumps(data)))

    revoke = tmp_path / "revoke.txt"
    revoke.write_text(f"{a[:3].lower()} {a[3:5]}-{a[5:]}\n")  # another spelling of the same number
    rc, out, err = await asyncio.to_thread(run, capsys, "consent", "revoke", *common, str(revoke))
    assert (rc, err) == (0, ""), err
    shard = consent_shard(pa)
    assert out.splitlines() == ["t-a: revoked 1, unchanged 0, 2 stored event(s) erased",
                                f"  shard {shard} rev 2: 0 consented", f"  published 1 shard(s): {shard}"]
    assert rows(dsn, "SELECT id FROM events ORDER BY id") == [(2,), (3,)]

    got = await retained(nats_cluster, "edge/v1/t-a/_all/_all/consent/+")
    docs = {}
    for payload in got:
        d = msgpack.unpackb(msgpack.unpackb(payload)["d"])
        topic = f"edge/v1/t-a/_all/_all/consent/{d['shard']}"
        docs[d["shard"]] = verify_document(payload, topic=topic, prefix=PREFIX, trusted=TRUSTED).body
    assert {s: (d["rev"], d["consented"]) for s, d in docs.items()} == {
        shard: (2, []), consent_shard(pb): (1, [pb]), consent_shard(pc): (1, [pc])}

    audit = rows(dsn, "SELECT action, target, detail::text FROM fleet_audit ORDER BY id")
    assert [x[0] for x in audit] == ["consent.grant"] * 3 + ["consent.revoke"]
    assert audit[-1][1] == f"t-a/_all/_all/consent/{shard}"
    assert json.loads(str(audit[-1][2])) == {"shard": shard, "rev": 2, "members": 0, "removed": 1,
                                             "events_erased": 2}
    assert not any(secret in str(x) for x in audit for secret in (a, b, c, pa, pb, pc, "loy:"))
    assert not any(secret in out for secret in (a, pa, "loy:"))

    rc, out, _ = await asyncio.to_thread(run, capsys, "consent", "revoke", *common, "--json", str(revoke))
    assert (rc, json.loads(out)["published"], json.loads(out)["changed"]) == (0, [], 0)  # nothing changed twice

    bad = tmp_path / "bad.txt"
    bad.write_text(f"{a}\nloy:s00000000:{'a' * 26}\nnot:a:pseudonym\n")
    rc, out, err = await asyncio.to_thread(run, capsys, "consent", "grant", *common, str(bad))
    assert rc == 2
    assert f"{bad}:2: a pseudonym of another tenant key" in err
    assert f"{bad}:3: neither a loyalty number" in err
    assert "not:a:pseudonym" not in err


def reported(t: int, *, apply: str = "applied", oldest: float = 0.0, backlog: int = 0,
             layers: dict[str, int] | None = None, last_ack_ms: int = 1_700_000_000_000) -> bytes:
    """A downlink-v1 `reported` document as a device publishes it."""
    return json.dumps({
        "t": t, "software": "0.9.1", "layers": layers or {"tenant": 1, "store": 2, "device": 0},
        "effective": "ab" * 32,
        "apply": {"state": apply, "layer": "store", "ver": 2, "errors": ["drivers.pos[0].port: no such port"]
                  if apply != "applied" else []},
        "consent": {"shards": 3, "pseudonyms": 2}, "cloud_kids": [CLOUD_KID],
        "health": {"backlog": backlog, "oldest_unsent_s": oldest, "drivers": {"pos": "ok"}, "uplink": "online",
                   "last_ack_ms": last_ack_ms},
    }).encode()


async def test_fleet_status_lists_every_registered_device_and_problems_from_stored_documents(
    opts: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows come from the registry joined with the stored status/reported (handlers); --problems
    keeps the offline (last will, or never heard from), rolled-back, rejected and stale ones; an
    older reported copy does not replace a newer one; garbage is refused."""
    from cloud.fleet.handlers import ControlMessageError, handle_reported, handle_status

    dsn = opts[1]
    devices = [("t-a", "s-a", f"d-{i}") for i in range(1, 7)]
    register(dsn, *devices, ("t-b", "s-z", "d-9"))
    online, offline = b'{"state": "online", "device": "x", "kid": "0011"}', b'{"state": "offline", "device": "x"}'
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for ids in devices[:5]:
            await handle_status(conn, ids, online)
        await handle_status(conn, devices[1], offline)  # its last will
        # before its first layer a device reports `apply: null`
        await handle_reported(conn, devices[1], json.dumps({**json.loads(reported(2_000)), "apply": None}).encode())
        await handle_reported(conn, devices[0], reported(2_000, backlog=12))
        await handle_reported(conn, devices[0], reported(1_000, apply="rejected"))  # an older retained copy
        await handle_reported(conn, devices[2], reported(2_000, apply="rolled-back"))
        await handle_reported(conn, devices[3], reported(2_000, oldest=7200.0, backlog=40))
        await handle_reported(conn, devices[4], reported(2_000, apply="rejected"))
        fresh = json.loads(reported(2_000))
        fresh["apply"] = None  # a device that has not attempted a layer yet (other tenant: not listed below)
        await handle_reported(conn, ("t-b", "s-z", "d-9"), json.dumps(fresh).encode())
        cur = await conn.execute("SELECT reported->'apply' FROM fleet_device_state WHERE device = 'd-9'")
        assert await cur.fetchone() == (None,)
        for bad in (b"", b"null", b'{"t": "now"}', b'{"t": 1, "health": []}', b"x" * 300_000, b'{"t": 1e400}',
                    b'{"t": 99999999999999999999999}', b'{"t": 5, "software": "\\ud800"}', b'{"t": 5, "x": 1e999}',
                    b"[" * 50_000 + b"]" * 50_000):
            with pytest.raises(ControlMessageError):
                await handle_reported(conn, devices[0], bad)
        for bad in (b'{"state": "asleep"}', b"{}", b"\xff\xfe"):
            with pytest.raises(ValueError):  # noqa: PT011 - the handlers' contract: a ValueError subclass
                await handle_status(conn, devices[0], bad)

    rc, out, _ = await asyncio.to_thread(run, capsys, "fleet", "status", "--dsn", dsn, "--tenant", "t-a", "--json")
    assert rc == 0
    got = {r["device"]: r for r in json.loads(out)}
    assert sorted(got) == [f"d-{i}" for i in range(1, 7)]
    d1 = got["d-1"]
    assert (d1["state"], d1["software"], d1["layers"], d1["apply"], d1["backlog"]) == (
        "online", "0.9.1", {"tenant": 1, "store": 2, "device": 0}, "applied", 12)
    assert d1["last_ack"].startswith("2023-11-14T22:13:20")
    assert d1["problems"] == []
    assert {d: r["problems"] for d, r in got.items() if r["problems"]} == {
        "d-2": ["offline"], "d-3": ["rolled-back"], "d-4": ["stale"], "d-5": ["rejected"], "d-6": ["offline"]}
    assert got["d-6"]["state"] == "unknown"
    assert (got["d-2"]["software"], got["d-2"]["apply"], got["d-2"]["apply_detail"]) == ("0.9.1", None, [])
    assert got["d-3"]["apply_detail"] == ["drivers.pos[0].port: no such port"]

    rc, out, _ = await asyncio.to_thread(run, capsys, "fleet", "status", "--dsn", dsn, "--tenant", "t-a",
                                         "--problems", "--stale", "1h")
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "STATE", "LAST", "SEEN", "VERSION", "LAYERS", "T/S/D", "APPLY", "BACKLOG",
                                "OLDEST", "LAST", "ACK", "PROBLEMS"]
    assert [line.split()[0] for line in lines[1:]] == [f"t-a/s-a/d-{i}" for i in range(2, 7)]
    assert "rolled-back (1 errors)" in lines[2]
    assert lines[3].split()[-1] == "stale"
    assert "2h" in lines[3].split()
    rc, out, _ = await asyncio.to_thread(run, capsys, "fleet", "status", "--dsn", dsn, "--tenant", "t-a",
                                         "--problems", "--stale", "3h")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["t-a/s-a/d-2", "t-a/s-a/d-3", "t-a/s-a/d-5",
                                                                  "t-a/s-a/d-6"]


def test_the_audit_table_refuses_update_delete_and_truncate(opts: list[str]) -> None:
    """Rows are only ever added: the trigger refuses changing or removing one, even by the owner."""
    dsn = opts[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO fleet_audit (actor, action, target, detail, doc_sha256)"
                     " VALUES ('ops-alice', 'config.set', 't-a/_all/_all', '{\"ver\": 1}', %s)", (bytes(32),))
        for sql in ("UPDATE fleet_audit SET actor = 'mallory'", "DELETE FROM fleet_audit", "TRUNCATE fleet_audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(sql.encode())
    assert rows(dsn, "SELECT actor, action FROM fleet_audit") == [("ops-alice", "config.set")]


def test_config_set_without_a_reachable_broker_exits_1_and_stores_nothing(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong password is refused by every node: a clear message, exit 1, no version taken."""
    layer = tmp_path / "layer.yaml"
    layer.write_text("logging:\n  level: debug\n")
    monkeypatch.setenv("EDGE_CLOUD_BROKER_PASSWORD", "wrong")
    rc, out, err = run(capsys, "config", "set", *opts, "--tenant", "t-a", "--store", "s-a", str(layer))
    assert (rc, out) == (1, "")
    assert err.startswith("edge-cloud: no broker accepted the connection")
    assert "Traceback" not in err
    assert rows(opts[1], "SELECT count(*) FROM fleet_desired") == [(0,)]
