"""`edge-cloud import --config RECEIVER.yaml FILE...`: ingest `edge export --signed` files.

Every batch goes through the receiver's ingest core exactly like a network upload (verified
against the key bound to its identity, deduplicated, chain-checked, stored); the acks it would
have sent are dropped (the device is not listening). Batches the device later sends over the
network are then duplicates, acked ok. Exit 0 when every batch is stored or already stored,
1 when any was refused or deferred, 2 on a config or file problem (a file that is not an export,
or is cut short: the records read before the problem are imported, the message says how many).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

GROUP = 256  # batches per transaction


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="ingest signed batches exported by `edge export --signed` (USB rescue)")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the receiver's YAML config")
    p.add_argument("files", nargs="+", metavar="EXPORT", help="files written by `edge export --signed`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge.daemon import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)  # as the receiver: the store it writes holds pseudonyms
    from cloud.config import load_receiver_config
    from cloud.receiver import Receiver
    from cloud.transport import Inbound
    from edge.errors import StartupError
    from edge.logs import configure_logging
    from edge.uplink.rescue import read_records

    cfg = load_receiver_config(args.config)
    configure_logging(cfg.logging.level, cfg.logging.format, sys.stderr)
    receiver = Receiver(cfg)
    try:
        receiver.open()
    except StartupError as exc:
        print(f"edge-cloud import: {exc}", file=sys.stderr)
        return 2
    bad_files = 0
    try:
        for name in args.files:
            group: list[Inbound] = []
            records = 0
            try:
                with Path(name).open("rb") as fh:
                    for topic, payload in read_records(fh, max_payload=cfg.limits.max_payload):
                        group.append(Inbound(topic, payload))
                        records += 1
                        if len(group) >= GROUP:
                            receiver.process(group)
                            group = []
            except (OSError, ValueError) as exc:
                bad_files += 1
                print(f"edge-cloud import: {name}: {getattr(exc, 'strerror', None) or exc}"
                      f"{f' after {records} record(s), which are imported' if records else ''}",
                      file=sys.stderr)  # fmt: skip
            if group:  # what was read before a problem is imported all the same
                receiver.process(group)
    finally:
        receiver.close()
    s = receiver.stats
    refused = sum(s.rejected.values()) + s.deferred
    print(f"imported: {s.accepted} batches stored ({s.events} events), {s.duplicates} already stored, "
          f"{refused} refused {s.rejected or ''}{f' ({s.deferred} deferred)' if s.deferred else ''}")  # fmt: skip
    if bad_files:
        return 2
    return 0 if refused == 0 and s.errors == 0 else 1
