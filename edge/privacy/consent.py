"""The consent list: stable pseudonyms of customers who agreed to be recognized across visits.

One pseudonym per line (as the device computes it, e.g. `loy:s1a2b3c4d:...`); `#` starts
a comment. The file is reloaded when it changes (checked at most every `check_every_s`
monotonic seconds), so withdrawing consent takes effect without a restart. A missing or
unreadable file means nobody consented (fail closed).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from edge.clock import Clock

log = structlog.get_logger("edge.privacy.consent")

_MAX_BYTES = 64 * 1024 * 1024

_Sig = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


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
            st = os.stat(self._path)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("consent_file_missing", file=str(self._path))
                self._missing_logged = True
            self._entries, self._sig = frozenset(), None
            return
        except OSError as exc:
            self._fail(exc)
            return
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if sig == self._sig:
            return
        try:
            with open(self._path, "rb") as f:
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
            log.error("consent_file_unreadable", file=str(self._path), error=exc.strerror)
        self._missing_logged = True
        self._entries, self._sig = frozenset(), None
