"""What one huge message on the device's ack topic costs the edge's memory (issue 14, point 5).

Starts a real Mosquitto and a real `edge run` (no drivers, uplink on, a cloud key set), waits until
the uplink is online, then an attacker client publishes one `--mib` MiB message (default 200) on
`edge/v1/acme/s001/edge-01/ack`. Reports the peak RSS (VmHWM) before and after, for:

  baseline       a bare aiomqtt 3.1.1 subscriber on the ack topic in its own process: what the
                 uplink did before the cap (paho reads the whole packet before anyone can refuse it)
  3.1.1          `edge run`, uplink.protocol "3.1.1", broker without a size limit: the edge's own
                 cap (edge/uplink/inbound.py) drops the connection on the packet's header
  3.1.1+broker   the same with Mosquitto `max_packet_size 65536` (the documented broker-side limit)
  5              `edge run`, MQTT 5, CONNECT Maximum Packet Size 8 KiB: the broker never sends it

    .venv/bin/python scripts/bench_ack_flood.py [--mib 200]
"""

# ruff: noqa: ASYNC220, ASYNC221, ASYNC240  # a benchmark driver: blocking set-up calls are fine here
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hil.peers.mosquitto import Mosquitto  # noqa: E402 - after the path set-up above

EDGE = str(Path(sys.executable).parent / "edge")
CLOUD_PUB = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"  # any valid key: never signs here


BASELINE = """
import asyncio, sys, aiomqtt
async def main():
    async with aiomqtt.Client(sys.argv[1], int(sys.argv[2]), identifier="baseline",
                              protocol=aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe("edge/v1/acme/s001/edge-01/ack", qos=1)
        async for m in c.messages:
            pass
asyncio.run(main())
"""


class LimitedMosquitto(Mosquitto):
    def config_text(self) -> str:
        return super().config_text() + "max_packet_size 65536\n"


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def one(mode: str, mib: int, work: Path) -> dict[str, object]:
    broker_cls = LimitedMosquitto if mode == "3.1.1+broker" else Mosquitto
    work.mkdir(parents=True)
    with broker_cls(work / "mosquitto") as broker:
        state = work / "state"
        state.mkdir()
        doc = {"identity": {"tenant": "acme", "store": "s001", "device": "edge-01"},
               "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
               "uplink": {"broker": broker.url, "cloud_public_key": CLOUD_PUB,
                          "protocol": "5" if mode == "5" else "3.1.1"},
               "drivers": {"ble": {"enabled": False}, "nfc": {"enabled": False}},
               "health": {"enabled": False, "advertise": False}, "logging": {"format": "json"}}  # fmt: skip
        cfg = work / "edge.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        subprocess.run([EDGE, "keys", "init", "--config", str(cfg)], check=True, capture_output=True)
        cmd = [EDGE, "run", "--config", str(cfg)] if mode != "baseline" else [sys.executable, "-c", BASELINE,
                                                                                broker.host, str(broker.port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and mode != "baseline":
                try:
                    rt = json.loads((state / "runtime.json").read_text())
                    if rt["components"]["uplink"]["state"] == "online":
                        break
                except (OSError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            before = _kib(proc.pid, "VmHWM")
            payload = b"\x90" * (mib * 1024 * 1024)
            try:
                async with aiomqtt.Client(broker.host, broker.port, identifier="attacker", timeout=60) as attacker:
                    await attacker.publish("edge/v1/acme/s001/edge-01/ack", payload, qos=0, timeout=60)
            except aiomqtt.MqttError as exc:
                print(f"  [{mode}] publisher: {exc}", file=sys.stderr)
            del payload
            await asyncio.sleep(8.0)  # delivery of 200 MiB over loopback plus the edge's handling
            after = _kib(proc.pid, "VmHWM")
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return {"mode": mode, "peak_rss_before_mib": round(before / 1024, 1), "peak_rss_after_mib": round(after / 1024, 1),
            "still_running": alive}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ack-flood-") as tmp:
        for mode in ("baseline", "3.1.1", "3.1.1+broker", "5"):
            r = await one(mode, args.mib, Path(tmp) / mode.replace("+", "-"))
            print(f"{r['mode']:<13} peak RSS {r['peak_rss_before_mib']:>6} MiB before, "
                  f"{r['peak_rss_after_mib']:>6} MiB after one {args.mib} MiB ack-topic message"
                  f"{'' if r['still_running'] else ' (daemon died)'}")


if __name__ == "__main__":
    os.umask(0o077)
    asyncio.run(main())
