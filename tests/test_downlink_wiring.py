"""The commands and consent wired into a running daemon (edge/downlink/wiring.py, Supervisor).

What must hold: `uplink.resend` publishes every held unacked batch again at once, on a real
Mosquitto, without waiting for `ack_timeout`; while the uplink is down it is `failed`, not
queued; with `cloud_consent` the privacy layer consults the cloud's shards (fail closed) and a
withdrawal purges the supervisor's own buffer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from support.cloudkey import CLOUD_PUBLIC_HEX
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.config import Config
from edge.downlink.commands import CommandDeps, CommandRunner
from edge.downlink.wiring import command_deps
from edge.events import Pending
from edge.privacy.keys import KeyStore
from edge.supervisor import Runtime, Supervisor
from edge.uplink.service import Uplink, uplink_component
from edge.wire.downlink import Document

BATCH_TOPIC = "edge/v1/acme/s001/edge-dl/batch"


def _config(state: Path, url: str) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-dl"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"cloud_public_key": CLOUD_PUBLIC_HEX, "broker": url, "ack_timeout": "60s",
                   "batch": {"linger": "50ms"}, "reconnect": {"initial": "100ms", "max": "200ms"}},
        "health": {"drain_timeout": "10s"},
    })  # fmt: skip


@asynccontextmanager
async def _daemon(tmp_path: Path, url: str, *, cloud_consent: bool = False) -> AsyncIterator[Runtime]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = _config(state, url)
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init(force=True)
    sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component], cloud_consent=cloud_consent)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        for _ in range(200):
            if sup.runtime is not None and sup.runtime.components:
                break
            await asyncio.sleep(0.05)
        assert sup.runtime is not None
        yield sup.runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class Published:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    async def __call__(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.results.append(json.loads(payload))


def _cmd(cid: str, name: str) -> Document:
    now = SystemClock().wall_ms()
    return Document(kind="cmd", tenant="acme", store="s001", device="edge-dl", kid="k", t=now,
                    body={"id": cid, "name": name, "args": {}, "exp": now + 60_000}, raw=b"", digest="00")


async def _wait_online(up: Uplink) -> None:
    for _ in range(200):
        if up.state == "online":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(up.status())


@pytest.mark.mosquitto
async def test_uplink_resend_publishes_held_batches_now(tmp_path: Path, mosquitto: Mosquitto) -> None:
    seen: list[bytes] = []
    arrived = asyncio.Event()

    async def until(n: int) -> None:
        async with asyncio.timeout(10):
            while len(seen) < n:
                arrived.clear()
                await arrived.wait()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="dl-batch-reader") as reader:
        await reader.subscribe(BATCH_TOPIC, qos=1)

        async def read() -> None:
            async for m in reader.messages:
                assert isinstance(m.payload, bytes)
                seen.append(m.payload)
                arrived.set()

        reading = asyncio.create_task(read())
        async with _daemon(tmp_path, mosquitto.url) as rt:
            up = rt.components[0]
            assert isinstance(up, Uplink)
            await _wait_online(up)
            for i in range(5):
                await rt.buffer.put(Pending(1_767_225_600_000 + i, "pos", "pos.sale", {"total": i}))
            await until(1)
            first = list(seen)
            pub = Published()
            # a synchronized clock is the sandbox's only missing piece: the time rules have their own tests
            runner = CommandRunner(state_dir=rt.cfg.paths.state_dir, clock=_Synced(), prefix="edge/v1",
                                   identity=("acme", "s001", "edge-dl"), publish=pub,
                                   deps=command_deps(rt, status=None, trust=None))
            await runner.handle(_cmd("rs-1", "uplink.resend"))
            assert pub.results == [{"id": "rs-1", "ok": True, "result": {"batches": len(first)}}]
            await until(2 * len(first))
            assert {hashlib.sha256(p).digest() for p in seen} == {hashlib.sha256(p).digest() for p in first}
            assert up.status()["acked"] == 0  # nothing acked: the same bytes went twice
            runner.close()
        reading.cancel()


class _Synced(SystemClock):
    def synchronized(self) -> bool:
        return True


async def test_uplink_resend_while_offline_is_failed(tmp_path: Path) -> None:
    async with _daemon(tmp_path, "mqtt://127.0.0.1:1") as rt:  # nothing listens on port 1
        pub = Published()
        runner = CommandRunner(state_dir=rt.cfg.paths.state_dir, clock=_Synced(), prefix="edge/v1",
                               identity=("acme", "s001", "edge-dl"), publish=pub,
                               deps=command_deps(rt, status=None, trust=None))
        await runner.handle(_cmd("rs-2", "uplink.resend"))
        (res,) = pub.results
        assert res["error"] == "failed"
        assert "not connected" in res["detail"]
        runner.close()


async def test_cloud_consent_is_bound_to_the_supervisors_buffer(tmp_path: Path) -> None:
    async with _daemon(tmp_path, "mqtt://127.0.0.1:1", cloud_consent=True) as rt:
        sync = rt.consent_sync
        assert sync is not None
        assert sync.counts() == (0, 0)
        p = "loy:s0badc0de:00000000000000000000000000"
        await rt.buffer.put(Pending(1_767_225_600_000, "pos", "pos.receipt", {"customer": p}))
        shard = hashlib.sha256(p.encode()).digest()[:1].hex()
        doc = Document(kind="consent", tenant="acme", store="_all", device="_all", kid="k", t=1,
                       body={"shard": shard, "rev": 1, "consented": [p]}, raw=b"", digest="00")
        await sync.apply(doc)
        assert p in sync
        await sync.apply(Document(kind="consent", tenant="acme", store="_all", device="_all", kid="k", t=2,
                                  body={"shard": shard, "rev": 2, "consented": []}, raw=b"", digest="01"))
        assert sync.purged_events == 1


def test_deps_default_to_unavailable() -> None:
    deps = CommandDeps()
    assert (deps.status, deps.restart, deps.keys, deps.resend, deps.log_level, deps.trust) == (None,) * 6
