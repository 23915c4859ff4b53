"""Shared pytest fixtures. Keep each fixture small and say what it provides; add new ones below.

MQTT brokers (support.mosquitto; pytest puts tests/ on sys.path, so helpers import as `support.*`):
  `mosquitto`      a real mosquitto on a free loopback port, plain listener only (`.url`).
  `mosquitto_tls`  the same plus a TLS listener requiring a client certificate (`.tls_url`);
                   `.certs` holds the PEM paths (CA, server, client, rogue CA + client).
Both are function-scoped (a broker starts in ~30 ms) and stopped after the test. Without the
mosquitto binary these fixtures skip, except under CI=true where they fail (CI installs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import CertPaths, make_certs
from support.mosquitto import Mosquitto, find_mosquitto
from support.nats import RunningNats, start_cluster
from support.postgres import fresh_database, running_postgres

from cloud.cluster.postgres import LocalPostgres


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """Path of the mosquitto binary; skip (or fail under CI=true) when it is not installed."""
    found = find_mosquitto()
    if found is None:
        reason = "mosquitto is not installed (apt-get install mosquitto, or scripts/bootstrap.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture
def tls_certs(tmp_path: Path) -> CertPaths:
    """Throwaway CA, server (127.0.0.1/localhost), client (CN = device id) and rogue CA + client."""
    return make_certs(tmp_path / "pki")


@pytest.fixture
def mosquitto(mosquitto_binary: Path, tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto with a plain listener on 127.0.0.1 (see `Mosquitto.url`)."""
    with Mosquitto(tmp_path / "mosquitto", binary=mosquitto_binary) as broker:
        yield broker


@pytest.fixture
def mosquitto_tls(mosquitto_binary: Path, tmp_path: Path, tls_certs: CertPaths) -> Iterator[Mosquitto]:
    """A running mosquitto with a plain and a TLS listener (`require_certificate true`)."""
    with Mosquitto(tmp_path / "mosquitto-tls", tls=tls_certs, binary=mosquitto_binary) as broker:
        yield broker


# -- the cloud side's real peers (support.nats, support.postgres); session-scoped: they start once


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNats]:
    """A real 3-node NATS cluster (JetStream R3 + MQTT per node) with the cloud's streams, and store
    users for t-a/s-a and t-a/s-b (see support.nats)."""
    cluster = start_cluster(tmp_path_factory.mktemp("nats"), stores=[("t-a", "s-a"), ("t-a", "s-b")])
    yield cluster
    cluster.nats.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A real PostgreSQL server (initdb'd once per session, fsync off); see support.postgres."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture
def pg_dsn(postgres: LocalPostgres) -> str:
    """DSN of a fresh, empty database on the session's PostgreSQL."""
    return fresh_database(postgres)


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """Commands run in-process (`edge demo`, `edge-cloud import`) set umask 0077 as they must in
    production; it must not leak into later tests (e.g. folders PostgreSQL's user has to traverse)."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)
