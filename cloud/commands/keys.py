"""`edge-cloud keys create --out FILE [--force]` and `edge-cloud keys show --key FILE`: the cloud key.

`edge-cloud keys migrate --keys-dir DIR --tenant T --store S`: move device keys of the old flat
layout (`DIR/<device>.pub`) to `DIR/T/S/<device>.pub`, where the receiver looks for them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the cloud's Ed25519 key that signs every ack: create, show")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    p = ksub.add_parser("create", help="make the cloud private key (mode 0600) and print its public key and kid")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (64 hex chars)")
    p.add_argument("--force", action="store_true", help="replace an existing key (devices must then be updated)")
    p.add_argument("--json", action="store_true", help="print {public_key, kid} as JSON")
    p.set_defaults(func=create)
    p = ksub.add_parser("show", help="print the public key (for uplink.cloud_public_key) and kid of a key file")
    p.add_argument("--key", required=True, metavar="FILE", help="the cloud private key file")
    p.add_argument("--json", action="store_true", help="print {public_key, kid} as JSON")
    p.set_defaults(func=show)
    p = ksub.add_parser("migrate", help="move device keys of the old flat layout (<device>.pub) to <tenant>/<store>/")
    p.add_argument("--keys-dir", required=True, metavar="DIR", help="the receiver's keys_dir")
    p.add_argument("--tenant", required=True, help="the tenant of the devices whose keys are flat")
    p.add_argument("--store", required=True, help="the store of the devices whose keys are flat")
    p.set_defaults(func=migrate)


def _print(pub: str, kid: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"public_key": pub, "kid": kid}))
    else:
        print(f"public_key  {pub}\nkid         {kid}")
        print(f"devices: set uplink.cloud_public_key: {pub}")


def create(args: argparse.Namespace) -> int:
    from cloud.keys import KeyExistsError, create_cloud_key

    try:
        _, info = create_cloud_key(Path(args.out), force=args.force)
    except KeyExistsError as exc:
        print(f"edge-cloud keys create: {exc}", file=sys.stderr)
        return 2
    print(f"created the cloud key {args.out} (mode 0600; keep it secret, back it up)", file=sys.stderr)
    _print(info.public_key, info.kid, as_json=args.json)
    return 0


def show(args: argparse.Namespace) -> int:
    from cloud.keys import load_cloud_key, public_info

    info = public_info(load_cloud_key(Path(args.key)))
    _print(info.public_key, info.kid, as_json=args.json)
    return 0


def migrate(args: argparse.Namespace) -> int:
    """0 when every flat key moved (or there was none), 1 when some stayed, 2 on a bad tenant/store/dir."""
    from cloud.identity import migrate_flat_keys

    keys_dir = Path(args.keys_dir)
    if not keys_dir.is_dir():
        print(f"edge-cloud keys migrate: {keys_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        moved, problems = migrate_flat_keys(keys_dir, args.tenant, args.store)
    except ValueError as exc:
        print(f"edge-cloud keys migrate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-cloud keys migrate: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in moved:
        print(f"moved to {path}")
    for p in problems:
        print(f"edge-cloud keys migrate: {p}", file=sys.stderr)
    print(f"{len(moved)} key(s) moved, {len(problems)} left in place")
    return 1 if problems else 0
