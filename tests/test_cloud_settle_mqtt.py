"""A deferral behind a gap that never fills is settled, end to end: `edge-cloud receive` over a
real Mosquitto (the in-process rules, with a FakeClock, are in test_cloud_core.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest
from support.mosquitto import Mosquitto
from test_receiver import WAIT, Device, Publisher, cloud_key_file, publisher


async def until_log(path: Path, word: str) -> None:
    while word not in path.read_text():  # noqa: ASYNC110, ASYNC240 - polling a small log file of a subprocess
        await asyncio.sleep(0.05)

pytestmark = pytest.mark.mosquitto


async def _no_ack(pub: Publisher, dev: Device, seq: int, payload: bytes) -> None:
    count = len(pub.acks[(dev.ids[2], seq)])
    await pub.send(dev.topic, payload)
    with suppress(TimeoutError):
        async with asyncio.timeout(0.5):
            await pub.ack(dev.ids[2], seq, count=count + 1)
    assert len(pub.acks[(dev.ids[2], seq)]) == count, "answered while it should be deferred"


async def _scenario(broker: Mosquitto, dev: Device, log_path: Path) -> None:
    async with asyncio.timeout(WAIT):
        await until_log(log_path, "receiver_subscribed")
    async with publisher(broker) as pub:
        old = [dev.seal(tag="old") for _ in range(4)]
        assert (await pub.roundtrip(dev, 1, old[0][2])).ok
        dev.restart_from_scratch()
        new = [dev.seal(tag="new") for _ in range(5)]
        for seq, _, payload in new[:2]:
            assert (await pub.roundtrip(dev, seq, payload)).ok
        assert (await pub.roundtrip(dev, 4, old[3][2])).ok  # replayed into the new epoch; the genuine 3 is lost
        for _ in range(2):  # defer_max_resends: 2 -> deferred on arrival and on the first resend
            await _no_ack(pub, dev, 4, new[3][2])
        ack = await pub.roundtrip(dev, 4, new[3][2])
        assert (ack.ok, ack.hh) == (True, new[3][1])
        assert (await pub.roundtrip(dev, 5, new[4][2])).ok


def test_edge_cloud_receive_settles_a_deferral_after_defer_max_resends(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """After a reset, a replayed old-epoch 4 sits in the new epoch behind a gap (the genuine 3 is
    never sent). The genuine 4 gets no ack on its first arrival and its first resend, and is acked
    ok on the second resend (`defer_max_resends: 2`), logged `batch_settled`; the genuine 5 is
    acked at once; nothing is rejected."""
    dev = Device()
    (tmp_path / "keys").mkdir()
    dev.register(tmp_path / "keys")
    cloud_key_file(tmp_path)
    conf = tmp_path / "receiver.yaml"
    conf.write_text(f"broker: {mosquitto.url}\nkeys_dir: keys\ndb: r.db\nout: e.jsonl\ncloud_key: cloud.key\n"
                    "shared_group: null\ndefer_max_resends: 2\nlogging:\n  format: json\n")  # fmt: skip
    log_path = tmp_path / "receiver.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-u", "-m", "cloud.cli", "receive", "--config", str(conf)]
    with log_path.open("w") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as proc:
        try:
            asyncio.run(_scenario(mosquitto, dev, log_path))
        finally:
            proc.terminate()
            assert proc.wait(WAIT) == 0
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("batch_deferred") == 2
    (settled,) = [e for e in events if e["event"] == "batch_settled"]
    assert (settled["seq"], settled["after"]) == (4, "resends")
    assert "batch_rejected" not in names
    (stopped,) = [e for e in events if e["event"] == "receiver_stopped"]
    assert (stopped["settled"], stopped["deferred"], stopped["detached"], stopped["rejected"]) == (1, 2, 1, {})
