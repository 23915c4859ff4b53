"""Fault injection from outside the daemon: the uplink, the disk, the database file.

- Uplink: the broker is stopped (connections reset: the daemon sees it at once) or paused
  with SIGSTOP (`stall`: TCP still accepts, nothing answers, as with a dead route; the daemon
  only notices by its ack timeout and keepalive). A network namespace would cut the daemon
  alone, but the simulated peers (nfcpy's udp transport, the session D-Bus) live on the
  host's loopback, so the rig cuts at the broker instead.
- Disk: the state dir is a size-limited tmpfs mounted by the rig (it runs as root); "nearly
  full" is a ballast file that leaves `leave` bytes free. Without mount rights the scenario's
  buffer is squeezed to `buffer.max_bytes` = 1 MiB instead, and the report says so.
- Database: after a power cut the WAL is checkpointed into the file (so the damage is not
  hidden behind newer WAL frames), then pages in its middle are overwritten with noise, or
  the whole file is replaced by noise.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
from pathlib import Path

from hil.peers.mosquitto import Mosquitto

BALLAST = ".hil-ballast"
PAGE = 4096


class Uplink:
    """Down/up of the broker the daemon (and the receiver) talk to."""

    def __init__(self, broker: Mosquitto) -> None:
        self._broker = broker
        self._paused = False
        self.down = False

    def cut(self, how: str) -> None:
        if self.down:
            return
        if how == "stall":
            self._broker.pause()
            self._paused = True
        else:
            self._broker.stop()
        self.down = True

    def restore(self) -> None:
        if not self.down:
            return
        if self._paused:
            self._broker.resume()
            self._paused = False
        else:
            self._broker.start()
        self.down = False


class Disk:
    """A small tmpfs for the state dir, and a ballast file to fill it."""

    def __init__(self, mountpoint: Path, size: int) -> None:
        self.mountpoint = mountpoint
        self.size = size
        self.mounted = False
        self.problem: str | None = None

    def mount(self) -> bool:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.problem = "not root: cannot mount a tmpfs"
            return False
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "hil-state", str(self.mountpoint)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            self.problem = f"mount failed: {proc.stderr.strip() or proc.returncode}"
            return False
        self.mounted = True
        return True

    def free_bytes(self) -> int:
        st = os.statvfs(self.mountpoint)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> int:
        """Grow the ballast until about `leave` bytes are free; returns the ballast size."""
        path = self.mountpoint / BALLAST
        with path.open("ab") as fh:
            chunk = b"\0" * (256 * 1024)
            while (room := self.free_bytes() - leave) > 0:
                try:
                    fh.write(chunk[: min(len(chunk), room)])
                    fh.flush()
                except OSError:
                    break
        return path.stat().st_size

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.mountpoint / BALLAST).unlink()

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)
            self.mounted = False


def corrupt_database(db: Path, how: str, pages: int, seed: int = 7) -> str:
    """Damage a (closed) buffer database; returns what was done, for the report."""
    rng = random.Random(seed)
    if how == "garbage":
        for side in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                db.with_name(db.name + side).unlink()
        db.write_bytes(rng.randbytes(max(PAGE * 4, db.stat().st_size if db.exists() else 0)))
        return "whole file replaced by noise"
    if not db.exists():
        return "no database to corrupt"
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    total = db.stat().st_size // PAGE
    if total < 4:
        return f"database too small to corrupt ({total} pages)"
    n = min(pages, total - 2)
    first = max(1, total // 2 - n // 2)
    with db.open("r+b") as fh:
        for p in range(first, first + n):
            fh.seek(p * PAGE)
            fh.write(rng.randbytes(PAGE))
        fh.flush()
        os.fsync(fh.fileno())
    return f"pages {first}-{first + n - 1} of {total} overwritten with noise"
