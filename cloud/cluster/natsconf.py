"""NATS node configuration and the broker permission template (pure: text in, text out).

Design. Every node runs JetStream (its own store directory), the MQTT listener and cluster
routes to its peers. Edges speak MQTT 3.1.1 to any node; NATS maps the MQTT topic `a/b/c` to
the subject `a.b.c`, so the uplink-v1 prefix `edge/v1` becomes the subject prefix `edge.v1` and
every permission below is written on subjects. The rendered file is JSON, which the NATS
configuration parser reads as it is: no quoting rules of our own for passwords or paths.

Permission template. A *store* credential (one per tenant/store; every device of the store
uses it) may publish only the edge -> cloud kinds under its own subtree and subscribe only the
cloud -> edge kinds under it, plus the tenant- and store-wide downlink layers (`_all`) and the
tenant's consent shards (downlink-v1 §Transport). The kinds are data (`UPLINK_KINDS`,
`DEVICE_DOWNLINK_KINDS`, `SHARED_DOWNLINK`), so a new kind is one line, not a new rule. The
`*` in the device position is deliberate: a credential is per store, the key that signs a batch
is per device (the ingest refuses a key on another device's topic). An *ingest worker* may
pull from the cloud's streams, ack there and publish the cloud -> edge kinds of every store;
an *admin* (the operator, `edge-cloud` commands) has no restriction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cloud.cluster.errors import ClusterError

# edge -> cloud kinds a store may publish (uplink-v1 and downlink-v1 §Transport)
UPLINK_KINDS: Final = ("batch", "status", "enroll", "cmd-result", "reported")
# cloud -> edge kinds addressed to one device of the store
DEVICE_DOWNLINK_KINDS: Final = ("ack", "enrolled", "desired", "cmd")
# cloud -> edge layers shared by a store's or a tenant's devices: (store part, device part, kind)
SHARED_DOWNLINK: Final = (("{store}", "_all", "desired"), ("_all", "_all", "desired"), ("_all", "_all", "consent.*"))

# the streams workers pull from (cloud/cluster/jetstream.py); NATS wildcards match whole tokens
# only, so each is named (EDGE_* would be a literal)
WORKER_STREAMS: Final = ("EDGE_BATCHES", "EDGE_CONTROL")
_LEVEL_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def subject_prefix(prefix: str) -> str:
    """The NATS subject prefix of an MQTT topic prefix: `edge/v1` -> `edge.v1`.

    Levels may not be empty, hold wildcards, dots or spaces (they would change the subject's
    shape); ClusterError otherwise.
    """
    levels = prefix.split("/")
    if not all(_LEVEL_RE.fullmatch(level) for level in levels):
        raise ClusterError(f"prefix {prefix!r} does not map onto NATS subjects",
                           hint="use levels of letters, digits, '_' and '-' separated by '/', e.g. edge/v1")
    return ".".join(levels)


def check_id(kind: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ClusterError(f"{kind} {value!r} is not a valid id", hint="ids match [a-z0-9][a-z0-9_-]{0,62}")
    return value


@dataclass(slots=True, frozen=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (allow lists; nothing else is allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def to_conf(self) -> dict[str, Any]:
        return {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}


def store_permissions(prefix: str, tenant: str, store: str) -> Permissions:
    """What one store's devices may do: publish only its uplink kinds, read only its downlink."""
    p, t, s = subject_prefix(prefix), check_id("tenant", tenant), check_id("store", store)
    publish = tuple(f"{p}.{t}.{s}.*.{kind}" for kind in UPLINK_KINDS)
    subscribe = tuple(f"{p}.{t}.{s}.*.{kind}" for kind in DEVICE_DOWNLINK_KINDS) + tuple(
        f"{p}.{t}.{st.format(store=s)}.{dev}.{kind}" for st, dev, kind in SHARED_DOWNLINK
    )
    return Permissions(publish=publish, subscribe=subscribe)


def worker_permissions(prefix: str) -> Permissions:
    """An ingest worker: pull and ack on the cloud's streams, answer every store's devices."""
    p = subject_prefix(prefix)
    publish = (
        "$JS.API.INFO",
        *(f"$JS.API.STREAM.INFO.{s}" for s in WORKER_STREAMS),
        *(f"$JS.API.CONSUMER.INFO.{s}.*" for s in WORKER_STREAMS),
        *(f"$JS.API.CONSUMER.MSG.NEXT.{s}.*" for s in WORKER_STREAMS),
        *(f"$JS.ACK.{s}.>" for s in WORKER_STREAMS),
        *(f"{p}.*.*.*.{kind}" for kind in DEVICE_DOWNLINK_KINDS),
    )
    return Permissions(publish=publish, subscribe=("_INBOX.>",))


@dataclass(slots=True, frozen=True)
class User:
    """A broker user: NATS and MQTT clients log in with the same user name and password.

    `permissions` None means unrestricted (the admin).
    """

    name: str
    password: str
    permissions: Permissions | None

    def to_conf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user": self.name, "password": self.password}
        if self.permissions is not None:
            out["permissions"] = self.permissions.to_conf()
        return out


def store_user_name(tenant: str, store: str) -> str:
    """The MQTT user name of a store's credential: `{tenant}.{store}` (ids never hold a dot)."""
    return f"{check_id('tenant', tenant)}.{check_id('store', store)}"


@dataclass(slots=True, frozen=True)
class NodeSpec:
    """One node's identity, loopback ports and folder."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    dir: Path

    @property
    def client_url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def pid_path(self) -> Path:
        return self.dir / "nats.pid"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats.log"

    @property
    def store_dir(self) -> Path:
        return self.dir / "jetstream"


@dataclass(slots=True, frozen=True)
class ClusterLimits:
    """Bounds every node gets. A batch is at most `max_payload` bytes on the broker; the edge's
    `uplink.batch.max_bytes` (default 256 KiB) must stay below it."""

    max_payload: int = 8 * 1024 * 1024
    max_file_store: int = 4 * 1024**3
    max_memory_store: int = 256 * 1024**2
    mqtt_ack_wait: str = "30s"
    mqtt_max_ack_pending: int = 1024
    # NATS 2.15 caps the consumers of a stream without its own limit at `default_max_consumers`
    # (1,000 seen here). Every QoS 1 MQTT subscription is a consumer on $MQTT_msgs, and a device
    # with the downlink holds 6 (ack, three desired layers, its tenant's consent shards, cmd), so
    # the default served ~166 devices: the 500-device downlink benchmark got refused SUBACKs.
    # 6 x 10,000 devices, with room for the workers' own.
    max_consumers_per_stream: int = 65_536
    extra: Mapping[str, Any] = field(default_factory=dict)


def render_node(
    node: NodeSpec,
    peers: Sequence[NodeSpec],
    users: Sequence[User],
    *,
    cluster_name: str,
    route_user: str,
    route_password: str,
    limits: ClusterLimits | None = None,
) -> str:
    """The configuration file of `node` (JSON, read by nats-server -c)."""
    lim = limits or ClusterLimits()
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ClusterError("two broker users share a name", hint="each store has one credential")
    routes = [f"nats-route://{route_user}:{route_password}@{p.host}:{p.cluster_port}" for p in peers if p != node]
    conf: dict[str, Any] = {
        "server_name": node.name,
        "host": node.host,
        "port": node.client_port,
        "http": f"{node.host}:{node.http_port}",
        "pid_file": str(node.pid_path),
        "log_file": str(node.log_path),
        "logtime": True,
        "max_payload": lim.max_payload,
        "jetstream": {
            "store_dir": str(node.store_dir),
            "max_file_store": lim.max_file_store,
            "max_memory_store": lim.max_memory_store,
            "limits": {"default_max_consumers": lim.max_consumers_per_stream},
        },
        "cluster": {
            "name": cluster_name,
            "host": node.host,
            "port": node.cluster_port,
            "authorization": {"user": route_user, "password": route_password},
            "routes": routes,
        },
        "mqtt": {
            "host": node.host,
            "port": node.mqtt_port,
            "ack_wait": lim.mqtt_ack_wait,
            "max_ack_pending": lim.mqtt_max_ack_pending,
            # MQTT sessions and retained messages live in streams of their own; R3 where the
            # cluster has 3 nodes, so MQTT logins survive the loss of one (the default follows
            # the nodes seen at first start, which may be fewer)
            "stream_replicas": min(3, len(peers)),
            # the consumer behind each QoS 1 subscription: edges use clean sessions (the consumer
            # goes with the connection), so a replicated one buys nothing and costs a Raft group
            # per subscription: 3,000 of them in a 500-device reconnect storm timed out (5 s)
            # and were refused. R1 in memory is created at once, on the node the edge is on.
            "consumer_replicas": 1,
            "consumer_memory_storage": True,
        },
        "authorization": {"users": [u.to_conf() for u in users]},
        **lim.extra,
    }
    return json.dumps(conf, indent=2) + "\n"
