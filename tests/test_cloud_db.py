"""The PostgreSQL store of record on a real server: migrations, partitions, tokens, the registry.

What must hold: migrations apply to an empty database and re-run as no-ops (an edited applied
migration is refused); events partitions are made on demand per UTC day and retention drops
them; `edge-cloud tokens create` prints `{token_id}.{base32 secret}` whose secret is stored
sealed, never in clear; `edge-cloud devices add|list|revoke` keep one key per device.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from pathlib import Path

import psycopg
import pytest

from cloud.cli import main
from cloud.db import migrate as migrate_mod
from cloud.db.errors import DbError
from cloud.db.migrate import migrate, migrations
from cloud.db.tokens import TokenKey

pytestmark = pytest.mark.cloud

TABLES = {"schema_migrations", "devices", "enrollment_tokens", "chains", "batches", "events", "rejected_batches"}


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        parted = conn.execute("SELECT relname FROM pg_class WHERE relkind = 'p'").fetchall()
    return {str(r[0]) for r in rows} | {str(r[0]) for r in parted}


def test_migrations_apply_to_an_empty_database_and_rerun_as_no_ops(pg_dsn: str) -> None:
    assert _tables(pg_dsn) == set()
    done = migrate(pg_dsn)
    assert [m.version for m in done] == [m.version for m in migrations()]
    assert done[0].name == "init"
    assert _tables(pg_dsn) >= TABLES
    assert migrate(pg_dsn) == []
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert rows[0] == (1, "init")


def test_cli_migrate_twice(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--dsn", pg_dsn]) == 0
    assert "applied 0001_init" in capsys.readouterr().out
    assert main(["db", "migrate", "--dsn", pg_dsn]) == 0
    assert "schema up to date" in capsys.readouterr().out


def test_an_applied_migration_that_changed_is_refused(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(pg_dsn)
    real = migrations()
    edited = [migrate_mod.Migration(m.version, m.name, m.sql + "\n-- edited\n") for m in real]
    monkeypatch.setattr(migrate_mod, "migrations", lambda: edited)
    with pytest.raises(DbError, match="changed after it was applied"):
        migrate(pg_dsn)


def test_a_failing_migration_leaves_nothing_behind(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [*migrations(), migrate_mod.Migration(len(migrations()) + 1, "broken",
                                                "CREATE TABLE half (x int);\nSELECT no_such_function();")]
    monkeypatch.setattr(migrate_mod, "migrations", lambda: bad)
    with pytest.raises(DbError, match="broken failed"):
        migrate(pg_dsn)
    assert "half" not in _tables(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (len(bad) - 1,)


def _insert_event(conn: psycopg.Connection[tuple[object, ...]], ts: dt.datetime) -> None:
    conn.execute(
        "INSERT INTO events (tenant, store, device, epoch, seq, id, ts, ts_ms, src, type, data)"
        " VALUES ('t1', 's1', 'd1', 1, 1, 1, %s, 0, 'edge', 'edge.test', '{}')", (ts,))


def test_event_partitions_are_made_on_demand_per_utc_day_and_retention_drops_them(pg_dsn: str) -> None:
    migrate(pg_dsn)
    day = dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC)
    with psycopg.connect(pg_dsn) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):  # no partition for that day yet
            _insert_event(conn, day)
        conn.rollback()
        made = conn.execute("SELECT edge_ensure_event_partitions(%s, %s)",
                            (day, day + dt.timedelta(days=2))).fetchone()
        assert made == (3,)
        assert conn.execute("SELECT edge_ensure_event_partitions(%s, %s)", (day, day)).fetchone() == (0,)
        _insert_event(conn, day)
        _insert_event(conn, day + dt.timedelta(minutes=2))  # 2026-03-02 00:01 UTC: the next partition
        conn.commit()
        counts = conn.execute("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall()
        assert counts == [("events_20260301", 1), ("events_20260302", 1)]
        with pytest.raises(psycopg.errors.RaiseException, match="exceeds 400"):
            conn.execute("SELECT edge_ensure_event_partitions(%s, %s)", (day, day + dt.timedelta(days=500)))
        conn.rollback()
        assert conn.execute("SELECT edge_drop_event_partitions('2026-03-02')").fetchone() == (1,)
        conn.commit()
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
        parts = conn.execute("SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'events_2026%'"
                             " ORDER BY 1").fetchall()
        assert [p[0] for p in parts] == ["events_20260302", "events_20260303"]


def test_tokens_create_prints_a_one_time_token_whose_secret_is_stored_sealed(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    migrate(pg_dsn)
    key_path = tmp_path / "token.key"
    key = TokenKey.load(key_path, create=True)
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert main(["tokens", "create", "--dsn", pg_dsn, "--token-key", str(key_path),
                 "--tenant", "t1", "--store", "s1", "--ttl", "2h"]) == 0
    text = capsys.readouterr().out.strip()
    m = re.fullmatch(r"([a-z0-9]+)\.([A-Z2-7]+)", text)
    assert m is not None, text
    token_id, secret_b32 = m.groups()
    secret = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    assert len(secret) == 32
    assert "=" not in text
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT tenant, store, secret_sealed, expires_at - created_at, used_at"
                           " FROM enrollment_tokens WHERE token_id = %s", (token_id,)).fetchone()
    assert row is not None
    tenant, store, sealed, ttl, used = row
    assert (tenant, store, ttl, used) == ("t1", "s1", dt.timedelta(hours=2), None)
    assert isinstance(sealed, bytes)
    assert secret not in sealed
    assert key.open(token_id, sealed) == secret
    with pytest.raises(DbError):
        key.open("other", sealed)  # bound to its token id


def test_tokens_create_refuses_bad_scope_and_ttl(pg_dsn: str, tmp_path: Path) -> None:
    migrate(pg_dsn)
    key_path = tmp_path / "token.key"
    TokenKey.load(key_path, create=True)
    base = ["tokens", "create", "--dsn", pg_dsn, "--token-key", str(key_path)]
    assert main([*base, "--tenant", "T1", "--store", "s1"]) == 1
    assert main([*base, "--tenant", "t1", "--store", "s1", "--ttl", "soon"]) == 1


def test_devices_add_list_revoke(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    migrate(pg_dsn)
    pub = bytes(range(32)).hex()
    other = bytes(range(1, 33)).hex()
    base = ["--dsn", pg_dsn]
    add = ["devices", "add", *base, "--device", "d1", "--public-key", pub]
    assert main([*add, "--tenant", "t1", "--store", "s1"]) == 0
    assert main([*add, "--tenant", "t1", "--store", "s1"]) == 0  # idempotent
    assert main([*add, "--tenant", "t1", "--store", "s2"]) == 1  # one key belongs to one device
    assert main(["devices", "add", *base, "--tenant", "t2", "--store", "s1", "--device", "d9",
                 "--public-key", other]) == 0
    capsys.readouterr()
    assert main(["devices", "list", *base, "--tenant", "t1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["tenant"], d["store"], d["device"], d["state"]) for d in listed] == [("t1", "s1", "d1", "active")]
    assert listed[0]["kid"] == "630dcd2966c43366"  # first 8 bytes of SHA-256 over bytes 0..31
    assert main(["devices", "revoke", *base, "--tenant", "t1", "--store", "s1", "--device", "d1"]) == 0
    assert main(["devices", "revoke", *base, "--tenant", "t1", "--store", "s1", "--device", "d1"]) == 1
    capsys.readouterr()
    assert main(["devices", "list", *base, "--json"]) == 0
    states = {(d["tenant"], d["device"]): d["state"] for d in json.loads(capsys.readouterr().out)}
    assert states == {("t1", "d1"): "revoked", ("t2", "d9"): "active"}
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT revoked_at IS NOT NULL FROM devices WHERE device = 'd1'").fetchone() == (True,)
