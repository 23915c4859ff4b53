"""The optional bandwidth cap (`uplink.bandwidth`, bytes/s) for metered backup links.

Measured on the broker side by a raw subscriber on the batch topic. The cap is a token bucket
with one second of burst, so by any moment t after the uplink was created at most
`rate * (t + 1)` payload bytes can have been published; arrivals are never earlier than the
publishes, so the bound holds for what the subscriber saw however loaded the machine is. No
upper bound on time is asserted (a busy machine only makes it slower).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.mosquitto import Mosquitto
from uplink_e2e import capture, check_chain, received_ids

from cloud.config import ReceiverConfig
from cloud.identity import register_key
from cloud.keys import create_cloud_key
from cloud.receiver import Receiver
from edge.buffer import Buffer
from edge.clock import SystemClock
from edge.config import Config
from edge.events import Pending
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.service import Uplink, uplink_component

pytestmark = pytest.mark.mosquitto

RATE = 40_000  # bytes/s
EVENTS = 1200  # ~190 B each, uncompressed: ~230 kB, so about 4.7 s at the cap


def _config(state: Path, url: str) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-bw"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": {
            "broker": url, "bandwidth": RATE, "window": 8, "ack_timeout": "60s",
            "batch": {"max_events": 40, "linger": "10ms", "compression": "none"},
        },
        "drivers": {"ble": {"enabled": False}, "nfc": {"enabled": False}},
    })  # fmt: skip


async def test_bandwidth_cap_bounds_the_bytes_published_over_time(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A backlog of ~230 kB drained under a 40 kB/s cap: at every arrival the bytes seen so far are
    within rate * (elapsed + 1 s burst), so the whole takes at least 0.7 x (bytes / rate - 1) s;
    and everything still arrives, once, on an intact chain."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = _config(state, mosquitto.url)
    clock = SystemClock()
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    buf = await Buffer.open(cfg, clock)
    for i in range(EVENTS):
        await buf.put(Pending(ts=clock.wall_ms(), src="edge", type="edge.test", data={"i": i, "pad": "x" * 150}))
    assert await buf.flush() == EVENTS
    await buf.close()

    (tmp_path / "rkeys").mkdir()
    register_key(tmp_path / "rkeys", ("acme", "s001", "edge-bw"), keys.public_key().hex())
    create_cloud_key(tmp_path / "cloud.key")  # acks are always signed; this device does not check them
    rcfg = ReceiverConfig(broker=mosquitto.url, client_id="bw-receiver", keys_dir=tmp_path / "rkeys",
                          db=tmp_path / "r.db", out=tmp_path / "events.jsonl",
                          cloud_key=tmp_path / "cloud.key")  # fmt: skip
    receiver = Receiver(rcfg)
    rstop = asyncio.Event()
    rtask = asyncio.create_task(receiver.run(rstop))
    await asyncio.wait_for(receiver.ready.wait(), 15)
    sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component])
    stop = asyncio.Event()
    try:
        async with capture(mosquitto.host, mosquitto.port) as cap:
            t0 = time.monotonic()  # before the uplink (and its token bucket) exists
            task = asyncio.create_task(sup.run(stop))
            try:
                while sup.runtime is None or not sup.runtime.components:
                    assert not task.done()
                    await asyncio.sleep(0.02)
                up = sup.runtime.components[0]
                assert isinstance(up, Uplink)
                for _ in range(1200):  # up to 60 s
                    if up.counters["events_acked"] >= EVENTS:
                        break
                    await asyncio.sleep(0.05)
                assert up.counters["events_acked"] == EVENTS, up.status()
                assert up.counters["resent"] == 0
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    finally:
        rstop.set()
        await asyncio.wait_for(rtask, 20)

    sizes = [len(p) for _t, _topic, p in cap.seen]
    total = sum(sizes)
    assert total > 5 * RATE  # the cap matters: several seconds of budget
    seen = 0
    for (t, _topic, _payload), size in zip(cap.seen, sizes, strict=True):
        seen += size
        assert seen <= RATE * (t - t0 + 1.0) + max(sizes), f"{seen} B by {t - t0:.2f} s"
    must_take = total / RATE - 1.0
    took = cap.seen[-1][0] - t0
    assert took >= 0.7 * must_take, f"{total} B in {took:.2f} s"
    assert sorted(received_ids(tmp_path / "events.jsonl")) == list(range(1, EVENTS + 1))
    assert len(check_chain(cap, keys.public_key())) == up.counters["acked"]
