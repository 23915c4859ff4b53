"""`edge-cloud up --dir DIR` / `down` as an operator runs them (the installed console script).

What must hold: up starts 3 NATS nodes and PostgreSQL (initdb and migrations on first use) and
prints their URLs; a second up is a no-op that keeps ports and passwords and adds a store; the
printed DSN and NATS URLs work; down stops every process and a second down says so; up again
comes back on the same data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import nats
import psycopg
import pytest

from cloud.db.migrate import migrations

pytestmark = pytest.mark.cloud

CLI = [sys.executable, "-m", "cloud.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def _pids(dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(dir)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


@pytest.fixture
def cloud_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="store-edge-up-", dir="/tmp"))
    base.chmod(0o755)  # as root, PostgreSQL runs as an unprivileged user who must reach it
    yield base / "cloud"
    _run("down", "--dir", str(base / "cloud"))
    shutil.rmtree(base, ignore_errors=True)


async def _check_nats(urls: list[str], mqtt_url: str, user: str, password: str) -> None:
    nc = await nats.connect(servers=urls)
    try:
        info = await nc.jetstream().stream_info("EDGE_BATCHES")
        assert info.config.num_replicas == 3
    finally:
        await nc.close()
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), username=user, password=password, identifier="up-test",
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.publish("edge/v1/t1/s1/up-test/batch", b"x", qos=1)


def test_up_down_round_trip(cloud_dir: Path) -> None:
    first = _run("up", "--dir", str(cloud_dir), "--store", "t1/s1", "--json")
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout)
    assert len(info["nats_urls"]) == 3
    assert len(info["mqtt_urls"]) == 3
    assert info["postgres_dsn"].startswith("postgresql://edge:")
    assert set(info["stores"]) == {"t1/s1"}

    again = _run("up", "--dir", str(cloud_dir), "--store", "t1/s2", "--json")
    assert again.returncode == 0, again.stderr
    info2 = json.loads(again.stdout)
    assert info2["nats_urls"] == info["nats_urls"]
    assert info2["postgres_dsn"] == info["postgres_dsn"]
    assert set(info2["stores"]) == {"t1/s1", "t1/s2"}
    assert info2["stores"]["t1/s1"] == info["stores"]["t1/s1"]

    with psycopg.connect(info["postgres_dsn"]) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (len(migrations()),)
    admin = f"nats://admin:{info['users']['admin']}@" + info["nats_urls"][0].removeprefix("nats://")
    cred = info2["stores"]["t1/s1"]
    asyncio.run(_check_nats([admin], info["mqtt_urls"][1], cred["user"], cred["password"]))
    plain = _run("up", "--dir", str(cloud_dir))
    assert plain.returncode == 0
    assert "PostgreSQL  postgresql://" in plain.stdout
    assert "MQTT        mqtt://" in plain.stdout
    assert len(_pids(cloud_dir)) >= 4  # 3 nats-server + the postmaster (and its children)

    down = _run("down", "--dir", str(cloud_dir))
    assert down.returncode == 0
    assert "stopped" in down.stdout
    assert _pids(cloud_dir) == []
    assert "stopped" in _run("down", "--dir", str(cloud_dir)).stdout  # idempotent

    back = _run("up", "--dir", str(cloud_dir), "--json")
    assert back.returncode == 0, back.stderr
    with psycopg.connect(json.loads(back.stdout)["postgres_dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(migrations()),)


def test_down_of_an_empty_folder_and_up_with_a_bad_store_are_clear(tmp_path: Path) -> None:
    res = _run("down", "--dir", str(tmp_path / "nothing"))
    assert res.returncode == 0
    assert "nothing to stop" in res.stdout
    res = _run("up", "--dir", str(tmp_path / "bad"), "--store", "T1/s1")
    assert res.returncode == 1
    assert "not a valid id" in res.stderr
