"""A real PostgreSQL for tests (Debian's server binaries, our own cluster on a free port).

The folder is made under /tmp with mode 0755 so that, when tests run as root, the unprivileged
user the server runs as can reach it. `fresh_database(pg)` gives each test its own empty
database (CREATE DATABASE is fast; initdb is not).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from cloud.cluster.postgres import LocalPostgres
from cloud.cluster.procs import free_port


@contextmanager
def running_postgres() -> Iterator[LocalPostgres]:
    base = Path(tempfile.mkdtemp(prefix="store-edge-pg-", dir="/tmp"))
    base.chmod(0o755)
    pg = LocalPostgres(base / "pg", port=free_port(), password=secrets.token_hex(12),
                       settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
    try:
        pg.init(sync=False)
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(pg: LocalPostgres) -> str:
    """DSN of a new, empty database on `pg`."""
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    return pg.dsn.rsplit("/", 1)[0] + "/" + name
