"""The fleet simulator against a real mosquitto and the real receiver (SQLite store).

Every simulated device runs the real uplink: what must hold is what holds for a real fleet. Each
device's events reach the receiver verified and exactly once, its chain links seq 1..k, its buffer
is empty at the end; a broker restart mid-run loses and duplicates nothing; acks not signed by the
cloud key delete nothing. Wire constants (topic layout, table names) are literals here.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.mosquitto import Mosquitto

from cloud.cli import main as cloud_main
from cloud.config import ReceiverConfig
from cloud.fleetsim import Fleet, FleetReport, FleetSpec
from cloud.receiver import Receiver

pytestmark = pytest.mark.mosquitto

WAIT = 20.0


def cloud_key(tmp_path: Path) -> tuple[Path, str]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "cloud.key"
    path.write_text(key.private_bytes_raw().hex() + "\n")
    path.chmod(0o600)
    return path, key.public_key().public_bytes_raw().hex()


def receiver_cfg(tmp_path: Path, url: str, key: Path) -> ReceiverConfig:
    (tmp_path / "keys").mkdir(exist_ok=True)
    return ReceiverConfig.model_validate({
        "broker": url, "client_id": "fleet-receiver", "keys_dir": tmp_path / "keys",
        "db": tmp_path / "recv" / "receiver.db", "out": tmp_path / "recv" / "events.jsonl", "cloud_key": key,
    })  # fmt: skip


@asynccontextmanager
async def running(cfg: ReceiverConfig) -> AsyncIterator[Receiver]:
    receiver = Receiver(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.run(stop))
    try:
        async with asyncio.timeout(WAIT):
            await receiver.ready.wait()
        yield receiver
    finally:
        stop.set()
        async with asyncio.timeout(WAIT):
            await task


def spec(tmp_path: Path, url: str, public: str, **kw: Any) -> FleetSpec:
    fields: dict[str, Any] = {"devices": 20, "events": 200, "broker": url, "state": tmp_path / "fleet",
                              "keys_dir": tmp_path / "keys", "cloud_public_key": public, "tenant": "acme",
                              "timeout": 60.0}  # fmt: skip
    fields.update(kw)
    return FleetSpec(**fields)


def check_received(cfg: ReceiverConfig, devices: int, events: int) -> None:
    """Per device: events 1..`events` stored exactly once; batches seq 1..k, each prev = previous hh."""
    ids: dict[str, list[int]] = defaultdict(list)
    for line in cfg.out.read_text().splitlines():
        rec = json.loads(line)
        assert rec["tenant"] == "acme"
        ids[f"{rec['store']}/{rec['device']}"].append(int(rec["id"]))
    assert len(ids) == devices
    for name, got in ids.items():
        dupes = [i for i, n in Counter(got).items() if n > 1]
        assert not dupes, f"{name}: duplicated event ids {dupes[:10]}"
        assert sorted(got) == list(range(1, events + 1)), f"{name}: missing events"
    with sqlite3.connect(cfg.db) as db:
        rows = db.execute("SELECT store, device, seq, hh, prev, linked, n FROM batches "
                          "ORDER BY store, device, seq").fetchall()  # fmt: skip
    chains: dict[tuple[str, str], list[tuple[int, bytes, bytes, int, int]]] = defaultdict(list)
    for store, device, seq, hh, prev, linked, n in rows:
        chains[(store, device)].append((seq, hh, prev, linked, n))
    assert len(chains) == devices
    for (store, device), chain in chains.items():
        assert [c[0] for c in chain] == list(range(1, len(chain) + 1)), f"{store}/{device}: seq hole or repeat"
        expected_prev = bytes(32)
        for seq, hh, prev, linked, _n in chain:
            assert prev == expected_prev, f"{store}/{device} seq {seq}: prev does not link"
            assert linked == 1
            expected_prev = hh
        assert sum(c[4] for c in chain) == events


def check_buffers_empty(tmp_path: Path, report: FleetReport) -> None:
    """Every device's SQLite buffer holds no event and no batch (read directly, not via the report)."""
    for d in report.devices:
        path = tmp_path / "fleet" / d.store / d.device / "state" / "buffer.db"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            assert db.execute("SELECT count(*) FROM events").fetchone() == (0,), d.store
            assert db.execute("SELECT count(*) FROM batches").fetchone() == (0,), d.store


async def test_twenty_devices_reach_the_receiver_verified_once_in_chain_order_and_drain_their_buffers(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    key, public = cloud_key(tmp_path)
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)
    fleet = Fleet(spec(tmp_path, mosquitto.url, public))
    await fleet.open()  # keys registered before the receiver loads its folder
    async with running(cfg) as receiver:
        report = await fleet.run()
    assert report.complete
    assert (report.generated, report.acked) == (4000, 4000)
    assert (report.backlog_events, report.batches_pending) == (0, 0)
    assert receiver.stats.events == 4000
    assert receiver.stats.rejected == {}
    assert len({(d.store, d.device) for d in report.devices}) == 20
    check_received(cfg, 20, 200)
    check_buffers_empty(tmp_path, report)
    # each device's key, in the receiver's layout, is the key its batches verified against
    pubs = sorted((tmp_path / "keys" / "acme").glob("*/*.pub"))
    assert len(pubs) == 20
    assert pubs[0].relative_to(tmp_path / "keys").as_posix() == "acme/store-0001/edge-0001.pub"
    assert all(len(p.read_text().strip()) == 64 for p in pubs)
    assert len({p.read_text() for p in pubs}) == 20


async def test_a_broker_restart_mid_run_loses_and_duplicates_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    key, public = cloud_key(tmp_path)
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)
    restarted = asyncio.Event()

    def progress(fleet: Fleet) -> None:
        # restart once a good part (but not all) is acked: batches are in flight on both sides
        if not restarted.is_set() and fleet.acked() >= 1000:
            restarted.set()
            mosquitto.restart()

    fleet = Fleet(spec(tmp_path, mosquitto.url, public, rate=100.0), on_progress=progress)
    await fleet.open()
    async with running(cfg) as receiver:
        report = await fleet.run()
    assert restarted.is_set()
    check_buffers_empty(tmp_path, report)
    assert report.complete, (report.as_dict()["backlog"], receiver.stats)
    assert sum(d.connects for d in report.devices) >= 40  # every device connected again
    check_received(cfg, 20, 200)
    check_buffers_empty(tmp_path, report)


async def test_acks_not_signed_by_the_configured_cloud_key_delete_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    key, _public = cloud_key(tmp_path)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)
    fleet = Fleet(spec(tmp_path, mosquitto.url, other, devices=2, events=10, timeout=3.0))
    await fleet.open()
    async with running(cfg) as receiver:
        report = await fleet.run()
    assert receiver.stats.events == 20  # the receiver stored them and answered...
    assert not report.complete  # ...but the devices refused its acks and kept their batches
    assert report.acked == 0
    assert sum(d.acks_forged for d in report.devices) >= 2
    assert report.batches_pending >= 2


async def test_devices_holding_their_whole_backlog_offline_connect_at_once_and_drain_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """offline_first: every event is buffered before any uplink starts (a reconnect storm)."""
    key, public = cloud_key(tmp_path)
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)
    fleet = Fleet(spec(tmp_path, mosquitto.url, public, devices=10, events=300, offline_first=True))
    await fleet.open()
    async with running(cfg):
        report = await fleet.run()
    assert report.complete
    assert report.acked == 3000
    check_received(cfg, 10, 300)
    check_buffers_empty(tmp_path, report)


async def test_a_second_run_on_the_same_state_continues_each_devices_ids_and_chain(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    key, public = cloud_key(tmp_path)
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)
    first = Fleet(spec(tmp_path, mosquitto.url, public, devices=3, events=20))
    await first.open()
    async with running(cfg):
        assert (await first.run()).complete
        again = await Fleet(spec(tmp_path, mosquitto.url, public, devices=3, events=20)).run()
    assert again.complete
    assert again.acked == 60
    check_received(cfg, 3, 40)  # ids 1..40 and seq 1..k per device: same keys, same chains


def test_cli_runs_a_fleet_and_prints_a_json_summary(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge-cloud fleet-sim` with a cloud key file; exit 0 once everything is acked."""
    key, _public = cloud_key(tmp_path)
    cfg = receiver_cfg(tmp_path, mosquitto.url, key)

    args = ["fleet-sim", "--devices", "3", "--events", "50", "--broker", mosquitto.url,
            "--state", str(tmp_path / "fleet"), "--keys-dir", str(tmp_path / "keys"),
            "--cloud-key", str(key), "--tenant", "acme", "--timeout", "30"]  # fmt: skip
    assert cloud_main([*args, "--init-only"]) == 0
    assert "3 device(s) ready" in capsys.readouterr().out
    assert len(list((tmp_path / "keys" / "acme").glob("*/*.pub"))) == 3

    async def both() -> int:
        async with running(cfg):
            return await asyncio.to_thread(cloud_main, [*args, "--json"])

    assert asyncio.run(both()) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["devices"], out["generated"], out["acked"], out["complete"], out["backlog"]) == (3, 150, 150, True, {})
    assert out["rss_peak_kib"] > 0
    check_received(cfg, 3, 50)


def test_cli_refuses_a_malformed_cloud_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cloud_main(["fleet-sim", "--devices", "1", "--events", "1", "--state", str(tmp_path),
                       "--cloud-public-key", "abcd"])  # fmt: skip
    assert code == 2
    assert "64 hex" in capsys.readouterr().err


@pytest.mark.cloud
async def test_against_the_chain_cloud_keys_go_to_the_postgresql_registry_and_devices_log_in_as_their_store(
    tmp_path: Path, pg_dsn: str
) -> None:
    import psycopg

    from cloud.db.migrate import migrate
    from cloud.db.registry import list_devices
    from cloud.fleetsim import device_config

    migrate(pg_dsn)
    password = tmp_path / "pw"
    password.write_text("secret")
    creds = {f"store-{i:04d}": (f"acme.store-{i:04d}", password) for i in (1, 2, 3)}
    fleet = Fleet(spec(tmp_path, "mqtt://127.0.0.1:1", "00" * 32, devices=3, registry_dsn=pg_dsn, credentials=creds))
    await fleet.open()
    try:
        with psycopg.connect(pg_dsn) as conn:
            rows = list_devices(conn, tenant="acme")
        assert [(r.store, r.device, r.state) for r in rows] == [
            (f"store-{i:04d}", f"edge-{i:04d}", "active") for i in (1, 2, 3)]
        assert {r.kid for r in rows} == {d.rt.keys.kid() for d in fleet.devices}
        assert not (tmp_path / "keys").exists()  # not in the file layout as well
        await fleet.close()
        fleet = Fleet(fleet.spec)
        await fleet.open()  # a second run registers the same keys again: idempotent
        with psycopg.connect(pg_dsn) as conn:
            assert len(list_devices(conn, tenant="acme")) == 3
    finally:
        await fleet.close()
    auth = device_config(fleet.spec, 2).uplink.auth
    assert auth is not None
    assert (auth.username, auth.password_file) == ("acme.store-0002", password)
