"""`edge-cloud receive --config FILE` (and its alias `edge receive`): run the receiver."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

CONFIG_HELP = ("the receiver's YAML config (broker, keys_dir, db, out, cloud_key, batch limits; "
               "see config/receiver.yaml)")  # fmt: skip
DESCRIPTION = ("Receive uplink-v1 batches from the broker, verify each against the key registered for its "
               "topic's identity (keys_dir/<tenant>/<store>/<device>.pub), store them, and answer with acks "
               "signed by cloud_key. Runs until SIGINT/SIGTERM.")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help=CONFIG_HELP)


def register(sub: Any) -> None:
    p = sub.add_parser("receive", help="run the receiver (verify, store, sign acks)", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, *, prog: str = "edge-cloud receive") -> int:
    from cloud.receiver import receive_main
    from edge.daemon import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)  # receiver.db and events.jsonl hold pseudonyms: owner only, whatever started us
    return asyncio.run(receive_main(args.config, prog=prog))
