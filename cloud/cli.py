"""The `edge-cloud` command. Thin: each subcommand group registers itself from its own module
(`register(subparsers)`, handlers set as `func` returning an exit code); errors become exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cloud import __version__
from cloud.cluster import cli as cluster_cli
from cloud.db import cli as db_cli
from edge.errors import EdgeError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-cloud", description="store-edge cloud: ingest, registry, fleet")
    ap.add_argument("--version", action="version", version=f"store-edge {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    cluster_cli.register(sub)
    db_cli.register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except EdgeError as exc:
        print(f"edge-cloud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
