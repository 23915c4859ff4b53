"""downlink-v1 on the device, end to end: real `edge run` daemons (simulated drivers, restarted on
exit 75 as systemd does) on a real Mosquitto, documents signed here with the test cloud key.

What must hold: a device-layer change to a driver option is applied and shows in `reported` and
`edge status`; a change that makes a driver fail is rolled back within `health.apply_grace` and
reported `rolled-back` with the reason; an invalid layer is rejected whole with every key path;
an old `ver`, a bad signature, a foreign topic or an untrusted kid change nothing and are
counted; after a restart without the broker the daemon runs the same effective hash. Commands
(in-process daemon: this sandbox's kernel clock is not synchronized) run once when delivered
twice and not at all once expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.cloudkey import CLOUD_KEY, signed_uplink
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.configload import load_config
from edge.downlink.component import Downlink, downlink_component
from edge.downlink.desired import boot_config
from edge.supervisor import Supervisor
from edge.uplink.service import uplink_component
from edge.wire.downlink import (
    MAX_DOCUMENT,
    cmd_result_topic,
    cmd_topic,
    consent_shard,
    consent_topic,
    desired_topic,
    document,
    reported_topic,
    sign_document,
)
from edge.wire.uplink import kid_of, public_raw

EDGE = str(Path(sys.executable).parent / "edge")
IDS = ("acme", "s001", "edge-dl")
PREFIX = "edge/v1"
DEVICE_TOPIC = desired_topic(PREFIX, IDS[0], IDS[1], IDS[2])
REPORTED = reported_topic(PREFIX, *IDS)


def _config(tmp_path: Path, url: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    doc = {
        "identity": dict(zip(("tenant", "store", "device"), IDS, strict=True)),
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": signed_uplink(broker=url, reconnect={"initial": "100ms", "max": "300ms"},
                                batch={"linger": "50ms"}),
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": 20, "seed": 1}},
            "nfc": {"enabled": False},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 5, "seed": 3}}],
        },
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s", "apply_grace": "3s"},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = subprocess.run([EDGE, "keys", "init", "--config", str(path)], capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return path


def _layer(ver: int, config: dict[str, Any], *, key: Ed25519PrivateKey = CLOUD_KEY, device: str = IDS[2]) -> bytes:
    doc = document("desired", IDS[0], IDS[1], device, kid_of(public_raw(key.public_key())), int(time.time() * 1000),
                   layer="device", ver=ver, config=config)
    return sign_document(doc, key)


def _cmd(cid: str, exp: int) -> bytes:
    doc = document("cmd", *IDS, kid_of(public_raw(CLOUD_KEY.public_key())), int(time.time() * 1000),
                   id=cid, name="ping", args={}, exp=exp)
    return sign_document(doc, CLOUD_KEY)


class Daemon:
    """`edge run` started again whenever it exits 75 (as systemd's unit does)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.exits: list[int] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._log = open(config.parent / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stopping:
            self._proc = await asyncio.create_subprocess_exec(
                EDGE, "run", "--config", str(self.config), stdout=self._log, stderr=self._log)
            rc = await self._proc.wait()
            self.exits.append(rc)
            if rc != 75:
                return

    async def stop(self) -> None:
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._task, 20)
        finally:
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
            self._log.close()
        assert self.exits[-1] == 0, self.log()

    def log(self) -> str:
        return (self.config.parent / "daemon.log").read_text()[-3000:]


class Cloud:
    """The cloud's side of the broker: publishes documents, keeps the latest `reported` and results."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.reported: dict[str, Any] | None = None
        self.results: list[dict[str, Any]] = []

    async def run(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            if msg.topic.value == REPORTED and payload:
                self.reported = json.loads(payload)
            elif msg.topic.value.endswith("/cmd-result"):
                self.results.append(json.loads(payload))

    async def until(self, pred: Callable[[dict[str, Any]], bool], within: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.reported is not None and pred(self.reported):
                return self.reported
            await asyncio.sleep(0.1)
        raise AssertionError(f"reported never matched; last: {self.reported}")


@contextlib.asynccontextmanager
async def _cloud(broker: Mosquitto) -> AsyncIterator[Cloud]:
    async with aiomqtt.Client(broker.host, broker.port, identifier="cloud") as client:
        await client.subscribe(REPORTED, qos=1)
        await client.subscribe(cmd_result_topic(PREFIX, *IDS), qos=1)
        cloud = Cloud(client)
        task = asyncio.create_task(cloud.run())
        try:
            yield cloud
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _status(config: Path, *, as_json: bool = True) -> Any:
    res = subprocess.run([EDGE, "status", "--config", str(config), *(["--json"] if as_json else [])],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout) if as_json else res.stdout


async def _runtime_downlink(config: Path, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rt = _status(config).get("runtime") or {}
        last = (rt.get("components") or {}).get("downlink") or {}
        if rt.get("state") == "running" and last and pred(last):
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"runtime downlink status never matched: {last}")


async def test_a_driver_option_is_applied_forgeries_are_counted_and_a_reboot_offline_keeps_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = _config(tmp_path, mosquitto.url)
    async with _cloud(mosquitto) as cloud:
        daemon = Daemon(config)
        try:
            first = await cloud.until(lambda r: r["apply"] is None)
            assert first["layers"] == {"tenant": 0, "store": 0, "device": 0}
            assert set(first["health"]["drivers"]) == {"ble", "pos:till-1"}
            assert first["consent"] == {"shards": 0, "pseudonyms": 0}
            assert first["cloud_kids"] == [kid_of(public_raw(CLOUD_KEY.public_key()))]
            await cloud.client.publish(DEVICE_TOPIC, _layer(1, {"drivers": {"ble": {"sim": {"rate": 7}}}}),
                                       qos=1, retain=True)
            live = await cloud.until(lambda r: r["apply"] is not None)
            assert live["apply"] == {"state": "applied", "layer": "device", "ver": 1, "errors": []}, daemon.log()
            assert live["layers"] == {"tenant": 0, "store": 0, "device": 1}
            assert live["effective"] != first["effective"]
            assert daemon.exits == []  # drivers only: the BLE driver restarted, the daemon did not
            # another section: applied by restarting the daemon (exit 75, started again)
            await cloud.client.publish(DEVICE_TOPIC, _layer(2, {"drivers": {"ble": {"sim": {"rate": 7}}},
                                                                "buffer": {"commit_interval": "30ms"}}),
                                       qos=1, retain=True)
            done = await cloud.until(lambda r: r["apply"]["ver"] == 2)
            assert done["apply"] == {"state": "applied", "layer": "device", "ver": 2, "errors": []}, daemon.log()
            assert done["effective"] not in (first["effective"], live["effective"])
            assert daemon.exits == [75]
            text = _status(config, as_json=False)
            assert "layers      tenant 0, store 0, device 2" in text
            assert f"effective {done['effective']}" in text
            assert "last apply  applied: device layer ver 2" in text

            # an old ver, a bad signature, a foreign topic, an untrusted kid: nothing changes, each counted
            stale = _layer(2, {"drivers": {"ble": {"sim": {"rate": 3}}}})
            forged = bytearray(_layer(5, {"drivers": {"ble": {"sim": {"rate": 3}}}}))
            forged[-1] ^= 1  # the signature's last byte
            foreign = _layer(6, {"drivers": {"ble": {"sim": {"rate": 3}}}}, device="edge-other")
            rogue = _layer(7, {"drivers": {"ble": {"sim": {"rate": 3}}}}, key=Ed25519PrivateKey.generate())
            for payload in (stale, bytes(forged), foreign, rogue):
                await cloud.client.publish(DEVICE_TOPIC, payload, qos=1)
            dl = await _runtime_downlink(
                config, lambda d: sum(d["dropped"].values()) >= 3 and d["desired"]["stale"] >= 1)
            assert dl["dropped"] == {"bad-signature": 1, "topic-mismatch": 1, "untrusted-kid": 1}
            assert dl["desired"]["layers"]["device"] == 2
            assert dl["desired"]["effective"] == done["effective"]
            assert daemon.exits == [75]  # no restart for any of them
        finally:
            await daemon.stop()
    # a reboot without the broker: the persisted layer applies again, same effective hash
    mosquitto.stop()
    daemon = Daemon(config)
    try:
        dl = await _runtime_downlink(config, lambda d: True)
        assert dl["desired"]["effective"] == done["effective"]
        assert dl["desired"]["layers"] == {"tenant": 0, "store": 0, "device": 2}
        assert _status(config)["downlink"]["effective"] == done["effective"]
    finally:
        await daemon.stop()
    assert daemon.exits == [0]


async def test_a_change_that_makes_a_driver_fail_is_rolled_back_within_the_grace(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = _config(tmp_path, mosquitto.url)
    async with _cloud(mosquitto) as cloud:
        daemon = Daemon(config)
        try:
            first = await cloud.until(lambda r: r["apply"] is None)
            # check-config cannot judge a pyserial URL (edge/preflight.py): the driver finds out at run time
            bad = {"drivers": {"pos": [{"name": "till-1", "backend": "serial", "port": "socket://127.0.0.1:9",
                                        "framing": "lines"}]}}
            t0 = time.monotonic()
            await cloud.client.publish(DEVICE_TOPIC, _layer(1, bad), qos=1, retain=True)
            done = await cloud.until(lambda r: r["apply"] is not None, within=30)
            assert time.monotonic() - t0 < 3 + 5  # the 3 s grace, generously
            assert done["apply"]["state"] == "rolled-back", daemon.log()
            assert (done["apply"]["layer"], done["apply"]["ver"]) == ("device", 1)
            assert "driver pos:till-1 is degraded" in done["apply"]["errors"][0]
            assert done["layers"]["device"] == 0
            assert done["effective"] == first["effective"]
            assert daemon.exits == []  # drivers only: rolled back live
            await cloud.until(lambda r: r["health"]["drivers"]["pos:till-1"] == "running")
            # with another section the daemon restarts into the trial and, rolled back, once more
            await cloud.client.publish(DEVICE_TOPIC, _layer(2, {**bad, "buffer": {"commit_interval": "30ms"}}),
                                       qos=1, retain=True)
            done = await cloud.until(lambda r: r["apply"]["ver"] == 2, within=30)
            assert done["apply"]["state"] == "rolled-back", daemon.log()
            assert "driver pos:till-1 is degraded" in done["apply"]["errors"][0]
            assert done["layers"]["device"] == 0
            assert done["effective"] == first["effective"]
            assert daemon.exits == [75, 75]  # into the trial, and back
        finally:
            await daemon.stop()


async def test_an_invalid_layer_is_rejected_whole_with_every_key_path(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = _config(tmp_path, mosquitto.url)
    async with _cloud(mosquitto) as cloud:
        daemon = Daemon(config)
        try:
            first = await cloud.until(lambda r: r["apply"] is None)
            unsettable = {"identity": {"device": "x"}, "uplink": {"broker": "mqtt://10.0.0.1:1883", "window": 2},
                          "buffer": {"file": "other.db"}, "drivers": {"ble": {"sim": {"rate": 3}}}}
            await cloud.client.publish(DEVICE_TOPIC, _layer(1, unsettable), qos=1, retain=True)
            r = await cloud.until(lambda r: r["apply"] is not None)
            assert r["apply"]["state"] == "rejected"
            assert r["apply"]["errors"] == ["buffer.file: not remotely settable", "identity: not remotely settable",
                                            "uplink.broker: not remotely settable"]
            invalid = {"buffer": {"commit_max_events": 0}, "drivers": {"ble": {"sim": {"rate": "fast"}}},
                       "logging": {"level": "loud"}}
            await cloud.client.publish(DEVICE_TOPIC, _layer(2, invalid), qos=1, retain=True)
            r = await cloud.until(lambda r: r["apply"]["ver"] == 2)
            assert r["apply"]["state"] == "rejected"
            paths = sorted(e.split(":")[0] for e in r["apply"]["errors"])
            assert paths == ["buffer.commit_max_events", "drivers.ble.sim.rate", "logging.level"], r["apply"]
            # the start-up checks of check-config too (edge/preflight.py): a serial port that is not there
            no_port = {"drivers": {"pos": [{"name": "till-1", "backend": "serial", "port": "/dev/no-such-tty",
                                            "framing": "lines"}]}}
            await cloud.client.publish(DEVICE_TOPIC, _layer(3, no_port), qos=1, retain=True)
            r = await cloud.until(lambda r: r["apply"]["ver"] == 3)
            assert r["apply"]["state"] == "rejected"
            assert [e.split(":")[0] for e in r["apply"]["errors"]] == ["drivers.pos[0].port"], r["apply"]
            assert r["layers"]["device"] == 0
            assert r["effective"] == first["effective"]
            assert daemon.exits == []  # nothing restarted
            assert "last apply  rejected: device layer ver 3: drivers.pos[0].port" in _status(config, as_json=False)
        finally:
            await daemon.stop()


class SyncedClock(SystemClock):
    def synchronized(self) -> bool:  # the sandbox's kernel clock is not
        return True


async def test_commands_run_at_most_once_consent_is_counted_only_and_the_intake_is_bounded(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = _config(tmp_path, mosquitto.url)
    cfg = load_config(path)
    boot = boot_config(str(path), cfg)
    sup = Supervisor(boot.effective.cfg, SyncedClock(), drivers=lambda c, k: [],
                     components=[uplink_component, downlink_component(str(path), boot)],
                     cloud_consent=boot.effective.cfg.cloud_consent)
    stop = asyncio.Event()
    async with _cloud(mosquitto) as cloud:
        task = asyncio.create_task(sup.run(stop))
        try:
            await cloud.until(lambda r: r["apply"] is None)
            now = int(time.time() * 1000)
            topic = cmd_topic(PREFIX, *IDS)
            for payload in (_cmd("c-1", now + 60_000), _cmd("c-1", now + 60_000), _cmd("c-2", now - 1000)):
                await cloud.client.publish(topic, payload, qos=1)
            for _ in range(100):
                if len(cloud.results) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert [(r["id"], r["ok"], r.get("error")) for r in cloud.results] == [
                ("c-1", True, None), ("c-1", False, "duplicate"), ("c-2", False, "expired")]
            assert cloud.results[0]["result"]["t"] > 0
            # a consent shard goes to ConsentSync; `reported` counts it and never names the pseudonym
            pseudonym = "st-4f1c2a9e0b7d"
            shard = consent_shard(pseudonym)
            doc = document("consent", IDS[0], "_all", "_all", kid_of(public_raw(CLOUD_KEY.public_key())),
                           now, shard=shard, rev=1, consented=[pseudonym])
            await cloud.client.publish(consent_topic(PREFIX, IDS[0], shard), sign_document(doc, CLOUD_KEY),
                                       qos=1, retain=True)
            r = await cloud.until(lambda r: r["consent"]["shards"] == 1)
            assert r["consent"] == {"shards": 1, "pseudonyms": 1}
            assert sup.runtime is not None
            assert sup.runtime.consent_sync is not None
            assert pseudonym in sup.runtime.consent_sync
            assert pseudonym not in json.dumps(r)
            # oversized: dropped unread; a burst beyond the queue: dropped and counted, ingest unaffected
            dl = next(c for c in sup.runtime.components if isinstance(c, Downlink))
            await cloud.client.publish(DEVICE_TOPIC, b"\x00" * (MAX_DOCUMENT + 1), qos=1)
            for _ in range(100):
                if dl.dropped["too-large"]:
                    break
                await asyncio.sleep(0.1)
            assert dl.dropped["too-large"] == 1
            limit = boot.effective.cfg.downlink.queue_max
            for _ in range(limit + 5):  # no await in between: the consumer cannot take any
                dl._offer(DEVICE_TOPIC, b"garbage")
            assert dl.dropped["queue-full"] == 5
            for _ in range(100):
                if dl.dropped["malformed"] == limit:
                    break
                await asyncio.sleep(0.05)
            assert dl.dropped["malformed"] == limit
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert os.stat(tmp_path / "state" / "desired.json").st_mode & 0o777 == 0o600
