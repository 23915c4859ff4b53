"""`edge-cloud fleet-demo --dir DIR --stores N [--events M]`: simulated stores, checked from PostgreSQL."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Start the local cloud in DIR (edge-cloud up: 3 NATS nodes, PostgreSQL) with MQTT credentials for "
    "the stores demo/store-0001..N, start 2 ingest workers, run N simulated stores on the real uplink "
    "(each with its store's credentials and its key in the device registry), and check from "
    "PostgreSQL: every event sent is stored, no duplicate, every chain intact, no raw identifier. "
    "Exit 0 only if all hold. The workers stop at the end; the cluster keeps running "
    "(edge-cloud down --dir DIR stops it)."
)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def register(sub: Any) -> None:
    p = sub.add_parser("fleet-demo", help="N simulated stores on a local cloud, checked from PostgreSQL",
                       description=DESCRIPTION)  # fmt: skip
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="the local cloud's folder (edge-cloud up)")
    p.add_argument("--stores", required=True, type=_positive_int, metavar="N",
                   help="simulated stores (one device each)")
    p.add_argument("--events", type=_positive_int, default=1000, metavar="M", help="events per store (default 1000)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up on the fleet after S s")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud.fleetdemo import format_summary, run_demo
    from edge.logs import configure_logging

    configure_logging("warning", "console", sys.stderr)
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    summary = run_demo(args.dir, stores=args.stores, events=args.events, timeout=args.timeout, say=say)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(format_summary(summary, args.dir))
    return 0 if summary.ok else 1
