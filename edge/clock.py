"""The clock is injected everywhere, so time-based logic is testable without sleeping."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def wall_ms(self) -> int:
        """Wall-clock time, Unix milliseconds (may jump)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (never jumps; for timeouts, linger, retention ages)."""
        ...

    def synchronized(self) -> bool:
        """Whether the wall clock is NTP-synchronized (kernel adjtimex status)."""
        ...


# struct timex from <sys/timex.h>; only `status` is read. Generous padding covers the tail.
class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


def kernel_clock_synchronized() -> bool:
    """True when the kernel reports the clock synchronized (adjtimex != TIME_ERROR)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        tx = _Timex()
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return False
    return timex_synchronized(state, tx.status)


def timex_synchronized(state: int, status: int) -> bool:
    """adjtimex's return value and `status` -> synchronized. A failed call (-1: e.g. denied by
    a seccomp filter such as systemd's ProtectClock=) means unknown, which counts as NOT
    synchronized: retention pauses and events are flagged rather than trusting the clock."""
    return state >= 0 and state != _TIME_ERROR and not (status & _STA_UNSYNC)


@dataclass(slots=True)
class SystemClock:
    """The real clock. `synchronized()` is cached for a few seconds (it is a syscall)."""

    cache_s: float = 5.0
    _sync: bool = False
    _checked_at: float = field(default=-1e9)

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronized(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at > self.cache_s:
            self._sync = kernel_clock_synchronized()
            self._checked_at = now
        return self._sync


@dataclass(slots=True)
class FakeClock:
    """A clock for tests: advance it by hand."""

    wall: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    mono: float = 1000.0
    sync: bool = True

    def wall_ms(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def synchronized(self) -> bool:
        return self.sync

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += int(seconds * 1000)
