"""The uplink against a real Mosquitto and the real receiver, through a broker outage under load.

What must hold: while the broker is down events accumulate in the buffer; when it returns
the backlog drains; every event arrives, none twice after dedupe, the chain intact.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.mosquitto import Mosquitto
from uplink_e2e import eventually

from cloud.config import ReceiverConfig
from cloud.identity import register_key
from cloud.receiver import Receiver
from edge.clock import SystemClock
from edge.config import Config
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.service import Uplink, uplink_component


def _config(state: Path, url: str, cloud_pub: str) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-out"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {
            "broker": url, "cloud_public_key": cloud_pub, "window": 4,
            "batch": {"max_events": 100, "linger": "50ms"}, "ack_timeout": "3s",
            "reconnect": {"initial": "100ms", "max": "500ms"},
        },
        "drivers": {
            "ble": {"sim": {"rate": 400, "seed": 1}},
            "nfc": {"sim": {"rate": 40, "seed": 2}},
            "pos": [{"name": "till-1", "sim": {"rate": 20, "seed": 3}}],
        },
        "health": {"drain_timeout": "5s"},
    })  # fmt: skip


@pytest.mark.mosquitto
async def test_broker_down_under_load_everything_arrives_once_chain_intact(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Broker stopped for a while under load: nothing lost, nothing duplicated, chain intact."""
    cloud = Ed25519PrivateKey.generate()
    (tmp_path / "rkeys").mkdir()
    (tmp_path / "cloud.key").write_text(cloud.private_bytes_raw().hex())
    (tmp_path / "cloud.key").chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    cfg = _config(state, mosquitto.url, cloud.public_key().public_bytes_raw().hex())
    clock = SystemClock()
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    register_key(tmp_path / "rkeys", ("acme", "s001", "edge-out"), keys.public_key().hex())
    rcfg = ReceiverConfig(
        broker=mosquitto.url, client_id="outage-receiver", shared_group="outage",
        keys_dir=tmp_path / "rkeys", db=tmp_path / "r.db", out=tmp_path / "events.jsonl",
        cloud_key=tmp_path / "cloud.key",
    )  # fmt: skip
    receiver = Receiver(rcfg)
    rstop = asyncio.Event()
    rtask = asyncio.create_task(receiver.run(rstop))
    await asyncio.wait_for(receiver.ready.wait(), 10)

    sup = Supervisor(cfg, clock, components=[uplink_component])
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        assert await eventually(lambda: sup.runtime is not None and sup.runtime.components, 10)
        rt = sup.runtime
        assert rt is not None
        up = rt.components[0]
        assert isinstance(up, Uplink)
        assert await eventually(lambda: up.counters["acked"] >= 3, 15), up.status()

        mosquitto.stop()  # the uplink goes down; drivers keep producing
        assert await eventually(lambda: up.state != "online", 10)
        committed_at_cut = rt.buffer.last_committed_id
        await asyncio.sleep(3)
        backlog = (await rt.buffer.stats()).to_json()
        assert rt.buffer.last_committed_id > committed_at_cut + 500  # events accumulated offline
        assert backlog["backlog"], backlog

        mosquitto.start()  # back on the same port; the device and receiver reconnect
        await asyncio.sleep(1.5)
        generated = await sup.stop_drivers()
        assert await eventually(lambda: up.counters["events_acked"] >= generated, 40), up.status()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        rstop.set()
        await asyncio.wait_for(rtask, 20)

    ids = [json.loads(ln)["id"] for ln in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert set(ids) == set(range(1, generated + 1))  # every event, nothing lost
    assert receiver.stats.rejected == {}  # no chain-broken, no bad signature
    assert receiver.stats.resets == 0
    assert receiver.stats.accepted == up.counters["acked"]
