"""The MQTT transport's bounds, against a real mosquitto: the incoming queue is capped in messages
and bytes (drops counted, never a crash), and a group is capped in bytes as well as in count."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs
from support.mosquitto import Mosquitto
from test_receiver import WAIT, make_cfg

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
