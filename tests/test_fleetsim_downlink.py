"""The fleet simulator with the downlink on (`FleetSpec.downlink`), against a real mosquitto.

Each simulated device runs the real downlink component on its uplink's session: signed, retained
desired layers are merged, validated, persisted and reported `applied` (a tenant layer touching
the buffer takes the in-process restart, a store layer touching only drivers the live path); a
consent shard is applied by every device; a document signed by another key changes nothing and
is counted; a second run starts every device with the persisted layers (same effective hash).
Wire constants (topics) are literals here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.mosquitto import Mosquitto

from cloud.fleetsim import Fleet, FleetSpec
from edge.wire.downlink import consent_shard, document, sign_document
from edge.wire.uplink import kid_of, public_raw

pytestmark = pytest.mark.mosquitto

WAIT = 20.0
CLOUD = Ed25519PrivateKey.generate()
PSEUDONYM = "loy:s0a1b2c3d:abcdefghijklmnopqrstuvwxyz"
SHARD = consent_shard(PSEUDONYM)


def signed(kind: str, store: str, device: str, key: Ed25519PrivateKey = CLOUD, **fields: Any) -> bytes:
    doc = document(kind, "acme", store, device, kid_of(public_raw(key.public_key())),  # type: ignore[arg-type]
                   int(time.time() * 1000), **fields)  # fmt: skip
    return sign_document(doc, key)


def fleet_spec(tmp_path: Path, url: str) -> FleetSpec:
    return FleetSpec(devices=3, events=0, broker=url, state=tmp_path / "fleet", keys_dir=tmp_path / "keys",
                     cloud_public_key=public_raw(CLOUD.public_key()).hex(), tenant="acme", downlink=True)  # fmt: skip


async def until(cond: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_layers_and_a_consent_shard_reach_every_simulated_device_applied_reported_and_persisted(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet(fleet_spec(tmp_path, mosquitto.url))
    reported: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", int(mosquitto.url.rsplit(":", 1)[1]), identifier="cloud") as cloud:
        await cloud.subscribe("edge/v1/acme/+/+/reported", qos=1)

        async def listen() -> None:
            async for msg in cloud.messages:
                reported[str(msg.topic).split("/")[3]] = json.loads(bytes(msg.payload))

        listener = asyncio.create_task(listen())
        try:
            await fleet.start()
            await until(lambda: fleet.online() == 3 and len(reported) == 3)
            devices = {d.cfg.identity.store: d for d in fleet.devices}
            dl = {s: d.downlink for s, d in devices.items()}
            assert all(x is not None for x in dl.values())

            # a tenant layer beyond drivers: the daemon would restart; the simulated one does in-process
            await cloud.publish("edge/v1/acme/_all/_all/desired", signed(
                "desired", "_all", "_all", layer="tenant", ver=1, config={"buffer": {"retention": {"ble": "3d"}}}),
                qos=1, retain=True)  # fmt: skip

            def applied(store: str, layer: str, ver: int) -> bool:
                r = reported.get(store) or {}
                apply = r.get("apply") or {}
                state = (apply.get("state"), apply.get("ver"))
                return bool(r.get("layers", {}).get(layer) == ver and state == ("applied", ver))

            await until(lambda: all(applied(s, "tenant", 1) for s in devices))
            for s, x in dl.items():
                assert x is not None
                assert x.restarts == 1, s
                assert x.desired.counters["applied"] == 1
                assert devices[s].rt.cfg.buffer.retention["ble"] == 3 * 86400.0  # the runtime's config follows

            # a store layer touching only drivers: the live path (no drivers to restart), one store only
            drivers = {"drivers": {"ble": {"queue_max": 5000}}}
            await cloud.publish("edge/v1/acme/store-0002/_all/desired", signed(
                "desired", "store-0002", "_all", layer="store", ver=1, config=drivers), qos=1, retain=True)  # fmt: skip
            await until(lambda: applied("store-0002", "store", 1))
            live = dl["store-0002"]
            assert live is not None
            assert live.desired.counters["live"] == 1
            assert [reported[s]["layers"]["store"] for s in ("store-0001", "store-0003")] == [0, 0]

            # a forged layer (another key) and a replay change nothing and are counted
            forged = Ed25519PrivateKey.generate()
            await cloud.publish("edge/v1/acme/_all/_all/desired", signed(
                "desired", "_all", "_all", forged, layer="tenant", ver=9, config={"logging": {"level": "debug"}}),
                qos=1)  # fmt: skip
            await until(lambda: all(x is not None and x.dropped["untrusted-kid"] == 1 for x in dl.values()))

            # consent: granted, then withdrawn; every device applies both revisions
            for rev, members in ((1, [PSEUDONYM]), (2, [])):
                shard = signed("consent", "_all", "_all", shard=SHARD, rev=rev, consented=members)
                await cloud.publish(f"edge/v1/acme/_all/_all/consent/{SHARD}", shard, qos=1, retain=True)

                def at(rev: int = rev) -> bool:
                    return all(d.rt.consent_sync is not None and d.rt.consent_sync.revs().get(SHARD) == rev
                               for d in fleet.devices)  # fmt: skip

                await until(at)
            await until(lambda: all(reported[s].get("consent") == {"shards": 1, "pseudonyms": 0} for s in devices))
            assert PSEUDONYM not in json.dumps(reported)
            hashes = {s: x.desired.effective_hash for s, x in dl.items() if x is not None}
        finally:
            listener.cancel()
            await fleet.close()

    # the next run opens every device with the persisted layers (boot_config), offline or not
    again = Fleet(fleet_spec(tmp_path, mosquitto.url))
    await again.open()
    try:
        for d in again.devices:
            assert d.downlink is not None
            assert d.downlink.desired.effective_hash == hashes[d.cfg.identity.store]
            assert d.rt.cfg.buffer.retention["ble"] == 3 * 86400.0
            assert d.rt.consent_sync is not None
            assert d.rt.consent_sync.revs() == {SHARD: 2}
    finally:
        await again.close()
