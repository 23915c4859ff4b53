"""`log.level`: a temporary log level that reverts by itself.

The level is the stdlib root logger's (edge/logs.py routes structlog through it, so it filters
both); the libraries held at INFO there (CHATTY_LIBRARIES: raw packets, tag ids) stay held,
whatever level is asked for. A second `log.level` replaces the first one's level and timer; the
revert always returns to the level from before the first, so overlapping commands cannot leave
the device at a temporary level for good. The timer is an asyncio task using the loop's
monotonic clock; `close()` (the daemon stopping) reverts at once.
"""

from __future__ import annotations

import asyncio
import logging

import structlog

log = structlog.get_logger("edge.downlink.loglevel")

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
MAX_FOR_S = 24 * 3600.0  # a temporary level lasts at most a day


class TemporaryLogLevel:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger()
        self._base: int | None = None  # the level before the first temporary one
        self._task: asyncio.Task[None] | None = None

    def set(self, level: str, for_s: float) -> None:
        """Set `level` for `for_s` seconds (ValueError for an unknown level or duration)."""
        lvl = LEVELS.get(level.lower()) if isinstance(level, str) else None
        if lvl is None:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}")
        if not 0 < for_s <= MAX_FOR_S:
            raise ValueError(f"for must be more than 0 s and at most {int(MAX_FOR_S)} s")
        if self._base is None:
            self._base = self._logger.level
        if self._task is not None:
            self._task.cancel()
        self._logger.setLevel(lvl)
        self._task = asyncio.get_running_loop().create_task(self._revert_after(for_s), name="log-level-revert")
        log.info("log_level_temporary", level=level.lower(), for_s=for_s)

    @property
    def active(self) -> bool:
        return self._base is not None

    async def _revert_after(self, for_s: float) -> None:
        await asyncio.sleep(for_s)
        self.revert()

    def revert(self) -> None:
        if self._base is not None:
            self._logger.setLevel(self._base)
            self._base = None
            log.info("log_level_reverted", level=logging.getLevelName(self._logger.level).lower())
        self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.revert()
