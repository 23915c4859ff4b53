"""The MQTT transport's bounds, against a real mosquitto: the incoming queue is capped in messages
and bytes (drops counted, never a crash), a group is capped in bytes as well as in count, and an
oversized packet is never read (3.1.1: client-side cap; MQTT 5: Maximum Packet Size)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs
from support.mosquitto import Mosquitto
from test_receiver import WAIT, Device, cloud_key_file, make_cfg, publisher

from cloud.mqtt import InboxStats, MqttTransport, inbox_type
from cloud.transport import Inbound, Settlement

pytestmark = pytest.mark.mosquitto


async def until(cond: Callable[[], bool]) -> None:
    while not cond():  # noqa: ASYNC110 - polling state the transport's callbacks update
        await asyncio.sleep(0.01)


def _message(size: int) -> aiomqtt.Message:
    return aiomqtt.Message("edge/v1/acme/s001/edge-01/batch", b"x" * size, qos=1, retain=False, mid=1,
                           properties=None)  # fmt: skip


def test_inbox_caps_bytes_and_count_counts_every_drop_and_always_admits_one_message() -> None:
    """Beyond max_bytes (or maxsize) a message is refused (QueueFull, as aiomqtt expects) and counted;
    taking one out frees its bytes; a message larger than max_bytes still enters an empty queue."""
    stats = InboxStats()
    q = inbox_type(1000, stats)(maxsize=3)
    q.put_nowait(_message(600))
    with capture_logs() as logs, pytest.raises(asyncio.QueueFull):
        q.put_nowait(_message(600))  # 1200 bytes > 1000
    assert (stats.dropped, stats.dropped_bytes) == (1, 600)
    assert logs[0]["event"] == "receiver_queue_full"
    q.put_nowait(_message(200))
    q.put_nowait(_message(200))
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(_message(0))  # the fourth message: over maxsize
    assert stats.dropped == 2
    assert [len(q.get_nowait().payload) for _ in range(3)] == [600, 200, 200]
    q.put_nowait(_message(5000))  # empty queue: admitted whatever its size
    assert q.qsize() == 1
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(_message(1))
    assert stats.dropped == 3


async def test_a_flood_while_a_group_is_in_hand_is_capped_and_groups_are_capped_in_bytes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The handler is busy with the first group while 21 messages arrive: 5 wait (max_queued), the
    rest are dropped and counted. Then, the handler busy again, 6 messages of 100 KiB queue up and
    with max_group_bytes 300 KiB are handed over in groups of at most 3, none lost."""
    cfg = make_cfg(tmp_path, mosquitto.url, shared_group=None, max_queued=5, max_group_bytes="300KiB")
    transport = MqttTransport(cfg)
    gate = asyncio.Event()
    groups: list[list[int]] = []

    async def handler(items: Sequence[Inbound]) -> Settlement:
        groups.append([len(i.payload) for i in items])
        await gate.wait()
        return Settlement(acks=[], committed=True)

    stop = asyncio.Event()
    task = asyncio.create_task(transport.run(stop, handler))
    try:
        async with asyncio.timeout(WAIT):
            await transport.ready.wait()
        ident = f"flood-{os.getpid()}-{time.monotonic_ns()}"
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=ident) as c:
            topic = "edge/v1/acme/s001/edge-01/batch"
            async with asyncio.timeout(WAIT):
                for _ in range(21):
                    await c.publish(topic, b"m", qos=1)
                await until(lambda: bool(groups) and transport.inbox.dropped >= 21 - len(groups[0]) - 5)
            await asyncio.sleep(0.1)
            dropped = 21 - len(groups[0]) - 5
            assert transport.inbox.dropped == dropped
            gate.set()
            async with asyncio.timeout(WAIT):
                await until(lambda: sum(map(len, groups)) >= 6)
            groups.clear()
            gate.clear()
            async with asyncio.timeout(WAIT):
                for _ in range(6):
                    await c.publish(topic, b"b" * 100 * 1024, qos=1)
                await until(lambda: bool(groups))
                await asyncio.sleep(0.2)  # the rest arrive and queue behind the busy handler
                gate.set()
                await until(lambda: sum(map(len, groups)) >= 6)
        assert max(map(len, groups)) == 3, groups
        assert sum(map(len, groups)) == 6
        assert transport.inbox.dropped == dropped
    finally:
        gate.set()
        stop.set()
        async with asyncio.timeout(WAIT):
            await task


def _vm(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_10mb_amplifier_is_dropped_unread_and_a_genuine_batch_is_still_acked(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    """`edge-cloud receive` (default limits) against a real Mosquitto with no broker-side size limit:
    a 10 MB payload of empty MessagePack arrays is published on a device's batch topic, and the
    device's genuine batch right behind it. Over 3.1.1 the client-side cap drops the connection
    before reading the packet (logged `receiver_packet_refused`) and reconnects; over MQTT 5 the
    broker never sends it (Maximum Packet Size). The genuine batch, resent every second as a device
    does after its ack timeout, is acked within 5 s, and the receiver's peak RSS grows by far less
    than the 10 MB it was sent (the old receiver read it whole: 54 -> 96 MiB)."""
    dev = Device()
    dev.register(tmp_path / "keys")
    cloud_key_file(tmp_path)
    conf = tmp_path / "receiver.yaml"
    conf.write_text(f"broker: {mosquitto.url}\nprotocol: '{protocol}'\nkeys_dir: keys\ndb: r.db\nout: e.jsonl\n"
                    "cloud_key: cloud.key\nshared_group: null\nlogging:\n  format: json\n")  # fmt: skip
    log_path = tmp_path / "receiver.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-u", "-m", "cloud.cli", "receive", "--config", str(conf)]
    with log_path.open("w") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as proc:
        try:
            asyncio.run(_amplify(mosquitto, dev, proc.pid, log_path, protocol))
        finally:
            proc.terminate()
            proc.wait(WAIT)
    text = log_path.read_text()
    if protocol == "3.1.1":
        assert "receiver_packet_refused" in text
    assert "batch_unauthenticated" not in text  # never read, so never parsed


async def _amplify(broker: Mosquitto, dev: Device, pid: int, log_path: Path, protocol: str) -> None:
    async with asyncio.timeout(WAIT):
        await until_log(log_path, "receiver_subscribed")
    async with publisher(broker) as pub:
        first = dev.seal()
        assert (await pub.roundtrip(dev, first[0], first[2])).ok
        rss_before = _vm(pid, "VmRSS")
        bomb = b"\xdd\x00\x98\x96\x80" + b"\x90" * 10_000_000
        seq, _, payload = dev.seal()
        t0 = time.monotonic()
        await pub.send(dev.topic, bomb)
        await pub.send(dev.topic, payload)
        async with asyncio.timeout(5.0):
            while not pub.acks[(dev.ids[2], seq)]:
                with suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await pub.ack(dev.ids[2], seq)
                        break
                await pub.send(dev.topic, payload)  # no ack within a second: resend, as a device does
        delay = time.monotonic() - t0
        assert pub.acks[(dev.ids[2], seq)][0].ok
        peak = _vm(pid, "VmHWM")
    assert peak - rss_before < 8, (protocol, rss_before, peak, delay)


async def until_log(path: Path, word: str) -> None:
    while word not in path.read_text():  # noqa: ASYNC110, ASYNC240 - polling a small log file of a subprocess
        await asyncio.sleep(0.05)
