"""A clean uplink stop is clean: no forced cancel, the retained status says `offline`.

Regression for the "occasional hang on clean uplink stop" (logged `uplink_stop_forced` after 5 s):
`stop()` wakes the sender and the session together; on Python 3.11 `asyncio.wait_for` swallowed
the task group's cancellation of the sender when both happened in one loop iteration, and the
session then waited for the sender forever. Also: a stop during a connect attempt that will only
time out (a silent broker) must not wait for that timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs
from support.cloudkey import CLOUD_PUBLIC_HEX
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.config import Config
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.broker import EmbeddedBroker
from edge.uplink.service import Uplink, uplink_component

STATUS = "edge/v1/acme/s001/edge-stop/status"


def _config(state: Path, url: str, protocol: str) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-stop"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"cloud_public_key": CLOUD_PUBLIC_HEX, "broker": url, "protocol": protocol,
                   "batch": {"linger": "50ms"}, "reconnect": {"initial": "100ms", "max": "200ms"}},
        "health": {"drain_timeout": "20s"},
    })  # fmt: skip


@asynccontextmanager
async def _running(tmp_path: Path, url: str, protocol: str = "auto") -> AsyncIterator[Uplink]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = _config(state, url, protocol)
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init(force=True)
    sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component])
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        for _ in range(200):
            if sup.runtime is not None and sup.runtime.components:
                break
            await asyncio.sleep(0.05)
        rt = sup.runtime
        assert rt is not None
        up = rt.components[0]
        assert isinstance(up, Uplink)
        yield up
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _status(host: str, port: int) -> dict[str, Any]:
    async with aiomqtt.Client(host, port, identifier="stop-status-reader") as client:
        await client.subscribe(STATUS, qos=1)
        async with asyncio.timeout(10):
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                doc: dict[str, Any] = json.loads(m.payload)
                return doc
    raise AssertionError("no retained status")


async def _stop_cleanly_after_going_online(tmp_path: Path, url: str, protocol: str = "auto") -> None:
    with capture_logs() as logs:
        async with _running(tmp_path, url, protocol) as up:
            for _ in range(200):
                if up.state == "online":
                    break
                await asyncio.sleep(0.05)
            assert up.state == "online", up.status()
            await asyncio.sleep(0.3)  # idle: the sender waits on its wake-up event
    events = [e["event"] for e in logs]
    assert "uplink_stop_forced" not in events
    assert "component_stop_failed" not in events
    assert up.status()["state"] == "stopped"


@pytest.mark.mosquitto
async def test_clean_stop_with_mosquitto_is_not_forced_and_leaves_offline(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Online and idle, then stopped (five times over): never forced; retained status `offline`."""
    for _ in range(5):
        await _stop_cleanly_after_going_online(tmp_path, mosquitto.url)
        assert (await _status(mosquitto.host, mosquitto.port))["state"] == "offline"


async def test_clean_stop_with_the_embedded_broker_is_not_forced(tmp_path: Path) -> None:
    """The demo's embedded amqtt broker, where the hang was first seen: five clean stops."""
    async with EmbeddedBroker() as broker:
        for _ in range(5):
            await _stop_cleanly_after_going_online(tmp_path, broker.url, "3.1.1")  # amqtt: no MQTT 5
            assert (await _status(broker.host, broker.port))["state"] == "offline"


@pytest.mark.mosquitto
async def test_stop_while_connecting_to_a_silent_broker_does_not_wait_for_the_connect_timeout(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A broker that accepts TCP but never answers (SIGSTOP): the uplink is stuck connecting; a stop
    cancels the attempt instead of waiting out the 10 s connect timeout (no forced stop logged)."""
    mosquitto.pause()
    try:
        with capture_logs() as logs:
            async with _running(tmp_path, mosquitto.url) as up:
                await asyncio.sleep(0.5)
                assert up.state == "connecting", up.status()
        events = [e["event"] for e in logs]
        assert "uplink_stop_forced" not in events
        assert "component_stop_failed" not in events
        assert up.status()["state"] == "stopped"
    finally:
        mosquitto.resume()
