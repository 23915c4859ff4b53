"""`edge-cloud config`, `cmd`, `consent`, `fleet`: fleet management per downlink-v1 (issue 16).

Options common to the fleet commands: cloud/fleet/context.py. `config set` exits 2 with every
problem's key path when the layer is refused (nothing is signed, stored or published).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import yaml

from cloud.cluster.natsconf import check_id
from cloud.db.errors import DbError
from cloud.fleet.context import Context, add_common, broker_of, cloud_key_of
from cloud.fleet.desired import LayerRow, Target, current, history, set_layer
from cloud.fleet.publish import Publisher


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True)
    p.add_argument("--store", default=None, help="the store layer (with --device: the device layer)")
    p.add_argument("--device", default=None)


def register(sub: Any) -> None:
    _register_config(sub)
    _register_cmd(sub)
    _register_consent(sub)
    _register_fleet(sub)


def _register_config(sub: Any) -> None:
    config = sub.add_parser("config", help="desired configuration layers of the fleet (tenant, store, device)")
    csub = config.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    p = csub.add_parser("set", help="validate FILE.yaml, sign it as the layer's next ver and publish it (retained)")
    add_common(p)
    _target_args(p)
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_config_set)
    p = csub.add_parser("show", help="the current layers a target merges, and their merged view")
    add_common(p, broker=False, key=False)
    _target_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_config_show)
    p = csub.add_parser("history", help="published versions of a layer (--all: of every layer under it)")
    add_common(p, broker=False, key=False)
    _target_args(p)
    p.add_argument("--all", action="store_true", help="also every store and device layer under the target")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_config_history)


def _register_cmd(sub: Any) -> None:
    from cloud.fleet.commands import KNOWN

    cmd = sub.add_parser("cmd", help="signed commands to devices")
    msub = cmd.add_subparsers(dest="cmd_cmd", required=True, metavar="ACTION")
    p = msub.add_parser("send", help="send command NAME to DEVICE (or _all devices of --store / --tenant)")
    add_common(p)
    p.add_argument("device", metavar="DEVICE", help="a device id, or _all with --store and/or --tenant")
    p.add_argument("name", metavar="NAME", choices=KNOWN, help=", ".join(KNOWN))
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="arguments, e.g. level=debug for=10m")
    p.add_argument("--args", dest="args_json", default=None, metavar="JSON", help="arguments as a JSON object")
    p.add_argument("--tenant", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--ttl", default="10m", help="the device must not run it after this long (default 10m)")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait this long for the results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_send)


def _register_consent(sub: Any) -> None:
    consent = sub.add_parser("consent", help="consent of a tenant's customers (256 signed, retained shards)")
    nsub = consent.add_subparsers(dest="consent_cmd", required=True, metavar="ACTION")
    for action, text in (("grant", "add the file's customers to the consented"),
                         ("revoke", "withdraw consent and erase their stored events")):
        p = nsub.add_parser(action, help=text + " (FILE: lines of loyalty numbers or stable pseudonyms)")
        add_common(p)
        p.add_argument("--tenant", required=True)
        p.add_argument("--tenant-keys", type=Path, default=None, metavar="DIR",
                       help="folder holding TENANT/tenant.key ($EDGE_CLOUD_TENANT_KEYS; --dir: DIR/tenants)")
        p.add_argument("file", type=Path, metavar="FILE")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_consent, action=action)


def _register_fleet(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="the fleet view")
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True, metavar="ACTION")
    p = fsub.add_parser("status", help="one row per registered device: online, version, layers, apply, backlog")
    add_common(p, broker=False, key=False)
    p.add_argument("--tenant", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--problems", action="store_true",
                   help="only devices offline, rolled back, rejected, or with unsent events older than --stale")
    p.add_argument("--stale", default="1h", help="oldest unsent event age that counts as a problem (default 1h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_fleet_status)


def target_of(args: argparse.Namespace) -> Target:
    if args.device is not None and args.store is None:
        raise DbError("--device needs --store", hint="a device layer is addressed by tenant, store and device")
    check_id("tenant", args.tenant)
    for kind in ("store", "device"):
        if getattr(args, kind) is not None:
            check_id(kind, getattr(args, kind))
    return Target(args.tenant, args.store, args.device)


def _config_set(args: argparse.Namespace) -> int:
    from cloud.fleet.layers import load_layer

    target = target_of(args)
    config = load_layer(args.file)  # ConfigError: exit 2 with every key path (cloud/cli.py)
    ctx, key, broker = Context.of(args), cloud_key_of(args), broker_of(args)

    async def run() -> LayerRow:
        async with await ctx.connect() as conn, Publisher(broker) as pub:
            return await set_layer(conn, pub, key, ctx.actor, target, config)

    row = asyncio.run(run())
    if args.json:
        print(json.dumps(row.as_json()))
    else:
        print(f"{row.target.layer} layer {row.target}: ver {row.ver}, hash {row.config_hash}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    target, ctx = target_of(args), Context.of(args)

    async def run() -> tuple[list[LayerRow], dict[str, Any]]:
        async with await ctx.connect() as conn:
            return await current(conn, target)

    rows, merged = asyncio.run(run())
    if args.json:
        print(json.dumps({"target": str(target), "layers": [r.as_json() for r in rows], "merged": merged}))
        return 0
    if not rows:
        print(f"{target}: no layer published")
    for r in rows:
        print(f"{r.target.layer:<6} {r.target}  ver {r.ver}  hash {r.config_hash}  by {r.created_by}"
              f"  {r.created_at:%Y-%m-%d %H:%M}")
    print("merged (over each device's local file):")
    print(yaml.safe_dump(merged, sort_keys=True, default_flow_style=False).rstrip() if merged else "  {}")
    return 0


def _config_history(args: argparse.Namespace) -> int:
    target, ctx = target_of(args), Context.of(args)

    async def run() -> list[LayerRow]:
        async with await ctx.connect() as conn:
            return await history(conn, target, below=args.all, limit=args.limit)

    rows = asyncio.run(run())
    if args.json:
        print(json.dumps([r.as_json() for r in rows]))
        return 0
    for r in rows:
        state = "published" if r.published_at else "NOT published"
        print(f"{r.created_at:%Y-%m-%d %H:%M:%S}  {r.target.layer:<6} {r.target}  ver {r.ver}  hash {r.config_hash}"
              f"  by {r.created_by}  {state}")
    if not rows:
        print(f"{target}: no layer stored")
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    from cloud.fleet.commands import Sent, collect, fetch, parse_args, send, subscribe_results, targets
    from edge.units import parse_duration

    cargs = parse_args(args.pairs, args.args_json, args.name)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise DbError(f"--ttl {args.ttl!r}: {exc}") from None
    ctx, key, broker = Context.of(args), cloud_key_of(args), broker_of(args)

    async def run() -> list[Sent]:
        async with await ctx.connect() as conn:
            to = await targets(conn, args.tenant, args.store, args.device)
            async with Publisher(broker) as pub:
                if args.wait is not None:
                    await subscribe_results(pub, to)
                sent = await send(conn, pub, key, ctx.actor, to, args.name, cargs, ttl)
                if args.wait is not None:
                    return await collect(conn, pub, sent, args.wait)
            return await fetch(conn, sent)

    done = asyncio.run(run())
    if args.json:
        print(json.dumps([s.as_json() for s in done]))
    for s in done if not args.json else []:
        line = f"{'/'.join(s.ids)}  {s.name}  {s.id}  {s.state}"
        if s.state == "ok":
            line += "  " + json.dumps(s.result, sort_keys=True)[:400]
        elif s.state == "error":
            line += f"  {s.error}: {s.detail}"
        print(line)
    want = {"ok"} if args.wait is not None else {"sent", "ok", "error"}
    return 0 if all(s.state in want for s in done) else 1


def _consent(args: argparse.Namespace) -> int:
    from cloud.fleet.consent import Outcome, change, read_pseudonyms, tenant_key

    check_id("tenant", args.tenant)
    keys = args.tenant_keys or (Path(os.environ["EDGE_CLOUD_TENANT_KEYS"]) if os.environ.get("EDGE_CLOUD_TENANT_KEYS")
                                else args.dir / "tenants" if args.dir is not None else None)
    if keys is None:
        raise DbError("no tenant keys given", hint="pass --tenant-keys DIR (holding TENANT/tenant.key)")
    pseudonyms = read_pseudonyms(args.file, tenant_key(keys, args.tenant))  # ConfigError: exit 2, line numbers
    ctx, key, broker = Context.of(args), cloud_key_of(args), broker_of(args)

    async def run() -> Outcome:
        async with await ctx.connect() as conn, Publisher(broker) as pub:
            return await change(conn, pub, key, ctx.actor, args.tenant, args.action, pseudonyms)

    got = asyncio.run(run())
    if args.json:
        print(json.dumps({"changed": got.changed, "unchanged": got.unchanged, "events_erased": got.events_erased,
                          "published": got.published,
                          "shards": [{"shard": c.shard, "rev": c.rev, "members": c.members, "changed": c.changed,
                                      "events_erased": c.events_erased} for c in got.shards]}))
        return 0
    verb = "granted" if args.action == "grant" else "revoked"
    print(f"{args.tenant}: {verb} {got.changed}, unchanged {got.unchanged}"
          + (f", {got.events_erased} stored event(s) erased" if args.action == "revoke" else ""))
    for c in got.shards:
        print(f"  shard {c.shard} rev {c.rev}: {c.members} consented")
    print(f"  published {len(got.published)} shard(s)" + (f": {' '.join(got.published)}" if got.published else ""))
    return 0


def _fleet_status(args: argparse.Namespace) -> int:
    import datetime as dt

    from cloud.fleet.view import DeviceRow, fleet_rows, table
    from edge.units import parse_duration

    try:
        stale = parse_duration(args.stale)
    except ValueError as exc:
        raise DbError(f"--stale {args.stale!r}: {exc}") from None
    ctx = Context.of(args)
    now = dt.datetime.now(dt.UTC)

    async def run() -> list[DeviceRow]:
        async with await ctx.connect() as conn:
            return await fleet_rows(conn, tenant=args.tenant, store=args.store, stale_s=stale, now=now)

    rows = [r for r in asyncio.run(run()) if r.problems or not args.problems]
    if args.json:
        print(json.dumps([r.as_json() for r in rows]))
    elif rows:
        print(table(rows, now))
    else:
        print("no device with a problem" if args.problems else "no registered device")
    return 0
