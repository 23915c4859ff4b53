"""MQTT user name and password for the uplink (`uplink.auth`): a store's broker credentials.

What must hold: the password comes from a file (never the YAML file), read as one line; a missing
or unreadable file is a start-up problem naming `uplink.auth.password_file`; with the right
credentials the real client reaches a real NATS MQTT listener as its store, with a wrong password
it is refused.
"""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest
from support.nats import RunningNats

from edge.config import Uplink
from edge.errors import KeyError_
from edge.uplink.connect import connect_params, read_password


def _uplink(tmp_path: Path, url: str, user: str, password: str) -> Uplink:
    pw = tmp_path / "mqtt.password"
    pw.write_text(password + "\n")
    return Uplink.model_validate({"broker": url, "auth": {"username": user, "password_file": str(pw)},
                                  "insecure_unsigned_acks": True})


def test_password_file_needs_a_username() -> None:
    with pytest.raises(ValueError, match="password_file needs username"):
        Uplink.model_validate({"auth": {"password_file": "/x"}, "insecure_unsigned_acks": True})


def test_the_password_is_one_line_without_its_newline(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\r\n")
    assert read_password(f) == "s3cret"
    f.write_text("one\ntwo\n")
    with pytest.raises(KeyError_, match="exactly one non-empty line"):
        read_password(f)
    with pytest.raises(KeyError_, match="cannot be read"):
        read_password(tmp_path / "missing")


def test_a_missing_password_file_is_a_startup_problem(tmp_path: Path) -> None:
    from edge.config import Config
    from edge.preflight import startup_problems

    cfg = Config.model_validate({"identity": {"tenant": "t", "store": "s", "device": "d"},
                                 "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "k")},
                                 "uplink": {"auth": {"username": "t.s", "password_file": str(tmp_path / "nope")},
                                            "insecure_unsigned_acks": True}})
    lines = [p for p in startup_problems(cfg, "store.yaml") if "uplink.auth" in p]
    assert lines == [f"store.yaml: uplink.auth.password_file: {tmp_path / 'nope'} does not exist"]


@pytest.mark.cloud
async def test_store_credentials_reach_nats_mqtt_and_a_wrong_password_is_refused(
    tmp_path: Path, nats_cluster: RunningNats
) -> None:
    node = nats_cluster.nats.nodes[0]
    url = f"mqtt://{node.host}:{node.mqtt_port}"
    good = connect_params(_uplink(tmp_path, url, "t-a.s-a", nats_cluster.password("t-a.s-a")))
    async with good.client(identifier="t-a-s-a-auth", protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.publish("edge/v1/t-a/s-a/auth-dev/status", b"{}", qos=1)
    bad = connect_params(_uplink(tmp_path, url, "t-a.s-a", "wrong"))
    with pytest.raises(aiomqtt.MqttError):
        async with bad.client(identifier="t-a-s-a-auth-bad", protocol=aiomqtt.ProtocolVersion.V311):
            pass
