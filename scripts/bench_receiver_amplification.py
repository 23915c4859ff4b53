"""Receiver under an amplifying payload: memory and the delay of a genuine ack (issue 14, point 5).

Starts its own Mosquitto (free port) and `edge-cloud receive` in a subprocess with the default
limits. Baseline: the round trip of a genuine batch (publish -> signed ok ack) on an idle
receiver. Attack: a 10 MB payload of empty MessagePack arrays (an array-32 header announcing
10 million of them) published on the device's topic, immediately followed by the genuine next
batch; measured: that batch's round trip, and the receiver's resident memory (VmRSS before,
VmHWM peak after) from /proc.

    .venv/bin/python scripts/bench_receiver_amplification.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cloud.identity import register_key
from cloud.keys import create_cloud_key
from edge.wire.uplink import encode_event, kid_of, parse_ack, public_raw, seal_batch
from hil.peers.mosquitto import Mosquitto

IDS = ("bench", "s001", "edge-amp")
TOPIC = "edge/v1/bench/s001/edge-amp/batch"
REPO = Path(__file__).resolve().parents[1]


def mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Chain:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.raw = public_raw(self.key.public_key())
        self.seq, self.prev, self.next_id = 0, bytes(32), 1

    def seal(self) -> tuple[int, bytes]:
        self.seq += 1
        ev = [encode_event({"id": self.next_id + i, "ts": 1, "src": "edge", "type": "edge.tick", "data": {}})
              for i in range(100)]  # fmt: skip
        payload, hh = seal_batch(tenant=IDS[0], store=IDS[1], device=IDS[2], seq=self.seq, prev=self.prev,
                                 event_bodies=ev, first=self.next_id, last=self.next_id + 99, t_ms=1, sync=True,
                                 key=self.key, kid=kid_of(self.raw))  # fmt: skip
        self.next_id += 100
        self.prev = hh
        return self.seq, payload


async def roundtrip(client: aiomqtt.Client, seq: int, payload: bytes, before: bytes | None = None) -> float:
    t0 = time.perf_counter()
    if before is not None:
        await client.publish(TOPIC, before, qos=1)
    await client.publish(TOPIC, payload, qos=1)
    async for m in client.messages:
        if isinstance(m.payload, bytes) and parse_ack(m.payload).seq == seq:
            return time.perf_counter() - t0
    raise RuntimeError("no ack")


async def bench(root: Path, rounds: int) -> None:
    chain = Chain()
    register_key(root / "keys", IDS, chain.raw.hex())
    create_cloud_key(root / "cloud.key")
    with Mosquitto(root / "mq") as broker:
        conf = root / "receiver.yaml"
        conf.write_text(f"broker: mqtt://{broker.host}:{broker.port}\nkeys_dir: keys\ndb: r.db\nout: e.jsonl\n"
                        "cloud_key: cloud.key\nshared_group: null\n")  # fmt: skip
        log = (root / "receiver.log").open("w")
        cmd = [sys.executable, "-m", "cloud.cli", "receive", "--config", str(conf)]
        # a benchmark harness: starting the peer synchronously before the timed part is what we want
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)  # noqa: ASYNC220
        try:
            async with aiomqtt.Client(broker.host, broker.port, identifier=f"bench-{os.getpid()}") as c:
                await c.subscribe("edge/v1/bench/s001/edge-amp/ack", qos=1)
                for _ in range(100):  # wait for the receiver's subscription
                    if "receiver_subscribed" in (root / "receiver.log").read_text():
                        break
                    await asyncio.sleep(0.1)
                base = [await roundtrip(c, *chain.seal()) for _ in range(rounds)]
                rss_before = mib(proc.pid, "VmRSS")
                bomb = b"\xdd\x00\x98\x96\x80" + b"\x90" * 10_000_000
                attacked = [await roundtrip(c, *chain.seal(), before=bomb) for _ in range(rounds)]
                peak = mib(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
    print(f"genuine ack round trip, idle:          median {sorted(base)[len(base) // 2] * 1000:7.1f} ms  "
          f"max {max(base) * 1000:7.1f} ms")
    print(f"genuine ack round trip, after a 10 MB: median {sorted(attacked)[len(attacked) // 2] * 1000:7.1f} ms  "
          f"max {max(attacked) * 1000:7.1f} ms  ({rounds} rounds)")
    print(f"receiver RSS before the attack {rss_before:.1f} MiB, peak (VmHWM) after {peak:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-amp-") as tmp:
        asyncio.run(bench(Path(tmp), args.rounds))


if __name__ == "__main__":
    main()
