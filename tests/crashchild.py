"""Crash-test child for tests/test_buffer_crash.py: ingest flat out, report every commit.

Usage: python tests/crashchild.py STATE_DIR

Prints `open <last_committed_id> <open report status>` once the buffer is open, then the last
committed id after every commit (from the commit listener), one per line, flushed: a line the
parent has read is a promise that the events up to that id are durable.
"""

from __future__ import annotations

import asyncio
import sys
import time

import structlog

from edge.buffer import Buffer
from edge.clock import SystemClock
from edge.config import Config
from edge.events import Pending, Source

SOURCES: tuple[Source, ...] = ("ble", "ble", "ble", "pos", "nfc")


async def main(state_dir: str) -> None:
    cfg = Config.model_validate(
        {
            "identity": {"tenant": "crash", "store": "s1", "device": "d1"},
            "paths": {"state_dir": state_dir, "keys_dir": f"{state_dir}/keys"},
            "buffer": {"max_bytes": "8GiB", "commit_max_events": 200, "commit_interval": "5ms"},
        }
    )
    buf = await Buffer.open(cfg, SystemClock())
    out = sys.stdout
    out.write(f"open {buf.last_committed_id} {buf.open_report.status}\n")
    out.flush()

    def committed(last: int) -> None:
        out.write(f"{last}\n")
        out.flush()

    buf.add_commit_listener(committed)
    i = 0
    while True:
        src = SOURCES[i % len(SOURCES)]
        data = {"p": f"{i:016x}", "rssi": -40 - i % 50, "zone": "entrance"}
        await buf.put(Pending(ts=time.time_ns() // 1_000_000, src=src, type="presence.enter", data=data))
        i += 1


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the protocol
    asyncio.run(main(sys.argv[1]))
