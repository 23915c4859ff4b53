"""One daemon per state folder: an exclusive `flock` on `<state_dir>/edge.lock`.

`edge run` (and `edge demo`) take it before the buffer, the keys or the broker session are
opened; a second daemon on the same folder stops with exit 2 naming the holder's pid
instead of corrupting the buffer's ids and stealing the MQTT session. The kernel drops the
lock when the holder exits, even by SIGKILL, so a stale file never blocks a restart.
`edge status` and `edge export` read the buffer read-only and never take the lock;
`edge export --signed` seals batches, so it takes it (and refuses beside a running daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from edge.errors import EdgeError

LOCK_FILE = "edge.lock"


class StateLocked(EdgeError):
    """Another process holds the state folder's lock."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process (pid unknown)"
        super().__init__(
            f"another store-edge daemon ({who}) is already running on the state folder {state_dir}",
            hint="stop it first (systemctl stop edge), or give this one its own paths.state_dir",
        )
        self.state_dir = state_dir
        self.pid = pid


class StateLock:
    """`with StateLock(dir):` holds the lock; `acquire()` raises StateLocked when it is taken."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a planted symlink must not make us overwrite its target with our pid
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise EdgeError(f"cannot open the lock file {self.path}: {exc.strerror or exc}",
                            hint="it must be a regular file (not a symlink) in a folder this user can write") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateLocked(self.state_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        mine = f"{os.getpid()}\n".encode()
        os.pwrite(fd, mine, 0)  # then cut: a reader never sees an empty file in between
        os.ftruncate(fd, len(mine))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # the pid stays in the file: harmless, as only a held flock means "running"
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
