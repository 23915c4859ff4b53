"""`edge-cloud fleet-sim --devices N --events M ...`: N simulated store devices on the real uplink."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Run N simulated store devices in this process, each with the real edge uplink: its own SQLite "
    "buffer, Ed25519 device key, chain and MQTT client. Each device's public key is written to "
    "KEYS_DIR/<tenant>/<store>/<device>.pub (the receiver's keys_dir layout); devices accept only acks "
    "signed by the cloud key. Ends when every event is acked (exit 0) or at --timeout (exit 1), with a "
    "summary: events generated and acked, backlog left per device, time, memory."
)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return x


def register(sub: Any) -> None:
    p = sub.add_parser("fleet-sim", help="simulate N store devices on the real uplink (load and fault tests)",
                       description=DESCRIPTION)  # fmt: skip
    p.add_argument("--devices", required=True, type=_positive_int, metavar="N", help="devices (one per store)")
    p.add_argument("--events", required=True, type=_positive_int, metavar="M", help="events per device")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="mqtt://host:port (default mqtt://127.0.0.1:1883; with --cloud-dir its first node)")
    p.add_argument("--cloud-dir", type=Path, metavar="DIR",
                   help="a local chain cloud (edge-cloud up --dir DIR): adds the simulated stores to it, "
                        "registers the device keys in its PostgreSQL registry and logs each device in with "
                        "its store's MQTT credentials")  # fmt: skip
    p.add_argument("--prefix", default="edge/v1", metavar="P", help="topic prefix (uplink.prefix)")
    p.add_argument("--tenant", default="sim", metavar="T", help="tenant id; stores are store-0001, ...")
    p.add_argument("--state", default=Path("fleet-sim"), type=Path, metavar="DIR",
                   help="device state (buffers, keys), kept across runs (default: ./fleet-sim)")  # fmt: skip
    p.add_argument("--keys-dir", type=Path, metavar="DIR",
                   help="where device public keys are registered (default: STATE/receiver-keys)")  # fmt: skip
    p.add_argument("--rate", type=_positive_float, metavar="R",
                   help="events per second per device (default: all at once)")  # fmt: skip
    p.add_argument("--offline-first", action="store_true",
                   help="buffer every event before any device connects (a reconnect storm)")  # fmt: skip
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--cloud-public-key", metavar="HEX", help="the cloud public key (64 hex)")
    key.add_argument("--cloud-key", type=Path, metavar="FILE",
                     help="the cloud key file (edge-cloud keys create): its public key is used")  # fmt: skip
    p.add_argument("--timeout", type=_positive_float, default=600.0, metavar="S", help="give up after S s")
    p.add_argument("--sync", choices=("normal", "full"), default="normal",
                   help="buffer synchronous mode (default normal: WAL survives a process crash)")  # fmt: skip
    p.add_argument("--init-only", action="store_true",
                   help="create the devices, register their keys, exit (run before the receiver)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _cloud_public(args: argparse.Namespace) -> str:
    from cloud.keys import load_cloud_key, public_info
    from edge.errors import ConfigError

    if args.cloud_key is not None:
        return public_info(load_cloud_key(args.cloud_key)).public_key
    text = str(args.cloud_public_key).strip().lower()
    try:
        ok = len(bytes.fromhex(text)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError("--cloud-public-key", ["--cloud-public-key: expected 64 hex characters"])
    return text


def chain_cloud(cloud_dir: Path, state: Path, tenant: str, devices: int, prefix: str, *,
                broker: str | None = None) -> tuple[str, str, dict[str, tuple[str, Path]]]:  # fmt: skip
    """Add the fleet's stores to the local cloud in `cloud_dir` (starting it if it is down) and write
    each store's MQTT password to `state/credentials/<store>` (0600): (broker, PostgreSQL DSN,
    store -> (user, password file)). `broker` defaults to the cloud's first MQTT listener."""
    import os

    from cloud.cluster.local import up
    from cloud.fleetsim import FleetSpec

    ids = FleetSpec(devices=devices, events=1, broker="", state=state, keys_dir=state, cloud_public_key="",
                    tenant=tenant)  # fmt: skip
    stores = [ids.ids(i)[1] for i in range(1, devices + 1)]
    summary = up(cloud_dir, stores=[f"{tenant}/{s}" for s in stores], prefix=prefix).summary()
    folder = state / "credentials"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    credentials: dict[str, tuple[str, Path]] = {}
    for store in stores:
        login = summary["stores"][f"{tenant}/{store}"]
        path = folder / store
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(str(login["password"]))
        credentials[store] = (str(login["user"]), path)
    return broker or str(summary["mqtt_urls"][0]), str(summary["postgres_dsn"]), credentials


def run(args: argparse.Namespace) -> int:
    from cloud.fleetsim import Fleet, FleetSpec, format_report
    from edge.logs import configure_logging

    configure_logging("warning", "console", sys.stderr)
    broker = args.broker or "mqtt://127.0.0.1:1883"
    registry_dsn: str | None = None
    credentials: dict[str, tuple[str, Path]] | None = None
    if args.cloud_dir is not None:
        broker, registry_dsn, credentials = chain_cloud(args.cloud_dir, args.state, args.tenant, args.devices,
                                                        args.prefix, broker=args.broker)  # fmt: skip
    spec = FleetSpec(
        devices=args.devices, events=args.events, broker=broker, state=args.state,
        keys_dir=args.keys_dir or args.state / "receiver-keys", cloud_public_key=_cloud_public(args),
        prefix=args.prefix, tenant=args.tenant, rate=args.rate, offline_first=args.offline_first,
        timeout=args.timeout, synchronous=args.sync, registry_dsn=registry_dsn, credentials=credentials,
    )  # fmt: skip

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        fleet = Fleet(spec)
        if args.init_only:
            await fleet.open()
            await fleet.close()
            where = "PostgreSQL's registry" if spec.registry_dsn else spec.keys_dir
            print(f"{len(fleet.devices)} device(s) ready in {spec.state}, keys registered in {where}")
            return 0
        report = await fleet.run(stop)
        print(json.dumps(report.as_dict()) if args.json else format_report(report))
        return 0 if report.complete else 1

    code = asyncio.run(main())
    sys.stdout.flush()
    return code
