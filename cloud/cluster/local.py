"""`edge-cloud up` / `down`: a whole local cloud in one folder (3 NATS nodes + PostgreSQL).

The folder holds `cloud.json` (ports and generated passwords, mode 0600), `token.key` (seals
enrollment secrets), `n1..n3/` (one NATS node each) and `postgres/`. The first `up` chooses
free ports and passwords and runs initdb; every later `up` reuses them, starts whatever is not
running, applies pending migrations and the JetStream layout, and adds the stores given with
`--store` (the running nodes reload their users). `down` stops everything and keeps the data.
Both are idempotent; two at once on the same folder serialize on a lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.cluster.errors import ClusterError
from cloud.cluster.jetstream import Layout, ensure
from cloud.cluster.nats import NatsCluster
from cloud.cluster.natsconf import NodeSpec, User, check_id, store_permissions, store_user_name, worker_permissions
from cloud.cluster.postgres import LocalPostgres
from cloud.cluster.procs import HOST, free_port

STATE_FILE = "cloud.json"
STATE_VERSION = 1
ADMIN = "admin"
WORKER = "worker"


def _password() -> str:
    return secrets.token_urlsafe(24)


@contextlib.contextmanager
def _locked(dir: Path) -> Iterator[None]:
    dir.mkdir(parents=True, exist_ok=True)
    with (dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_store(text: str) -> tuple[str, str]:
    """`tenant/store` -> (tenant, store), both valid ids."""
    tenant, sep, store = text.partition("/")
    if not sep:
        raise ClusterError(f"--store {text!r} is not TENANT/STORE")
    return check_id("tenant", tenant), check_id("store", store)


@dataclass(slots=True)
class State:
    """What `up` chose once and every later command reuses."""

    prefix: str
    route_password: str
    nodes: list[dict[str, int | str]]
    passwords: dict[str, str]  # user name -> password (admin, worker, and one per store)
    stores: list[str]  # "tenant/store"
    pg_port: int
    pg_password: str

    @classmethod
    def fresh(cls, prefix: str) -> State:
        return cls(
            prefix=prefix, route_password=_password(),
            nodes=[{"name": f"n{i}", "client_port": free_port(), "cluster_port": free_port(),
                    "mqtt_port": free_port(), "http_port": free_port()} for i in (1, 2, 3)],
            passwords={ADMIN: _password(), WORKER: _password()}, stores=[],
            pg_port=free_port(), pg_password=_password(),
        )

    @classmethod
    def load(cls, dir: Path) -> State | None:
        path = dir / STATE_FILE
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{path} is unreadable: {exc}", hint="remove the folder to start over") from None
        if raw.get("version") != STATE_VERSION:
            raise ClusterError(f"{path} has version {raw.get('version')!r}, expected {STATE_VERSION}")
        try:
            return cls(prefix=raw["prefix"], route_password=raw["route_password"], nodes=raw["nodes"],
                       passwords=raw["passwords"], stores=raw["stores"], pg_port=raw["pg_port"],
                       pg_password=raw["pg_password"])
        except KeyError as exc:
            raise ClusterError(f"{path} lacks {exc}", hint="remove the folder to start over") from None

    def save(self, dir: Path) -> None:
        doc = {"version": STATE_VERSION, "prefix": self.prefix, "route_password": self.route_password,
               "nodes": self.nodes, "passwords": self.passwords, "stores": self.stores,
               "pg_port": self.pg_port, "pg_password": self.pg_password}
        tmp = dir / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        tmp.replace(dir / STATE_FILE)

    def add_store(self, tenant: str, store: str) -> bool:
        key = f"{tenant}/{store}"
        if key in self.stores:
            return False
        self.stores.append(key)
        self.passwords[store_user_name(tenant, store)] = _password()
        return True

    def users(self) -> list[User]:
        out = [User(ADMIN, self.passwords[ADMIN], None),
               User(WORKER, self.passwords[WORKER], worker_permissions(self.prefix))]
        for key in self.stores:
            tenant, store = key.split("/")
            name = store_user_name(tenant, store)
            out.append(User(name, self.passwords[name], store_permissions(self.prefix, tenant, store)))
        return out


@dataclass(slots=True)
class LocalCloud:
    """The servers of one folder, built from its state."""

    dir: Path
    state: State

    @property
    def node_specs(self) -> list[NodeSpec]:
        return [NodeSpec(name=str(n["name"]), host=HOST, client_port=int(n["client_port"]),
                         cluster_port=int(n["cluster_port"]), mqtt_port=int(n["mqtt_port"]),
                         http_port=int(n["http_port"]), dir=self.dir / str(n["name"])) for n in self.state.nodes]

    def nats(self) -> NatsCluster:
        return NatsCluster(self.node_specs, self.state.users(), route_password=self.state.route_password)

    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.dir / "postgres", port=self.state.pg_port, password=self.state.pg_password)

    @property
    def token_key_path(self) -> Path:
        return self.dir / "token.key"

    def nats_url(self, user: str) -> list[str]:
        pw = self.state.passwords[user]
        return [f"nats://{user}:{pw}@{n.host}:{n.client_port}" for n in self.node_specs]

    def summary(self) -> dict[str, Any]:
        nodes = self.node_specs
        return {
            "dir": str(self.dir),
            "nats_urls": [n.client_url for n in nodes],
            "mqtt_urls": [n.mqtt_url for n in nodes],
            "postgres_dsn": self.postgres().dsn,
            "users": {ADMIN: self.state.passwords[ADMIN], WORKER: self.state.passwords[WORKER]},
            "stores": {key: {"user": store_user_name(*key.split("/")),
                             "password": self.state.passwords[store_user_name(*key.split("/"))]}
                       for key in self.state.stores},
            "prefix": self.state.prefix,
            "token_key": str(self.token_key_path),
        }


async def _ensure_layout(urls: Sequence[str], prefix: str) -> None:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    nc = await nats.connect(servers=list(urls), connect_timeout=5, max_reconnect_attempts=3)
    deadline = asyncio.get_running_loop().time() + 60
    try:
        while True:
            try:
                await ensure(nc, Layout(prefix=prefix))
            except (NatsTimeout, ServiceUnavailableError) as exc:
                # after a restart of the whole cluster, streams elect their leaders after the meta group
                if asyncio.get_running_loop().time() > deadline:
                    raise ClusterError(f"JetStream did not answer within 60 s ({type(exc).__name__})",
                                       hint="see the nodes' nats.log") from None
                await asyncio.sleep(0.5)
            else:
                return
    finally:
        await nc.close()


def up(dir: Path, *, stores: Sequence[str] = (), prefix: str = "edge/v1") -> LocalCloud:
    """Start (initializing on first use) the local cloud in `dir`; see the module docstring."""
    from cloud.db.migrate import migrate
    from cloud.db.tokens import TokenKey

    dir = dir.resolve()
    with _locked(dir):
        state = State.load(dir)
        if state is None:
            state = State.fresh(prefix)
        elif prefix != state.prefix:
            raise ClusterError(f"{dir} was set up with prefix {state.prefix!r}, not {prefix!r}")
        added = [state.add_store(*parse_store(s)) for s in stores]
        state.save(dir)
        cloud = LocalCloud(dir, state)
        TokenKey.load(cloud.token_key_path, create=True)
        pg = cloud.postgres()
        pg.start()
        migrate(pg.dsn)
        cluster = cloud.nats()
        if any(added):
            cluster.reload()  # running nodes learn the new users; stopped ones read them at start
        cluster.start()
        asyncio.run(_ensure_layout(cloud.nats_url(ADMIN), state.prefix))
        return cloud


def down(dir: Path) -> LocalCloud | None:
    """Stop the local cloud of `dir` (data kept); None when the folder holds none."""
    dir = dir.resolve()
    if not (dir / STATE_FILE).exists():
        return None
    with _locked(dir):
        state = State.load(dir)
        if state is None:
            return None
        cloud = LocalCloud(dir, state)
        cloud.nats().stop()
        pg = cloud.postgres()
        if pg.initialized:
            pg.stop()
        return cloud
