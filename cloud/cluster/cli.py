"""`edge-cloud up` and `edge-cloud down`: the local 3-node NATS cluster and PostgreSQL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local 3-node NATS cluster and PostgreSQL in DIR (initdb on first use)")
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="folder for configs, data and logs")
    p.add_argument("--store", action="append", default=[], metavar="TENANT/STORE",
                   help="give this store MQTT credentials (repeatable; kept across runs)")
    p.add_argument("--prefix", default="edge/v1", help="uplink topic prefix (default edge/v1)")
    p.add_argument("--json", action="store_true", help="print the URLs and credentials as JSON")
    p.set_defaults(func=_up)
    p = sub.add_parser("down", help="stop the local cloud in DIR (data kept)")
    p.add_argument("--dir", required=True, type=Path, metavar="DIR")
    p.set_defaults(func=_down)


def _up(args: argparse.Namespace) -> int:
    from cloud.cluster.local import up

    cloud = up(args.dir, stores=args.store, prefix=args.prefix)
    info = cloud.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"NATS        {' '.join(info['nats_urls'])}")
    print(f"MQTT        {' '.join(info['mqtt_urls'])}   (MQTT 3.1.1; topic a/b/c is subject a.b.c)")
    print(f"PostgreSQL  {info['postgres_dsn']}")
    print(f"users       admin / worker: passwords in {cloud.dir / 'cloud.json'}")
    for key, cred in info["stores"].items():
        print(f"store       {key}: MQTT user {cred['user']} password {cred['password']}")
    print(f"token key   {info['token_key']}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from cloud.cluster.local import down

    cloud = down(args.dir)
    print(f"stopped the local cloud in {cloud.dir}" if cloud else f"no local cloud in {args.dir}: nothing to stop")
    return 0
