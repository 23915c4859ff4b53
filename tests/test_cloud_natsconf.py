"""The broker permission template and node config, as literals (independent of the module).

What must hold: a store publishes only its own uplink kinds and reads only its own downlink
kinds, its store/tenant `_all` layers and its tenant's consent shards; a worker pulls and acks
on EDGE_* and answers devices; prefixes that would reshape subjects are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.cluster.errors import ClusterError
from cloud.cluster.natsconf import NodeSpec, User, render_node, store_permissions, subject_prefix, worker_permissions


def test_store_permissions_are_its_own_subtree_only() -> None:
    p = store_permissions("edge/v1", "acme", "berlin-01")
    assert p.publish == (
        "edge.v1.acme.berlin-01.*.batch", "edge.v1.acme.berlin-01.*.status", "edge.v1.acme.berlin-01.*.enroll",
        "edge.v1.acme.berlin-01.*.cmd-result", "edge.v1.acme.berlin-01.*.reported",
    )
    assert p.subscribe == (
        "edge.v1.acme.berlin-01.*.ack", "edge.v1.acme.berlin-01.*.enrolled", "edge.v1.acme.berlin-01.*.desired",
        "edge.v1.acme.berlin-01.*.cmd", "edge.v1.acme.berlin-01._all.desired", "edge.v1.acme._all._all.desired",
        "edge.v1.acme._all._all.consent.*",
    )


def test_worker_permissions() -> None:
    p = worker_permissions("edge/v1")
    assert "$JS.API.CONSUMER.MSG.NEXT.EDGE_BATCHES.*" in p.publish
    assert "$JS.ACK.EDGE_BATCHES.>" in p.publish
    assert "$JS.ACK.EDGE_CONTROL.>" in p.publish
    assert "edge.v1.*.*.*.ack" in p.publish
    assert "edge.v1.*.*.*.enrolled" in p.publish
    assert not any(s.endswith(".batch") for s in p.publish)  # a worker never forges uplink
    assert p.subscribe == ("_INBOX.>",)


@pytest.mark.parametrize("prefix", ["edge/v1/", "edge/+/x", "edge.v1", "edge v1", ""])
def test_prefixes_that_reshape_subjects_are_refused(prefix: str) -> None:
    with pytest.raises(ClusterError):
        subject_prefix(prefix)


@pytest.mark.parametrize(("tenant", "store"), [("Acme", "s1"), ("t1", "s.1"), ("t1", "_all"), ("t1", "*")])
def test_store_ids_are_checked(tenant: str, store: str) -> None:
    with pytest.raises(ClusterError):
        store_permissions("edge/v1", tenant, store)


def test_node_config_routes_to_peers_with_jetstream_and_mqtt(tmp_path: Path) -> None:
    nodes = [NodeSpec(f"n{i}", "127.0.0.1", 4000 + i, 5000 + i, 6000 + i, 7000 + i, tmp_path / f"n{i}")
             for i in (1, 2, 3)]
    conf = json.loads(render_node(nodes[0], nodes, [User("admin", 'p"w', None)], cluster_name="c",
                                  route_user="route", route_password="rp"))  # noqa: S106
    assert conf["server_name"] == "n1"
    assert conf["jetstream"]["store_dir"] == str(tmp_path / "n1" / "jetstream")
    assert conf["jetstream"]["limits"] == {"default_max_consumers": 65_536}  # MQTT: 6 consumers per device
    assert conf["mqtt"] == {"host": "127.0.0.1", "port": 6001, "ack_wait": "30s", "max_ack_pending": 1024,
                            "stream_replicas": 3, "consumer_replicas": 1, "consumer_memory_storage": True}
    assert conf["cluster"]["routes"] == ["nats-route://route:rp@127.0.0.1:5002", "nats-route://route:rp@127.0.0.1:5003"]
    assert conf["authorization"]["users"] == [{"user": "admin", "password": 'p"w'}]
    with pytest.raises(ClusterError):
        render_node(nodes[0], nodes, [User("a", "1", None), User("a", "2", None)], cluster_name="c",
                    route_user="r", route_password="r")  # noqa: S106
