"""A real 3-node NATS cluster for tests (JetStream + MQTT on every node), from cloud.cluster.

    cluster = start_cluster(base_dir, stores=[("t1", "s1")])
    ... cluster.nats.mqtt_urls, cluster.password("t1.s1"), cluster.admin_url ...
    cluster.nats.stop()

Users: `admin` (unrestricted), `worker`, and one `{tenant}.{store}` user per store given. The
cloud's JetStream layout (EDGE_BATCHES, EDGE_CONTROL, consumers) is created before it returns.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from cloud.cluster.jetstream import Layout, ensure
from cloud.cluster.nats import NatsCluster, make_nodes
from cloud.cluster.natsconf import User, store_permissions, store_user_name, worker_permissions

PREFIX = "edge/v1"


@dataclass(slots=True)
class RunningNats:
    nats: NatsCluster
    passwords: dict[str, str]

    def password(self, user: str) -> str:
        return self.passwords[user]

    def urls(self, user: str = "admin") -> list[str]:
        pw = self.passwords[user]
        return [f"nats://{user}:{pw}@{n.host}:{n.client_port}" for n in self.nats.nodes]

    async def connect(self, user: str = "admin", **options: Any) -> NATS:
        """A NATS client logged in as `user` on every node (credentials given apart from the URLs,
        so servers the cluster gossips are logged into too)."""
        return await nats.connect(servers=self.nats.client_urls, user=user, password=self.passwords[user],
                                  connect_timeout=5, **options)


async def _layout(urls: list[str]) -> None:
    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        await ensure(nc, Layout(prefix=PREFIX))
    finally:
        await nc.close()


def start_cluster(base: Path, *, stores: Sequence[tuple[str, str]]) -> RunningNats:
    passwords = {"admin": secrets.token_hex(8), "worker": secrets.token_hex(8)}
    users = [User("admin", passwords["admin"], None), User("worker", passwords["worker"], worker_permissions(PREFIX))]
    for tenant, store in stores:
        name = store_user_name(tenant, store)
        passwords[name] = secrets.token_hex(8)
        users.append(User(name, passwords[name], store_permissions(PREFIX, tenant, store)))
    cluster = NatsCluster(make_nodes(base), users, route_password=secrets.token_hex(8))
    try:
        cluster.start()
        test = RunningNats(cluster, passwords)
        asyncio.run(_layout(test.urls()))
    except BaseException:
        cluster.stop()
        raise
    return test
