"""`edge-cloud fleet-demo` as an operator runs it, and the checks its summary rests on.

What must hold: one command brings up the local cloud, 2 ingest workers and N simulated stores
(their own MQTT credentials, their keys in the registry) and exits 0 with a summary checked
from PostgreSQL: events sent = stored, no duplicate, chains intact, no raw identifier; the
workers are stopped and the cluster is left running. A second run continues the chains. The
audit behind it (cloud/db/audit.py) sees a hole in a chain, a broken prev link, an event stored
twice and an identifier-shaped value, and names no value.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cloud.cluster.local import State
from cloud.db.audit import audit, identifier_kinds
from cloud.db.migrate import migrate

pytestmark = pytest.mark.cloud

CLI = [sys.executable, "-m", "cloud.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def cloud_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="store-edge-fleet-demo-", dir="/tmp"))
    base.chmod(0o755)  # as root, PostgreSQL runs as an unprivileged user who must reach it
    yield base / "cloud"
    _run("down", "--dir", str(base / "cloud"))
    shutil.rmtree(base, ignore_errors=True)


def test_the_fleet_demo_of_3_stores_is_checked_from_postgresql_and_exits_0(cloud_dir: Path) -> None:
    t0 = time.monotonic()
    res = _run("fleet-demo", "--dir", str(cloud_dir), "--stores", "3", "--events", "100", "--json")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["ok"] is True
    figures = (doc["stores"], doc["generated"], doc["acked"], doc["sent_all_runs"], doc["stored"])
    assert figures == (3, 300, 300, 300, 300)
    assert (doc["duplicates"], doc["raw_identifiers"], doc["quarantined"], doc["left_in_buffers"]) == (0, 0, 0, 0)
    assert doc["chains_intact"] is True
    assert all(doc["verdicts"].values()), doc["verdicts"]
    assert doc["workers_exit"] == [0, 0]
    print(f"fleet demo 3 x 100: {took:.1f} s ({doc['seconds']})")

    state = State.load(cloud_dir)
    assert state is not None
    assert sorted(state.stores) == ["demo/store-0001", "demo/store-0002", "demo/store-0003"]
    dsn = f"postgresql://edge:{state.pg_password}@127.0.0.1:{state.pg_port}/edge"
    with psycopg.connect(dsn) as conn:  # the cluster is still up; every device registered for its store
        rows = conn.execute("SELECT store, device, state FROM devices WHERE tenant = 'demo' ORDER BY store").fetchall()
    assert rows == [(f"store-000{i}", f"edge-000{i}", "active") for i in (1, 2, 3)]

    again = _run("fleet-demo", "--dir", str(cloud_dir), "--stores", "3", "--events", "100")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sent (all runs)   600 events, 0 left in device buffers" in again.stdout
    assert "OK: every check holds" in again.stdout
    assert f"edge-cloud down --dir {cloud_dir}" in again.stdout


# -- the audit ------------------------------------------------------------------------------------

_BATCH = ("INSERT INTO batches (tenant, store, device, epoch, seq, hh, prev, kid, linked, n, first_id, last_id,"
          " sealed_ms, synced) VALUES ('t', 's', %s, 1, %s, %s, %s, '0123456789abcdef', true, 1, %s, %s, 0, true)")
_EVENT = ("INSERT INTO events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
          " VALUES ('t', 's', %s, 1, %s, %s, now(), 0, 'edge', 'edge.sim', %s)")


def _h(i: int) -> bytes:
    return bytes([i]) * 32


def test_the_audit_finds_holes_broken_links_duplicates_and_identifiers(pg_dsn: str) -> None:
    migrate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SELECT edge_ensure_event_partitions(now(), now())")
        for seq, prev in ((1, 0), (2, 1), (3, 2)):  # "good": seq 1..3, each prev the previous hh
            conn.execute(_BATCH, ("good", seq, _h(seq), _h(prev), seq, seq))
            conn.execute(_EVENT, ("good", seq, seq, json.dumps({"gtin": "04045865763901", "n": seq})))
        conn.execute(_BATCH, ("hole", 1, _h(1), _h(0), 1, 1))  # seq 2 missing
        conn.execute(_BATCH, ("hole", 3, _h(3), _h(2), 3, 3))
        conn.execute(_BATCH, ("link", 1, _h(1), _h(0), 1, 1))
        conn.execute(_BATCH, ("link", 2, _h(2), _h(9), 2, 2))  # prev is not seq 1's hh
        conn.execute(_EVENT, ("dup", 1, 7, "{}"))
        conn.execute(_EVENT, ("dup", 1, 7, "{}"))
        conn.execute(_EVENT, ("leak", 1, 1, json.dumps({"who": ["D4:21:8B:70:F3:5C"], "tel": "+44 20 7946 0958"})))
        result = audit(conn, tenant="t", stores=["s"])
        assert audit(conn, tenant="other").devices == {}
    good = result.devices[("t", "s", "good")]
    assert (good.events, good.duplicates, good.batches, good.chain_intact) == (3, 0, 3, True)
    broken = "1 batch(es) whose prev is not the previous batch's hash"
    assert result.devices[("t", "s", "hole")].chain_problems == ["epoch 1: 2 batches with seq 1..3", broken]
    assert result.devices[("t", "s", "link")].chain_problems == [broken]
    assert result.devices[("t", "s", "dup")].duplicates == 1
    assert result.duplicates == 1
    assert not result.chains_intact
    assert sorted((f.device, f.id, f.kind) for f in result.findings) == [("leak", 1, "mac"), ("leak", 1, "phone")]
    assert "D4:21" not in " ".join(str(f) for f in result.findings)


@pytest.mark.parametrize(("text", "kinds"), [
    ("D4:21:8B:70:F3:5C", ["mac"]), ("04F6E5D4C3B2A1", ["hex_id"]), ("4111 1111 1111 1111", ["card"]),
    ("john.roe@example.org", ["email"]), ("+44 20 7946 0958", ["phone"]),
    ("04045865763901", []),  # a GTIN-14 (products start with 0, as national phone numbers do)
    ("ble:e1:yqlwo4h2ostfmr5ywliwjm73ia", []), ("4875-01-003311", []), ("1796517119421", []),
])  # fmt: skip
def test_identifier_shapes(text: str, kinds: list[str]) -> None:
    assert identifier_kinds(text) == kinds
