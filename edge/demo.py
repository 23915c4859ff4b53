"""`edge demo`: a whole simulated store end to end, on a fresh machine, verified.

simulated BLE/NFC/POS -> privacy -> durable buffer -> signed uplink -> MQTT broker
(embedded amqtt unless --broker) -> reference receiver (verifies every batch, signs acks).

Known raw identifiers are injected through every simulated device; at the end the state
folder (SQLite files including -wal, logs, the receiver's store and output) is searched for
them in every encoding. The summary is what the receiver verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud.config import ReceiverConfig
from cloud.receiver import Receiver
from drivers.base import SimOptions
from drivers.registry import build_drivers
from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.coredump import disable_core_dumps
from edge.events import IdentClass
from edge.leakscan import Needle, needles_for, scan
from edge.logs import configure_logging
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.service import Uplink, uplink_component

TENANT, STORE, DEVICE = "demo", "store-001", "edge-demo"

# raw identifiers injected through the simulated devices; none may survive anywhere
INJECTED: tuple[tuple[IdentClass, str], ...] = (
    ("ble_address", "5C:F3:70:8B:21:D4"),  # fictional: a probe for the leak scan, not a real device
    ("nfc_uid", "04A1B2C3D4E5F6"),
    ("loyalty_id", "927364518203"),
    ("card_number", "4539 1488 0343 6467"),
    ("email", "jane.doe@example.com"),
    ("phone", "+49 30 9876543"),
)


def _device_config(root: Path, broker: str, cloud_pub: str, rate: float) -> Config:
    sim = {"rate": rate, "seed": 42}
    return Config.model_validate({
        "identity": {"tenant": TENANT, "store": STORE, "device": DEVICE},
        "paths": {"state_dir": str(root / "device"), "keys_dir": str(root / "device" / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {
            "broker": broker, "cloud_public_key": cloud_pub, "window": 8,
            "batch": {"max_events": 500, "linger": "100ms"}, "ack_timeout": "5s",
            "reconnect": {"initial": "200ms", "max": "5s"},
        },
        "drivers": {
            "ble": {"sim": sim},
            "nfc": {"sim": {"rate": max(0.2, rate / 10), "seed": 43}},
            "pos": [
                {"name": "till-1", "sim": {"rate": max(0.1, rate / 20), "seed": 44}},
                {"name": "till-2", "sim": {"rate": max(0.1, rate / 20), "seed": 45}},
            ],
        },
        "health": {"drain_timeout": "10s"},
        "logging": {"level": "info", "format": "json"},
    })


def _needles() -> list[Needle]:
    out: list[Needle] = []
    for cls, raw in INJECTED:
        out.extend(needles_for(cls, raw))
    return out


async def run_demo(
    root: Path, *, duration: float, broker: str | None, rate: float, clock: Clock | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    clock = clock or SystemClock()
    (root / "device").mkdir(parents=True, exist_ok=True)
    recv_dir = root / "receiver"
    (recv_dir / "keys" / TENANT / STORE).mkdir(parents=True, exist_ok=True)
    log_file = (root / "edge.log").open("a", encoding="utf-8")
    configure_logging("info", "json", log_file)
    try:
        cloud = Ed25519PrivateKey.generate()
        (recv_dir / "cloud.key").write_text(cloud.private_bytes_raw().hex())
        os.chmod(recv_dir / "cloud.key", 0o600)
        cloud_pub = cloud.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        async with contextlib.AsyncExitStack() as stack:
            url = broker
            if url is None:
                from edge.uplink.broker import EmbeddedBroker

                url = (await stack.enter_async_context(EmbeddedBroker())).url
            cfg = _device_config(root, url, cloud_pub, rate)
            keys = KeyStore(cfg.paths.keys_dir, clock)
            if not keys.exists():
                keys.init()
            (recv_dir / "keys" / TENANT / STORE / f"{DEVICE}.pub").write_text(keys.public_key().hex() + "\n")
            rcfg = ReceiverConfig(
                broker=url, client_id="demo-receiver",
                shared_group=None if broker is None else "edge-demo",  # amqtt has no $share
                keys_dir=recv_dir / "keys", db=recv_dir / "receiver.db",
                out=recv_dir / "events.jsonl", cloud_key=recv_dir / "cloud.key",
            )
            return await _run(root, cfg, rcfg, clock, duration, progress, keys)
    finally:
        log_file.close()


async def _run(  # noqa: PLR0917 - internal helper of run_demo
    root: Path, cfg: Config, rcfg: ReceiverConfig, clock: Clock, duration: float, progress: bool,
    keys: KeyStore,
) -> dict[str, Any]:
    receiver = Receiver(rcfg)
    rstop = asyncio.Event()
    rtask = asyncio.create_task(receiver.run(rstop), name="demo:receiver")
    await asyncio.wait_for(receiver.ready.wait(), 15)
    inject = tuple(f"{cls}:{raw}" for cls, raw in INJECTED)
    sup = Supervisor(
        cfg, clock,
        drivers=lambda c, k: build_drivers(c, k, sim=SimOptions(inject=inject)),
        components=[uplink_component],
    )
    stop = asyncio.Event()
    stask = asyncio.create_task(sup.run(stop), name="demo:supervisor")
    t0 = time.monotonic()
    while sup.runtime is None or not sup.runtime.components:
        if stask.done():
            await stask  # raises the startup error
        await asyncio.sleep(0.05)
    rt = sup.runtime
    up = rt.components[0]
    if not isinstance(up, Uplink):
        raise TypeError("the demo's first component must be the uplink")

    def line(phase: str) -> None:
        if progress:
            print(
                f"\r[{phase:>8}] {time.monotonic() - t0:5.1f}s  generated {rt.buffer.last_committed_id:>7}  "
                f"acked {up.counters['events_acked']:>7}  received {receiver.stats.events:>7}  "
                f"uplink {up.state:<10}", end="", file=sys.stderr, flush=True,
            )

    while time.monotonic() - t0 < duration:
        line("running")
        await asyncio.sleep(0.5)
    generated = await sup.stop_drivers()
    deadline = time.monotonic() + 60
    while up.counters["events_acked"] < generated and time.monotonic() < deadline:
        line("draining")
        await asyncio.sleep(0.2)
    line("done")
    if progress:
        print(file=sys.stderr)
    stop.set()
    await stask
    rstop.set()
    await rtask
    received = _count_received(rcfg.out)
    leaks = scan([root], _needles())
    stats = receiver.stats
    chain_intact = not stats.rejected and stats.gaps == 0 and stats.resets == 0
    return {
        "ok": received["events"] == generated and received["unique"] == generated and chain_intact and not leaks,
        "tenant": TENANT, "store": STORE, "device": DEVICE,
        "kid": keys.kid(), "public_key": keys.public_key().hex(),
        "events_generated": generated,
        "events_received": received["unique"],
        "batches_acked": up.counters["acked"],
        "batches_received": stats.accepted,
        "duplicates_removed": stats.duplicates,
        "rejected": dict(stats.rejected),
        "chain_intact": chain_intact,
        "gaps": stats.gaps,
        "raw_identifiers_found": len(leaks),
        "leaks": [str(f) for f in leaks],
        "latency_ms": received["latency"],
        "by_type": received["by_type"],
        "state_dir": str(root),
    }


def _count_received(out: Path) -> dict[str, Any]:
    ids: set[int] = set()
    n = 0
    lat: list[int] = []
    by_type: dict[str, int] = {}
    if out.exists():
        with out.open(encoding="utf-8") as fh:
            for ln in fh:
                ev = json.loads(ln)
                n += 1
                ids.add(int(ev["id"]))
                by_type[ev["type"]] = by_type.get(ev["type"], 0) + 1
                if "received_ms" in ev:
                    lat.append(int(ev["received_ms"]) - int(ev["ts"]))
    lat.sort()

    def pct(p: float) -> int | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

    return {"events": n, "unique": len(ids), "by_type": by_type, "latency": {"p50": pct(0.5), "p99": pct(0.99)}}


def demo_main(*, duration: float, broker: str | None, summary: str | None, rate: float | None,
              state: str | None) -> int:
    disable_core_dumps()  # the demo's daemon runs in this process (edge/coredump.py)
    root = Path(state) if state else Path(tempfile.mkdtemp(prefix="edge-demo-"))
    print(f"store-edge demo: state in {root}; {duration:g}s of a simulated store", file=sys.stderr)
    result = asyncio.run(run_demo(root, duration=duration, broker=broker, rate=rate or 50.0))
    if summary:
        Path(summary).write_text(json.dumps(result, indent=2) + "\n")
    print(_render(result))
    return 0 if result["ok"] else 1


def _render(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return "\n".join([
        f"{'OK' if r['ok'] else 'FAILED'}: verified by the reference receiver",
        f"  device            {r['tenant']}/{r['store']}/{r['device']}  kid {r['kid']}",
        f"  events generated  {r['events_generated']}",
        f"  events received   {r['events_received']}  (by type: {r['by_type']})",
        f"  batches acked     {r['batches_acked']}  (duplicates removed: {r['duplicates_removed']})",
        f"  chain intact      {r['chain_intact']}  (rejected: {r['rejected'] or 'none'}, gaps: {r['gaps']})",
        f"  raw identifiers   {r['raw_identifiers_found']} found in {r['state_dir']}",
        f"  latency event->receiver  p50 {lat['p50']} ms  p99 {lat['p99']} ms",
    ] + [f"  LEAK {leak}" for leak in r["leaks"]])
