"""A local NATS cluster: N nodes on loopback ports, each with JetStream, MQTT and cluster routes.

The nodes are detached processes (their own session) found again through their pid files, so
`edge-cloud up` can return while they run and `edge-cloud down` can stop them from another
process; tests use the same object and keep it. Ready means every node answers `/healthz` on its
monitoring port (JetStream enabled and current with the meta group) and accepts MQTT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.cluster.binaries import find_nats_server
from cloud.cluster.errors import ClusterError
from cloud.cluster.natsconf import ClusterLimits, NodeSpec, User, render_node
from cloud.cluster.procs import HOST, accepts, free_port, pid_alive, read_pid, tail, terminate

MQTT_PROBE_TIMEOUT = 5.0  # one CONNECT → CONNACK attempt; retried until the start deadline

START_TIMEOUT = 30.0  # a cold 3-node cluster elects its meta leader in ~2 s; CI is slower


def make_nodes(base: Path, count: int = 3, host: str = HOST) -> list[NodeSpec]:
    """Node specs `n1..nN` with fresh free ports, each in `base/nK`."""
    return [
        NodeSpec(name=f"n{i}", host=host, client_port=free_port(host), cluster_port=free_port(host),
                 mqtt_port=free_port(host), http_port=free_port(host), dir=base / f"n{i}")
        for i in range(1, count + 1)
    ]


def _monitor(node: NodeSpec, path: str) -> dict[str, Any] | None:
    url = f"http://{node.host}:{node.http_port}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _healthy(node: NodeSpec, size: int) -> bool:
    """Healthy, routed to every peer, and JetStream's meta group has a leader over all nodes."""
    health = _monitor(node, "healthz")
    if health is None or health.get("status") != "ok":
        return False
    routes = _monitor(node, "routez")
    peers = {r.get("remote_name") for r in (routes or {}).get("routes") or []}
    if len(peers) < size - 1:
        return False
    meta = ((_monitor(node, "jsz") or {}).get("meta_cluster")) or {}
    return bool(meta.get("leader")) and int(meta.get("cluster_size") or 0) >= size


def mqtt_connacks(node: NodeSpec, user: User, timeout: float = MQTT_PROBE_TIMEOUT) -> bool:
    """An MQTT 3.1.1 CONNECT as `user` gets a CONNACK accepting it within `timeout`.

    A port that accepts TCP is not yet an MQTT listener that answers: on the first connect of an
    account a node creates the account's MQTT streams (replicated, so it needs the meta leader),
    and until then CONNECT hangs. Probing here makes "ready" mean what edges need.
    """
    connected: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-cloud-probe-{node.name}",
                         protocol=mqtt.MQTTv311, clean_session=True)
    client.username_pw_set(user.name, user.password)
    client.on_connect = lambda _c, _u, _f, reason, _p: connected.append(not reason.is_failure)
    deadline = time.monotonic() + timeout
    try:
        client.connect(node.host, node.mqtt_port, keepalive=10)
        while not connected and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        return bool(connected) and connected[0]
    except (OSError, ValueError):
        return False
    finally:
        client.disconnect()  # closes the socket too; harmless when the connect never happened


class NatsCluster:
    """The nodes of one local cluster; `users` are the broker's users (see natsconf)."""

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        users: Sequence[User],
        *,
        route_password: str,
        cluster_name: str = "edge-cloud",
        limits: ClusterLimits | None = None,
        binary: Path | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.users = list(users)
        self.route_password = route_password
        self.cluster_name = cluster_name
        self.limits = limits
        self.binary = binary or find_nats_server()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- addresses -------------------------------------------------------------------------

    @property
    def client_urls(self) -> list[str]:
        return [n.client_url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    # -- lifecycle ---------------------------------------------------------------------------

    def write_configs(self) -> None:
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.dir.chmod(0o700)  # the config holds passwords
            text = render_node(node, self.nodes, self.users, cluster_name=self.cluster_name,
                               route_user="route", route_password=self.route_password, limits=self.limits)
            tmp = node.config_path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o600)
            tmp.replace(node.config_path)

    def pid(self, node: NodeSpec) -> int | None:
        pid = read_pid(node.pid_path)
        return pid if pid is not None and pid_alive(pid, str(node.config_path)) else None

    def running(self, node: NodeSpec) -> bool:
        proc = self._procs.get(node.name)
        if proc is not None and proc.poll() is not None:
            del self._procs[node.name]
        return self.pid(node) is not None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write configs, start every node that is not running, wait until all are healthy."""
        self.write_configs()
        for node in self.nodes:
            if not self.running(node):
                self._spawn(node)
        self.wait_ready(self.nodes, timeout)

    def start_node(self, node: NodeSpec, timeout: float = START_TIMEOUT) -> None:
        """(Re)start one node on its old ports and store; waits until it is healthy."""
        if not self.running(node):
            self._spawn(node)
        self.wait_ready([node], timeout)

    def _spawn(self, node: NodeSpec) -> None:
        node.pid_path.unlink(missing_ok=True)
        with (node.dir / "nats.out").open("ab") as out:
            self._procs[node.name] = subprocess.Popen(
                [str(self.binary), "-c", str(node.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `edge-cloud up`; no terminal signals
                cwd=node.dir,
            )

    def wait_ready(self, nodes: Sequence[NodeSpec], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        probe = next((u for u in self.users if u.permissions is None), None)  # the unrestricted user
        while pending:
            for node in list(pending):
                proc = self._procs.get(node.name)
                if proc is not None and proc.poll() is not None:
                    del self._procs[node.name]
                    raise ClusterError(f"nats node {node.name} exited with {proc.returncode} during start\n"
                                       f"{tail(node.dir / 'nats.out')}\n{tail(node.log_path)}",
                                       hint="a port may be taken, or the config is invalid")
                if (_healthy(node, len(self.nodes)) and accepts(node.host, node.mqtt_port)
                        and (probe is None or mqtt_connacks(node, probe))):
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                names = ", ".join(n.name for n in pending)
                raise ClusterError(f"nats nodes {names} not healthy after {timeout:.0f}s\n"
                                   + "\n".join(tail(n.log_path) for n in pending),
                                   hint="a cluster needs a majority of its nodes up to elect a leader")
            if pending:
                time.sleep(0.05)

    def reload(self) -> None:
        """Rewrite the configs (e.g. a store was added) and make running nodes re-read them."""
        self.write_configs()
        for node in self.nodes:
            pid = self.pid(node)
            if pid is not None:
                os.kill(pid, signal.SIGHUP)

    def kill(self, node: NodeSpec) -> None:
        """SIGKILL one node: a crash, no clean shutdown."""
        pid = self.pid(node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reap(node)

    def stop_node(self, node: NodeSpec) -> None:
        pid = self.pid(node)
        if pid is not None:
            terminate(pid, marker=str(node.config_path))
        self._reap(node)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        for node in self.nodes:
            self.stop_node(node)

    def _reap(self, node: NodeSpec) -> None:
        proc = self._procs.pop(node.name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        node.pid_path.unlink(missing_ok=True)
