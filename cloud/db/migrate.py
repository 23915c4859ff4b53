"""Numbered schema migrations: `cloud/db/migrations/NNNN_name.sql`, applied in order, each once.

`schema_migrations` records every applied version with the SHA-256 of its file; a file changed
after it was applied is an error (write a new migration instead). Each migration runs in its own
transaction together with its record, so a failing one leaves nothing behind. Concurrent runs
(two workers starting at once) serialize on an advisory lock; the second finds nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from cloud.db.errors import DbError

_NAME_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_LOCK_KEY = 0x65646765_636C6F75  # "edgeclou": the advisory lock of the migration runner

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(slots=True, frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """Every migration shipped with the package, by version; gaps and duplicates are errors."""
    found: list[Migration] = []
    for entry in resources.files("cloud.db").joinpath("migrations").iterdir():
        m = _NAME_RE.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda x: x.version)
    versions = [x.version for x in found]
    if versions != list(range(1, len(found) + 1)):
        raise DbError(f"migration versions must be 1..N without gaps or repeats, found {versions}")
    return found


def applied(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    """version -> sha256 of what the database has applied (empty for a fresh database)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if exists is None or exists[0] is None:
        return {}
    rows = conn.execute("SELECT version, sha256 FROM schema_migrations").fetchall()
    return {int(str(v)): str(h) for v, h in rows}


def migrate(dsn: str) -> list[Migration]:
    """Apply every pending migration; returns those applied now (empty when up to date)."""
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DbError(f"cannot connect to PostgreSQL: {exc}".strip(),
                      hint="check --dsn (postgresql://user:password@host:port/db) and that the server runs") from None
    done: list[Migration] = []
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(_BOOKKEEPING)
            have = applied(conn)
            for mig in migrations():
                if mig.version in have:
                    if have[mig.version] != mig.sha256:
                        raise DbError(f"migration {mig.version:04d}_{mig.name} changed after it was applied",
                                      hint="never edit an applied migration; add a new numbered one")
                    continue
                try:
                    with conn.transaction():
                        conn.execute(mig.sql.encode())  # no parameters: the file is sent as one script
                        conn.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                                     (mig.version, mig.name, mig.sha256))
                except psycopg.Error as exc:
                    raise DbError(f"migration {mig.version:04d}_{mig.name} failed: {exc}".strip(),
                                  hint="nothing of it was applied; fix the migration and run again") from None
                done.append(mig)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return done
