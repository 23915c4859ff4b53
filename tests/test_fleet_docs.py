"""docs/fleet.md runs as written: every `$ edge-cloud ...` line of its console blocks, in order,
against a real NATS cluster and PostgreSQL, with the files of its `file=NAME` blocks, the
environment its table names, and a fleet seeded as its examples describe (three registered
devices, their stored status/reported, one device answering commands, stored events of the
customer whose consent is withdrawn). Each command must exit as the guide says (0, or the
`# exits N` it notes), and print lines starting as the guide's do."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from pathlib import Path

import psycopg
import pytest
from support.nats import RunningNats
from test_fleet_cloud import fake_device, register, reported

from cloud.cli import main
from cloud.db.migrate import migrate
from edge.events import Ident
from edge.privacy.keys import tenant_kid
from edge.privacy.pseudonym import stable_pseudonym

pytestmark = pytest.mark.cloud

DOC = Path(__file__).resolve().parent.parent / "docs" / "fleet.md"
TENANT_KEY = bytes(range(50, 82))
FENCE = re.compile(r"^```(\w+)(?: file=(\S+))?\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[str, str | None, str]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(DOC.read_text())]


def commands(body: str) -> list[tuple[str, int, list[str]]]:
    """(command line, expected exit code, the guide's output lines) of a console block."""
    out: list[tuple[str, int, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            cmd, _, note = line[2:].partition("#")
            m = re.search(r"exits (\d+)", note)
            out.append((cmd.strip(), int(m.group(1)) if m else 0, []))
        elif out:
            out[-1][2].append(line)
    return out


def normalized(text: str) -> str:
    """A printed line with what differs from run to run (hashes, ids, times, ages) replaced."""
    for pattern, repl in ((r"\b[0-9a-f]{64}\b", "<hash>"), (r"\bc[0-9a-f]{24}\b", "<id>"),
                          (r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d(\.\d+)?)?(\+00:00)?", "<time>"),
                          (r"\b\d+[smhd] ago\b", "<ago>"), (r"\b\d{13}\b", "<ms>"), (r" +", " ")):
        text = re.sub(pattern, repl, text)
    return text.strip()


def test_the_guide_has_commands_and_files() -> None:
    kinds = [k for k, _, _ in blocks()]
    assert kinds.count("console") >= 6
    assert all(name for k, name, _ in blocks() if k in ("yaml", "text"))


async def test_every_command_of_the_fleet_guide_runs_as_written(
    pg_dsn: str, nats_cluster: RunningNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cloud.fleet.handlers import handle_reported, handle_status

    migrate(pg_dsn)
    key = tmp_path / "cloud.key"
    key.write_text(bytes(range(100, 132)).hex() + "\n")
    key.chmod(0o600)
    (tmp_path / "tenants" / "acme").mkdir(parents=True)
    (tmp_path / "tenants" / "acme" / "tenant.key").write_bytes(TENANT_KEY)
    (tmp_path / "tenants" / "acme" / "tenant.key").chmod(0o600)
    for name, value in (("DSN", pg_dsn), ("BROKER", ",".join(nats_cluster.nats.mqtt_urls)), ("BROKER_USER", "admin"),
                        ("BROKER_PASSWORD", nats_cluster.password("admin")), ("KEY", str(key)),
                        ("TENANT_KEYS", str(tmp_path / "tenants")), ("ACTOR", "alice")):
        monkeypatch.setenv(f"EDGE_CLOUD_{name}", value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    till1, till2, other = ("acme", "s001", "till-1"), ("acme", "s001", "till-2"), ("acme", "s002", "till-1")
    register(pg_dsn, till1, till2, other)
    online, offline = b'{"state": "online"}', b'{"state": "offline"}'
    now_ms = time.time_ns() // 1_000_000
    withdrawn = stable_pseudonym(Ident("loyalty_id", "LOY-1001-77"), tenant_kid(TENANT_KEY), TENANT_KEY)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        for ids in (till1, till2, other):
            await handle_status(conn, ids, online)
        await handle_status(conn, other, offline)
        store_rollout = {"tenant": 0, "store": 1, "device": 0}
        await handle_reported(conn, till1, reported(now_ms, backlog=3, oldest=0.4, layers=store_rollout,
                                                    last_ack_ms=now_ms))
        await handle_reported(conn, till2, reported(now_ms, layers=store_rollout, last_ack_ms=now_ms))
        await handle_reported(conn, other, reported(now_ms, apply="rolled-back", oldest=7200.0, backlog=5120,
                                                    layers={"tenant": 0, "store": 0, "device": 0},
                                                    last_ack_ms=now_ms - 7_300_000))
        await conn.execute("SELECT edge_event_partition('2026-12-05')")
        for i, data in enumerate(({"customer": withdrawn}, {"customer": withdrawn, "total": 12}, {"n": 1})):
            await conn.execute("INSERT INTO events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
                               " VALUES ('acme', 's001', 'till-1', 1, 1, %s, '2026-12-05', 0, 'pos', 'receipt', %s)",
                               (i, json.dumps(data)))
        await conn.commit()

    ready, answered = asyncio.Event(), list[dict[str, object]]()
    device = asyncio.create_task(fake_device(nats_cluster, till1, ready, answered, user="admin"))
    ran = 0
    try:
        async with asyncio.timeout(15):
            await ready.wait()
        for kind, file_name, body in blocks():
            if file_name is not None:
                (work / file_name).write_text(body)
            if kind != "console":
                continue
            for line, want_rc, want_out in commands(body):
                argv = shlex.split(line)
                assert argv[0] == "edge-cloud"
                capsys.readouterr()
                rc = await asyncio.to_thread(main, argv[1:])
                got = capsys.readouterr()
                printed = (got.out + got.err).splitlines()
                assert rc == want_rc, f"{line}: exit {rc}\n{got.out}{got.err}"
                assert len(printed) == len(want_out), f"{line}:\n{got.out}{got.err}"
                for doc_line, real in zip(want_out, printed, strict=True):
                    shown = normalized(doc_line)
                    if shown.endswith("...}]"):
                        assert normalized(real).startswith(shown[:-5]), f"{line}:\n{real}"
                    else:
                        assert normalized(real) == shown, f"{line}:\n{real}"
                ran += 1
    finally:
        device.cancel()
    assert ran >= 12
    rows = (await asyncio.to_thread(_rows, pg_dsn))
    assert rows == [(2,)]  # the withdrawn customer's events erased, the other one kept


def _rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id FROM events").fetchall()
