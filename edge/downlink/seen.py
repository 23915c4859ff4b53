"""What the command runner must remember across restarts: command ids and the last synchronized time.

`commands.db` in the state folder (SQLite, synchronous=FULL, one short transaction per command):

- `seen(id, exp)`: every command id taken for running, kept until its `exp` has passed by a
  synchronized clock (ids are only forgotten while the clock is synchronized: an unsynchronized
  clock that runs ahead must not make the device forget, and so re-run, a command). At most
  `MAX_SEEN` unexpired ids are kept; beyond that a new command is refused (`failed`), never is
  an unexpired id forgotten.
- `meta('sync')`: JSON `[boot id, monotonic ms, wall ms]` of the last moment the clock was seen
  synchronized, for the estimate of now while it is not (downlink-v1 §Commands: last synchronized
  time plus monotonic time since). The monotonic clock restarts with the machine, so the estimate
  is only known in the boot that observed the synchronization.

"Synchronized" is `Clock.synchronized()`: the kernel's NTP status via adjtimex (edge/clock.py),
which systemd-timesyncd, chrony and ntpd all set; tests inject a FakeClock.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge.clock import Clock

SEEN_FILE = "commands.db"
MAX_SEEN = 100_000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY NOT NULL, exp INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY NOT NULL, v TEXT NOT NULL)",
)


class SeenFull(Exception):
    """MAX_SEEN unexpired command ids are remembered already."""


class SeenIds:
    """Remembered command ids and the last synchronized time (blocking calls: run them in a thread)."""

    def __init__(self, state_dir: Path, clock: Clock, boot: str) -> None:
        path = Path(state_dir) / SEEN_FILE
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        for stmt in _SCHEMA:
            self._db.execute(stmt)
        self._clock = clock
        self._boot = boot

    def close(self) -> None:
        self._db.close()

    def take(self, cid: str, exp: int) -> bool:
        """Remember `cid` durably; False when it was remembered already (a replay)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._clock.synchronized():
                db.execute("DELETE FROM seen WHERE exp < ?", (self._clock.wall_ms(),))
            if db.execute("SELECT 1 FROM seen WHERE id = ?", (cid,)).fetchone() is not None:
                db.execute("COMMIT")
                return False
            self._check_room()
            db.execute("INSERT INTO seen (id, exp) VALUES (?, ?)", (cid, exp))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return True

    def _check_room(self) -> None:
        if int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0]) >= MAX_SEEN:
            raise SeenFull(f"{MAX_SEEN} unexpired command ids remembered")

    def remembered(self, cid: str) -> bool:
        return self._db.execute("SELECT 1 FROM seen WHERE id = ?", (cid,)).fetchone() is not None

    def observe(self) -> None:
        """Record now as the last synchronized time if the clock is synchronized."""
        if self._clock.synchronized():
            v = json.dumps([self._boot, int(self._clock.monotonic() * 1000), self._clock.wall_ms()])
            self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('sync', ?)", (v,))

    def estimate_ms(self) -> int | None:
        """Now by the last synchronized time plus monotonic time since; None when unknown."""
        row = self._db.execute("SELECT v FROM meta WHERE k = 'sync'").fetchone()
        if row is None:
            return None
        try:
            boot, mono_ms, wall_ms = json.loads(row[0])
            if boot != self._boot:
                return None  # another boot: its monotonic time means nothing now
            return int(wall_ms) + int(self._clock.monotonic() * 1000) - int(mono_ms)
        except (ValueError, TypeError):
            return None
