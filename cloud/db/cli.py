"""`edge-cloud db migrate`, `edge-cloud tokens create`, `edge-cloud devices list|add|revoke`.

Every command reaches PostgreSQL through `--dsn`, `$EDGE_CLOUD_DSN`, or `--dir` of a local cloud
(`edge-cloud up`), which also names its token key.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import psycopg

from cloud.db.errors import DbError
from edge.units import parse_duration


def _add_dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", default=None, help="postgresql://user:password@host:port/db (or $EDGE_CLOUD_DSN)")
    p.add_argument("--dir", type=Path, default=None, help="folder of a local cloud (edge-cloud up)")


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database schema")
    dsub = db.add_subparsers(dest="db_cmd", required=True, metavar="ACTION")
    p = dsub.add_parser("migrate", help="apply pending schema migrations (idempotent)")
    _add_dsn(p)
    p.set_defaults(func=_migrate)

    tokens = sub.add_parser("tokens", help="one-time enrollment tokens")
    tsub = tokens.add_subparsers(dest="tokens_cmd", required=True, metavar="ACTION")
    p = tsub.add_parser("create", help="print a one-time token {token_id}.{secret} for one store")
    _add_dsn(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--ttl", default="7d", help="validity, e.g. 30m, 12h, 7d (default 7d)")
    p.add_argument("--token-key", type=Path, default=None, help="the key file sealing token secrets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_token_create)

    devices = sub.add_parser("devices", help="the device registry")
    vsub = devices.add_subparsers(dest="devices_cmd", required=True, metavar="ACTION")
    p = vsub.add_parser("list", help="registered device keys")
    _add_dsn(p)
    p.add_argument("--tenant")
    p.add_argument("--store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_devices_list)
    p = vsub.add_parser("add", help="register a device's public key by hand (instead of enrollment)")
    _add_dsn(p)
    for name in ("--tenant", "--store", "--device"):
        p.add_argument(name, required=True)
    p.add_argument("--public-key", required=True, metavar="HEX", help="64 hex characters (edge keys show)")
    p.set_defaults(func=_devices_add)
    p = vsub.add_parser("revoke", help="revoke a device's keys: its batches are refused unknown-key")
    _add_dsn(p)
    for name in ("--tenant", "--store", "--device"):
        p.add_argument(name, required=True)
    p.add_argument("--kid", default=None, help="only this key (default: every active key of the device)")
    p.set_defaults(func=_devices_revoke)


def _local(args: argparse.Namespace) -> Any:
    from cloud.cluster.local import LocalCloud, State

    state = State.load(args.dir.resolve())
    if state is None:
        raise DbError(f"no local cloud in {args.dir}", hint="run edge-cloud up --dir DIR first")
    return LocalCloud(args.dir.resolve(), state)


def dsn_of(args: argparse.Namespace) -> str:
    if args.dsn:
        return str(args.dsn)
    if args.dir is not None:
        return str(_local(args).postgres().dsn)
    env = os.environ.get("EDGE_CLOUD_DSN")
    if env:
        return env
    raise DbError("no database given", hint="pass --dsn, --dir of a local cloud, or set $EDGE_CLOUD_DSN")


def _connect(args: argparse.Namespace) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(dsn_of(args), connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DbError(f"cannot connect to PostgreSQL: {exc}".strip(),
                      hint="check --dsn and that the server runs") from None


def _migrate(args: argparse.Namespace) -> int:
    from cloud.db.migrate import migrate

    done = migrate(dsn_of(args))
    for m in done:
        print(f"applied {m.version:04d}_{m.name}")
    if not done:
        print("schema up to date")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from cloud.db.tokens import TokenKey, create_token

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise DbError(f"--ttl {args.ttl!r}: {exc}") from None
    key_path = args.token_key or (Path(os.environ["EDGE_CLOUD_TOKEN_KEY"]) if "EDGE_CLOUD_TOKEN_KEY" in os.environ
                                  else _local(args).token_key_path if args.dir is not None else None)
    if key_path is None:
        raise DbError("no token key given", hint="pass --token-key FILE, --dir, or set $EDGE_CLOUD_TOKEN_KEY")
    key = TokenKey.load(key_path)
    with _connect(args) as conn:
        token = create_token(conn, key, tenant=args.tenant, store=args.store, ttl=ttl)
    if args.json:
        print(json.dumps({"token": token.text, "token_id": token.token_id, "tenant": token.tenant,
                          "store": token.store, "expires_at": token.expires_at.isoformat()}))
    else:
        print(token.text)
    return 0


def _devices_list(args: argparse.Namespace) -> int:
    from cloud.db.registry import list_devices

    with _connect(args) as conn:
        devices = list_devices(conn, tenant=args.tenant, store=args.store)
    if args.json:
        print(json.dumps([d.as_json() for d in devices], indent=2))
        return 0
    for d in devices:
        print(f"{d.tenant}/{d.store}/{d.device}  kid {d.kid}  {d.state}  since {d.created_at:%Y-%m-%d %H:%M}")
    if not devices:
        print("no devices")
    return 0


def _devices_add(args: argparse.Namespace) -> int:
    from cloud.db.registry import add_device, parse_public_key

    with _connect(args) as conn:
        d = add_device(conn, tenant=args.tenant, store=args.store, device=args.device,
                       public_key=parse_public_key(args.public_key))
    print(f"{d.tenant}/{d.store}/{d.device}  kid {d.kid}  {d.state}")
    return 0


def _devices_revoke(args: argparse.Namespace) -> int:
    from cloud.db.registry import revoke_device

    with _connect(args) as conn:
        revoked = revoke_device(conn, tenant=args.tenant, store=args.store, device=args.device, kid=args.kid)
    if not revoked:
        print(f"{args.tenant}/{args.store}/{args.device}: no active key to revoke")
        return 1
    for d in revoked:
        print(f"revoked {d.tenant}/{d.store}/{d.device}  kid {d.kid}")
    return 0
