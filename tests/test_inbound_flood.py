"""The edge's inbound cap with the downlink on (its default), against a real `edge run` daemon and a
real Mosquitto: the session's cap is then max(8 KiB, downlink MAX_PACKET = 4 MiB + 64 KiB), so an
oversize message must still cost the daemon little memory, and 4 MiB documents flooding the
downlink's topics must stay within its byte bound (MAX_QUEUED_BYTES, 32 MiB), not count x 4 MiB.

The test plays the cloud: it acks every batch it sees with the trusted cloud key (support.cloudkey),
so "the uplink keeps delivering" is measured as batches acked after the flood. RSS is read from
/proc/PID/status of the daemon (VmHWM: the peak, so a short spike is seen too).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from support.cloudkey import CLOUD_KEY, CLOUD_PUBLIC_HEX
from support.mosquitto import Mosquitto, free_port

from edge.downlink.component import MAX_PACKET, MAX_QUEUED_BYTES
from edge.uplink.service import INBOUND_QUEUE_BYTES
from edge.wire.downlink import MAX_DOCUMENT
from edge.wire.uplink import make_ack, parse_batch

EDGE = str(Path(sys.executable).parent / "edge")
PREFIX = "edge/v1/acme/s001/edge-fl"
MiB = 1024 * 1024


def _mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextmanager
def _daemon(tmp_path: Path, url: str, protocol: str) -> Iterator[subprocess.Popen[str]]:
    state = tmp_path / "state"
    state.mkdir()
    doc: dict[str, Any] = {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-fl"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"broker": url, "cloud_public_key": CLOUD_PUBLIC_HEX, "protocol": protocol, "window": 4,
                   "ack_timeout": "5s", "batch": {"max_events": 5, "linger": "50ms"},
                   "reconnect": {"initial": "200ms", "max": "500ms"}},
        "drivers": {"ble": {"backend": "sim", "sim": {"rate": 20, "seed": 1}}},
        "health": {"listen": f"127.0.0.1:{free_port()}", "drain_timeout": "3s"},
        "logging": {"level": "warning", "format": "json"},
    }  # fmt: skip
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    res = subprocess.run([EDGE, "keys", "init", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=30, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    with (tmp_path / "edge.log").open("w") as log:
        proc = subprocess.Popen([EDGE, "run", "--config", str(cfg)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=log, text=True)  # fmt: skip
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Cloud:
    """Acks every batch of the device with the trusted cloud key; counts what it acked."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.acked: set[int] = set()

    async def run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier="cloud") as c:
            await c.subscribe(f"{PREFIX}/batch", qos=1)
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                b = parse_batch(msg.payload)
                ack = make_ack(tenant="acme", store="s001", device="edge-fl", seq=b.seq, hh=b.hh, ok=True,
                               key=CLOUD_KEY)  # fmt: skip
                await c.publish(f"{PREFIX}/ack", ack, qos=1)
                self.acked.add(b.seq)


async def _until(cond: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return bool(cond())


def _uplink(tmp_path: Path) -> dict[str, Any]:
    res = subprocess.run([EDGE, "status", "--config", str(tmp_path / "edge.yaml"), "--json"], capture_output=True,
                         text=True, timeout=30, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    return dict(doc["runtime"]["components"]["uplink"])


def test_the_session_cap_is_the_downlinks_and_its_queue_is_bounded_by_bytes() -> None:
    """The figures the docs state: 4 MiB + 64 KiB per packet; 40 MiB queued in the MQTT client and 32 MiB
    in the downlink at most."""
    assert MAX_PACKET == MAX_DOCUMENT + 64 * 1024 == 4 * MiB + 64 * 1024
    assert 32 * MiB == MAX_QUEUED_BYTES
    assert 40 * MiB == INBOUND_QUEUE_BYTES


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_200_mib_ack_keeps_rss_bounded_and_the_uplink_delivers_on(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    """Downlink on: 200 MiB on the ack topic. MQTT 5: Mosquitto never sends it (above our Maximum
    Packet Size); 3.1.1: the connection is dropped on its header. Either way the daemon's peak RSS
    grows < 30 MiB and batches are acked again afterwards."""
    cloud = _Cloud(mosquitto)
    task = asyncio.create_task(cloud.run())
    try:
        with _daemon(tmp_path, mosquitto.url, protocol) as proc:
            assert await _until(lambda: len(cloud.acked) >= 3, 30), (tmp_path / "edge.log").read_text()[-3000:]
            await asyncio.sleep(1.0)  # settled
            before = _mem(proc.pid)["VmRSS"]
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as attacker:
                await attacker.publish(f"{PREFIX}/ack", b"\x90" * (200 * MiB), qos=1, timeout=60)  # Mosquitto has it
            seen = max(cloud.acked)
            assert await _until(lambda: max(cloud.acked) >= seen + 3, 30), (tmp_path / "edge.log").read_text()[-3000:]
            assert proc.poll() is None
            grown = _mem(proc.pid)["VmHWM"] - before
            assert grown < 30 * MiB, f"peak RSS grew by {grown / MiB:.1f} MiB"
            if protocol == "3.1.1":
                assert await _until(lambda: _uplink(tmp_path)["inbound_refused"] >= 1, 15), _uplink(tmp_path)
                assert _uplink(tmp_path)["connects"] >= 2
            else:
                up = _uplink(tmp_path)
                assert up["connects"] == 1, up  # the broker kept it off our session
    finally:
        task.cancel()


async def test_a_flood_of_4_mib_retained_documents_stays_within_the_byte_bound(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """40 retained 4 MiB messages (160 MiB) on the tenant's consent shards, published at once: the
    MQTT client queues at most 40 MiB of them and the downlink 32 MiB (the rest dropped
    `queue-full`, or refused once verified), so the daemon's peak RSS grows far less than 160 MiB,
    and the uplink delivers on."""
    cloud = _Cloud(mosquitto)
    task = asyncio.create_task(cloud.run())
    try:
        with _daemon(tmp_path, mosquitto.url, "5") as proc:
            assert await _until(lambda: len(cloud.acked) >= 3, 30), (tmp_path / "edge.log").read_text()[-3000:]
            await asyncio.sleep(1.0)
            before = _mem(proc.pid)["VmRSS"]
            junk = b"\xa0" * MAX_DOCUMENT  # the largest a document may be: queued, never valid
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as attacker:
                for i in range(40):
                    await attacker.publish(f"edge/v1/acme/_all/_all/consent/{i:02x}", junk, qos=1, retain=True)
            seen = max(cloud.acked)
            assert await _until(lambda: max(cloud.acked) >= seen + 3, 30), (tmp_path / "edge.log").read_text()[-3000:]
            grown = _mem(proc.pid)["VmHWM"] - before
            # at most 40 MiB in the MQTT client's queue, 32 MiB in the downlink's, one being verified;
            # without the byte bound on the MQTT queue this was 132 MiB (40 x 4 MiB arriving at once)
            assert grown < INBOUND_QUEUE_BYTES + MAX_QUEUED_BYTES + 16 * MiB, f"peak RSS grew by {grown / MiB:.1f} MiB"
            print(f"peak RSS growth {grown / MiB:.1f} MiB")
            assert proc.poll() is None
    finally:
        task.cancel()
