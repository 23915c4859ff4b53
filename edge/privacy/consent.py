"""The consent list: stable pseudonyms of customers who agreed to be recognized across visits.

One pseudonym per line (as the device computes it, e.g. `loy:s1a2b3c4d:...`); `#` starts
a comment. The file is reloaded when it changes (checked at most every `check_every_s`
monotonic seconds), so withdrawing consent takes effect without a restart. A missing or
unreadable file means nobody consented (fail closed).

The file opts people in, so who may write it matters: it must be a regular file (a FIFO would
block lookups, a device would be read forever) that neither its group nor others may write.
It is opened with O_NONBLOCK (opening a FIFO never waits for a writer) and checked with fstat
on the opened descriptor (no race between check and read); anything else is logged as
`consent_file_unsafe` and treated as nobody consented. `consent_file_problem` is the same check
for `edge check-config`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from edge.clock import Clock

log = structlog.get_logger("edge.privacy.consent")

_MAX_BYTES = 64 * 1024 * 1024

_Sig = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


class UnsafeConsentFile(OSError):
    """The consent file is not a regular file, or its group or others may write it."""


def _open_checked(path: Path) -> tuple[int, os.stat_result]:
    """An fd of `path` opened without blocking, and its fstat; UnsafeConsentFile when unsafe."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        why = _unsafe(st)
    except OSError:
        os.close(fd)
        raise
    if why is not None:
        os.close(fd)
        raise UnsafeConsentFile(why)
    return fd, st


def _unsafe(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file ({_kind(st.st_mode)})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
                           if st.st_mode & bit)
        return (f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): whoever may write it can opt "
                "people in; chmod go-w it")
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def consent_file_problem(path: Path) -> str | None:
    """Why `path` cannot serve as the consent file, or None (a missing file is fine: nobody consented)."""
    try:
        fd, _st = _open_checked(path)
    except FileNotFoundError:
        return None
    except UnsafeConsentFile as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    os.close(fd)
    return None


def parse_consent(text: str) -> frozenset[str]:
    out = set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            out.add(entry)
    return frozenset(out)


class ConsentList:
    def __init__(self, path: Path, clock: Clock, check_every_s: float = 2.0) -> None:
        self._path = Path(path)
        self._clock = clock
        self._every = check_every_s
        self._entries: frozenset[str] = frozenset()
        self._sig: _Sig | None = None
        self._next_check = float("-inf")
        self._missing_logged = False
        self._refresh()

    @property
    def path(self) -> Path:
        return self._path

    def __contains__(self, item: object) -> bool:
        if self._clock.monotonic() >= self._next_check:
            self._refresh()
        return item in self._entries

    def __len__(self) -> int:
        if self._clock.monotonic() >= self._next_check:
            self._refresh()
        return len(self._entries)

    def _refresh(self) -> None:
        self._next_check = self._clock.monotonic() + self._every
        try:
            fd, st = _open_checked(self._path)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("consent_file_missing", file=str(self._path))
                self._missing_logged = True
            self._entries, self._sig = frozenset(), None
            return
        except OSError as exc:
            self._fail(exc)
            return
        with os.fdopen(fd, "rb") as f:
            sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if sig == self._sig:
                return
            try:
                data = f.read(_MAX_BYTES + 1)
            except OSError as exc:
                self._fail(exc)
                return
        if len(data) > _MAX_BYTES:
            log.error("consent_file_too_large", file=str(self._path), max_bytes=_MAX_BYTES)
            self._entries, self._sig = frozenset(), sig
            return
        self._entries = parse_consent(data.decode("utf-8", errors="replace"))
        self._sig = sig
        self._missing_logged = False
        log.info("consent_loaded", file=str(self._path), entries=len(self._entries))

    def _fail(self, exc: OSError) -> None:
        if self._sig is not None or not self._missing_logged:
            if isinstance(exc, UnsafeConsentFile):
                log.error("consent_file_unsafe", file=str(self._path), error=str(exc),
                          hint="nobody counts as consented until it is a regular file only its owner may write")
            else:
                log.error("consent_file_unreadable", file=str(self._path), error=exc.strerror)
        self._missing_logged = True
        self._entries, self._sig = frozenset(), None
