"""What every fleet command needs: PostgreSQL, the broker, the cloud signing key, who acts.

Options (all commands): `--dsn` / `--dir` as the db commands (cloud/db/cli.py); `--broker
mqtt://host:port` (repeatable, or `$EDGE_CLOUD_BROKER` comma-separated; `--dir`: every node of
the local cloud) with `--broker-user` (`$EDGE_CLOUD_BROKER_USER`; `--dir`: admin) and the
password in `$EDGE_CLOUD_BROKER_PASSWORD`; `--cloud-key FILE`
(`$EDGE_CLOUD_KEY`, `--dir`: `DIR/cloud.key`); `--prefix` (`--dir`: the local cloud's);
`--as NAME` the actor written to the audit table (`$EDGE_CLOUD_ACTOR`, else the login name).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.db.cli import dsn_of
from cloud.db.errors import DbError
from cloud.fleet.publish import Broker
from edge.wire.downlink import DEFAULT_PREFIX
from edge.wire.uplink import kid_of, public_raw

AConn = psycopg.AsyncConnection[tuple[Any, ...]]


def add_common(p: argparse.ArgumentParser, *, broker: bool = True, key: bool = True) -> None:
    p.add_argument("--dsn", default=None, help="postgresql://user:password@host:port/db (or $EDGE_CLOUD_DSN)")
    p.add_argument("--dir", type=Path, default=None, help="folder of a local cloud (edge-cloud up)")
    p.add_argument("--as", dest="actor", default=None, help="who acts, for the audit table (default: login name)")
    if broker:
        p.add_argument("--broker", action="append", default=None, metavar="URL",
                       help="mqtt://host:port of a cluster node (repeatable; password in $EDGE_CLOUD_BROKER_PASSWORD)")
        p.add_argument("--broker-user", default=None)
        p.add_argument("--prefix", default=None, help=f"topic prefix (default {DEFAULT_PREFIX})")
    if key:
        p.add_argument("--cloud-key", type=Path, default=None, help="the cloud's signing key (edge-cloud keys create)")


def _local(args: argparse.Namespace) -> Any:
    from cloud.cluster.local import LocalCloud, State

    state = State.load(args.dir.resolve())
    if state is None:
        raise DbError(f"no local cloud in {args.dir}", hint="run edge-cloud up --dir DIR first")
    return LocalCloud(args.dir.resolve(), state)


def actor_of(args: argparse.Namespace) -> str:
    who = args.actor or os.environ.get("EDGE_CLOUD_ACTOR") or getpass.getuser()
    return str(who)[:128]


def prefix_of(args: argparse.Namespace) -> str:
    if getattr(args, "prefix", None):
        return str(args.prefix)
    if args.dir is not None:
        return str(_local(args).state.prefix)
    return DEFAULT_PREFIX


def broker_of(args: argparse.Namespace) -> Broker:
    password = os.environ.get("EDGE_CLOUD_BROKER_PASSWORD")
    user = args.broker_user or os.environ.get("EDGE_CLOUD_BROKER_USER")
    urls: list[str] = list(args.broker or [])
    if not urls and os.environ.get("EDGE_CLOUD_BROKER"):
        urls = [u.strip() for u in os.environ["EDGE_CLOUD_BROKER"].split(",") if u.strip()]
    if not urls and args.dir is not None:
        from cloud.cluster.local import ADMIN

        cloud = _local(args)
        urls = [n.mqtt_url for n in cloud.node_specs]
        user = user or ADMIN
        password = password or cloud.state.passwords[ADMIN]
    if not urls:
        raise DbError("no broker given", hint="pass --broker mqtt://host:port (or --dir of a local cloud)")
    return Broker(urls=urls, user=user, password=password, prefix=prefix_of(args))


def cloud_key_of(args: argparse.Namespace) -> Ed25519PrivateKey:
    from cloud.keys import load_cloud_key

    path = args.cloud_key or (Path(os.environ["EDGE_CLOUD_KEY"]) if os.environ.get("EDGE_CLOUD_KEY") else None)
    if path is None and args.dir is not None:
        path = args.dir / "cloud.key"
    if path is None:
        raise DbError("no cloud key given", hint="pass --cloud-key FILE (edge-cloud keys create --out FILE)")
    return load_cloud_key(Path(path))


def cloud_kid(key: Ed25519PrivateKey) -> str:
    return kid_of(public_raw(key.public_key()))


@dataclass(slots=True, frozen=True)
class Context:
    dsn: str
    actor: str

    @classmethod
    def of(cls, args: argparse.Namespace) -> Context:
        return cls(dsn=dsn_of(args), actor=actor_of(args))

    async def connect(self) -> AConn:
        try:
            return await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise DbError(f"cannot connect to PostgreSQL: {exc}".strip(),
                          hint="check --dsn and that the server runs") from None


async def audit(  # noqa: PLR0917 - the audit row's columns, in order
    conn: AConn, actor: str, action: str, target: str, detail: dict[str, Any], doc_sha256: str | None,
) -> None:
    """One row of the append-only audit table (inside the caller's transaction). `detail` holds
    versions and counts only: never a pseudonym, an identifier or a secret."""
    await conn.execute(
        "INSERT INTO fleet_audit (actor, action, target, detail, doc_sha256) VALUES (%s, %s, %s, %s, %s)",
        (actor, action, target, json.dumps(detail), bytes.fromhex(doc_sha256) if doc_sha256 else None))


def doc_digest(envelope: bytes) -> str:
    """Lowercase hex SHA-256 of a signed envelope's `d` (edge.wire.downlink.Document.digest)."""
    return hashlib.sha256(msgpack.unpackb(envelope, raw=False)["d"]).hexdigest()
