"""The `edge-cloud` command. Thin: each subcommand group registers itself from its own module.

To add a group, write a module with `register(subparsers)` that adds its parser(s) and sets
`func=` (a callable taking the parsed `argparse.Namespace`, returning the exit code) with
`set_defaults`, and add the module's name to COMMANDS. Exit codes: 0 ok, 1 runtime failure,
2 usage or configuration problem.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

from edge import __version__
from edge.errors import ConfigError, EdgeError

COMMANDS: tuple[str, ...] = (
    "cloud.commands.receive",
    "cloud.commands.ingest",
    "cloud.commands.keys",
    "cloud.commands.importer",
    "cloud.cluster.cli",
    "cloud.db.cli",
    "cloud.commands.fleetsim",
    "cloud.commands.fleetdemo",
    "cloud.commands.report",
    "cloud.fleet.cli",
)


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-cloud", description="store-edge cloud side: ingest, keys")
    ap.add_argument("--version", action="version", version=f"store-edge {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in commands:
        importlib.import_module(name).register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    try:
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {exc.path}", file=sys.stderr)
        return 2
    except EdgeError as exc:
        print(f"edge-cloud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
