"""Child for tests/test_downlink_restart.py: the real daemon (`run_daemon`) with one extra component
that hands a signed `cmd` document (read from a file) to the CommandRunner once events flow (20, or 10 s).

Usage: python tests/restartchild.py CONFIG CMD_FILE CLOUD_PUBLIC_HEX

Prints one line per cmd-result (`result <json>`), then `stored <non-edge events in the buffer>
accepted <non-edge events the pipeline accepted>` after the daemon stopped, and exits 75 when the
stop was a requested restart (what `edge run` does), else 0. The clock says it is synchronized
(the sandbox's kernel clock is not; the unsynchronized rules have their own tests).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.clock import SystemClock
from edge.configload import load_config
from edge.daemon import run_daemon
from edge.downlink.commands import CommandRunner
from edge.downlink.wiring import command_deps
from edge.logs import configure_logging
from edge.supervisor import RESTART_EXIT, Runtime
from edge.wire.downlink import verify_document
from edge.wire.uplink import kid_of


class SyncedClock(SystemClock):
    def synchronized(self) -> bool:
        return True


class Feeder:
    name = "cmd-feeder"

    def __init__(self, rt: Runtime, cmd_file: Path, cloud: bytes) -> None:
        self.rt = rt
        self._file = cmd_file
        self._cloud = cloud
        self._task: asyncio.Task[None] | None = None
        self.runner: CommandRunner | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._feed())

    async def _feed(self) -> None:
        rt = self.rt
        for _ in range(500):  # until some events flow (at most 10 s)
            if rt.buffer.last_committed_id >= 20:
                break
            await asyncio.sleep(0.02)
        ident = rt.cfg.identity
        trusted = {kid_of(self._cloud): Ed25519PublicKey.from_public_bytes(self._cloud)}
        topic = f"edge/v1/{ident.tenant}/{ident.store}/{ident.device}/cmd"
        doc = verify_document(self._file.read_bytes(), topic=topic, prefix="edge/v1", trusted=trusted)

        async def publish(topic: str, payload: bytes, qos: int = 1) -> None:
            print("result", payload.decode(), flush=True)

        self.runner = CommandRunner(state_dir=rt.cfg.paths.state_dir, clock=rt.clock, prefix="edge/v1",
                                    identity=(ident.tenant, ident.store, ident.device), publish=publish,
                                    deps=command_deps(rt, status=None, trust=None))
        await self.runner.handle(doc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.runner is not None:
            self.runner.close()

    def status(self) -> dict[str, Any]:
        return {"state": "running"}


def main(config: str, cmd_file: str, cloud_hex: str) -> int:
    cfg = load_config(config)
    configure_logging("info", "json", stream=sys.stderr)
    feeders: list[Feeder] = []

    def factory(rt: Runtime) -> Feeder:
        feeders.append(Feeder(rt, Path(cmd_file), bytes.fromhex(cloud_hex)))
        return feeders[-1]

    restart = asyncio.run(run_daemon(cfg, config, clock=SyncedClock(), extra_components=[factory]))
    accepted = sum(n for src, n in feeders[0].rt.pipeline.accepted.items() if src != "edge")
    with sqlite3.connect(cfg.buffer_path) as db:
        stored = db.execute("SELECT count(*) FROM events WHERE src != 'edge'").fetchone()[0]
    print(f"stored {stored} accepted {accepted}", flush=True)
    return RESTART_EXIT if restart else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
