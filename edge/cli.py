"""The `edge` command. Thin: parse arguments, call one function, turn errors into exit codes.

Exit codes: 0 ok, 1 runtime failure (e.g. a component could not start, verification
failed), 2 usage or configuration problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from edge import __version__
from edge.errors import ConfigError, EdgeError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="PATH", help="the device's YAML config")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge", description="store-edge: edge runtime for in-store IoT")
    ap.add_argument("--version", action="version", version=f"store-edge {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    _add_config(p)

    p = sub.add_parser("check-config", help="validate a config file and every start-up check that needs no network")
    p.add_argument("path", metavar="PATH", nargs="?", help="the device's YAML config (or --config PATH)")
    p.add_argument("--config", "-c", dest="config", metavar="PATH", help="the device's YAML config")

    keys = sub.add_parser("keys", help="device keys: init, show, rotate")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    p = ksub.add_parser("init", help="create the signing key and pseudonymization keys")
    _add_config(p)
    p.add_argument("--force", action="store_true", help="overwrite existing keys (old pseudonyms unlinkable)")
    p = ksub.add_parser("show", help="print the public key and its kid (never a secret)")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print a JSON object {kid, public_key}")
    p = ksub.add_parser("rotate", help="rotate the ephemeral pseudonymization key now")
    _add_config(p)

    p = sub.add_parser("enroll", help="register this device with the cloud using a one-time token; pin the cloud keys",
                       description="Send a downlink-v1 enrollment request with the device key (created when "
                       "missing) over the config's broker and uplink.auth, wait for the signed answer, and pin "
                       "the cloud keys in the state folder (cloud_keys.json). Exit 0 enrolled, 1 refused or no "
                       "answer, 2 bad usage or config.")  # fmt: skip
    _add_config(p)
    p.add_argument("--token", required=True, metavar="TOKEN",
                   help="the one-time token {token_id}.{secret} (edge-cloud tokens create prints it)")
    p.add_argument("--timeout", default="120s", metavar="DURATION",
                   help="how long to repeat the request and wait for the answer (default 120s)")

    p = sub.add_parser("status", help="backlog, drops, last ack, driver states (works while running)")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print the whole status as one JSON document")

    p = sub.add_parser("export", help="write buffered events as JSON lines (rescue by USB stick)")
    _add_config(p)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to write (its folder must exist; written as FILE.partial, then renamed)")
    p.add_argument("--signed", action="store_true",
                   help="write the sealed, signed uplink-v1 batches instead (edge-cloud import reads them)")

    from cloud.commands.receive import DESCRIPTION, add_arguments

    p = sub.add_parser("receive", help="run the receiver (alias of edge-cloud receive)", description=DESCRIPTION)
    add_arguments(p)

    p = sub.add_parser("verify", help="verify captured batch payloads offline")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--keys", required=True, metavar="DIR",
                   help="the receiver's device keys folder: DIR/<tenant>/<store>/<device>.pub "
                   "(64 hex chars each); a key verifies only its own device's batches")

    p = sub.add_parser("demo", help="a whole simulated store end to end, with an embedded broker")
    p.add_argument("--duration", type=float, default=20.0, metavar="SECONDS",
                   help="how long the simulated store produces readings before the drain (default 20)")
    p.add_argument("--broker", default=None, metavar="URL", help="use this broker instead of the embedded one")
    p.add_argument("--summary", default=None, metavar="FILE", help="write the verified summary as JSON")
    p.add_argument("--rate", type=float, default=None, metavar="N", help="readings per second per device kind")
    p.add_argument("--state", default=None, metavar="DIR", help="state folder (default: a fresh temporary one)")

    _add_install(sub)
    return ap


def _add_install(sub: Any) -> None:
    """`edge install --systemd` and `edge uninstall` (edge/install.py)."""
    p = sub.add_parser("install", help="install as a hardened systemd service (user, venv, config, keys, unit)")
    p.add_argument("--systemd", action="store_true", required=True, help="as a systemd service (the only mode)")
    p.add_argument("--root", metavar="DIR", help="install everything under DIR; touch nothing else")
    p.add_argument("--from", dest="from_spec", metavar="SPEC", help="what pip installs (default: --source)")
    p.add_argument("--source", metavar="DIR", help="store-edge checkout with systemd/ and config/")
    p.add_argument("--no-deps", action="store_true", help="pip --no-deps (dependencies provided otherwise)")
    p.add_argument("--wheelhouse", metavar="DIR", help="install offline from this folder of wheels")
    p.add_argument("--config", metavar="FILE", help="a prepared config for /etc/store-edge/store.yaml")
    p.add_argument("--tenant", help="identity for a config made from config/store.yaml")
    p.add_argument("--store", help="identity for a config made from config/store.yaml")
    p.add_argument("--device", help="identity for a config made from config/store.yaml")
    p.add_argument("--keep-config", action="store_true",
                   help="keep an existing store.yaml even when its identity differs from --tenant/--store/--device")
    p.add_argument("--tenant-key", metavar="FILE", help="provision the tenant key (32 bytes or 64 hex)")
    p.add_argument("--cloud-public-key", metavar="HEX",
                   help="the cloud public key (64 hex, edge-cloud keys create prints it) for a template config")
    p.add_argument("--python", metavar="PATH", help="interpreter for the venv (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done")

    p = sub.add_parser("uninstall", help="remove the service (config, buffer and keys stay unless --purge)")
    p.add_argument("--root", metavar="DIR", help="uninstall from under DIR")
    p.add_argument("--purge", action="store_true", help="also delete config, buffer and keys")
    p.add_argument("--dry-run", action="store_true", help="print what would be done")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {exc.path}", file=sys.stderr)
        return 2
    except EdgeError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:  # noqa: PLR0911 - one branch per command
    cmd = args.cmd
    if cmd == "check-config":
        from edge.configload import check_config_main

        if (args.path is None) == (args.config is None):
            print("edge check-config: give the config file once, as PATH or --config PATH", file=sys.stderr)
            return 2
        return check_config_main(args.path or args.config)
    if cmd == "run":
        from edge.daemon import run_main

        return run_main(args.config)
    if cmd == "keys":
        return _keys(args)
    if cmd == "enroll":
        from edge.enroll import enroll_main

        return enroll_main(args.config, args.token, args.timeout)
    if cmd == "status":
        from edge.status import status_main

        return status_main(args.config, as_json=args.json)
    if cmd == "export" and args.signed:
        from edge.uplink.rescue import export_signed_main

        return export_signed_main(args.config, args.out)
    if cmd == "export":
        from edge.status import export_main

        return export_main(args.config, args.out)
    if cmd == "receive":
        from cloud.commands.receive import run

        return run(args, prog="edge receive")
    if cmd == "verify":
        from pathlib import Path

        from edge.uplink.verify import verify_files

        return verify_files(args.files, Path(args.keys))
    if cmd == "demo":
        from edge.demo import demo_main

        return demo_main(
            duration=args.duration, broker=args.broker, summary=args.summary, rate=args.rate, state=args.state
        )
    if cmd in ("install", "uninstall"):
        from edge.install import install_main, uninstall_main

        return install_main(args) if cmd == "install" else uninstall_main(args)
    raise AssertionError(cmd)  # argparse rejects unknown commands


def _keys(args: argparse.Namespace) -> int:
    from edge.clock import SystemClock
    from edge.configload import load_config
    from edge.errors import KeyError_
    from edge.privacy.keys import KeyStore

    cfg = load_config(args.config, trust=False)  # keys can be made before the cloud key is known
    keys = KeyStore(cfg.paths.keys_dir, SystemClock())
    if args.keys_cmd == "init":
        try:
            keys.init(force=args.force)
        except KeyError_ as exc:  # keys exist (no --force) or cannot be written: the operator decides
            print(f"edge: {exc}", file=sys.stderr)
            return 2
        print(f"created keys in {cfg.paths.keys_dir}; kid {keys.kid()}")
        print(f"public key {keys.public_key().hex()}")
        return 0
    if args.keys_cmd == "show":
        if not keys.exists():
            print(f"edge: no keys in {cfg.paths.keys_dir} (hint: edge keys init --config {args.config})",
                  file=sys.stderr)
            return 1
        doc = {"kid": keys.kid(), "public_key": keys.public_key().hex()}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"kid         {doc['kid']}\npublic_key  {doc['public_key']}")
        return 0
    if args.keys_cmd == "rotate":
        epoch = keys.rotate()
        print(f"ephemeral pseudonymization key rotated; epoch {epoch}; the previous key is deleted")
        return 0
    raise AssertionError(args.keys_cmd)


if __name__ == "__main__":
    sys.exit(main())
