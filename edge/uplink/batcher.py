"""Seals batches from the buffer exactly per uplink-v1 (edge/wire/uplink.py does the bytes).

A batch is sealed (seq, header, signature fixed) and stored durably, in the same SQLite
transaction that removes its events from the unsent backlog, before it is first published;
every resend is the stored payload, byte for byte.

Sealing is lazy: only when the uplink has room in its window. Offline, events stay
unsealed in the buffer, where drop and retention policies still apply to them.

Fresh events are never starved by a large backlog: batches alternate between the oldest
unsent events and the newest ones, so with a million events queued a fresh event still
goes out within a couple of batches.

zlib level: 1 by default (a 1000-event batch compresses in ~1.9 ms instead of ~5.2 ms at
level 6, for ~10 % more bytes: on a Pi-class device CPU is the scarcer resource), and 6 when
`uplink.bandwidth` caps the link, where bytes are what costs (scripts/bench_uplink.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.buffer import Buffer, SealedBatch, StoredEvent
from edge.clock import Clock
from edge.config import Config
from edge.privacy.keys import KeyStore
from edge.wire.uplink import seal_batch

FAST_LEVEL = 1  # zlib level on an unmetered link
METERED_LEVEL = 6  # zlib level when uplink.bandwidth is set


@dataclass(slots=True)
class _Linger:
    since: float | None = None


class Batcher:
    def __init__(self, cfg: Config, buffer: Buffer, keys: KeyStore, clock: Clock) -> None:
        self._cfg = cfg
        self._buffer = buffer
        self._clock = clock
        self._key = keys.signing_key()
        self._kid = keys.kid()
        self._limits = cfg.uplink.batch
        self._level = FAST_LEVEL if cfg.uplink.bandwidth is None else METERED_LEVEL
        self._newest_next = False
        self._linger = _Linger()
        self.sealed = 0

    def _build(self, seq: int, prev: bytes, events: list[StoredEvent]) -> SealedBatch:
        ident = self._cfg.identity
        payload, hh = seal_batch(
            tenant=ident.tenant,
            store=ident.store,
            device=ident.device,
            seq=seq,
            prev=prev,
            event_bodies=[e.body for e in events],
            first=events[0].id,
            last=events[-1].id,
            t_ms=self._clock.wall_ms(),
            sync=self._clock.synchronized(),
            key=self._key,
            kid=self._kid,
            compression=self._limits.compression,
            level=self._level,
        )
        return SealedBatch(seq=seq, hh=hh, payload=payload, first=events[0].id, last=events[-1].id, n=len(events))

    async def seal_next(self, *, force: bool = False) -> SealedBatch | None:
        """Seal one batch if there is enough to send (or it lingered long enough, or `force`)."""
        lim = self._limits
        newest = self._newest_next
        events = await self._buffer.unsealed(lim.max_events, lim.max_bytes, newest=newest)
        if not events:
            self._linger.since = None
            return None
        full = len(events) >= lim.max_events or sum(e.size for e in events) >= lim.max_bytes * 0.9
        now = self._clock.monotonic()
        if not (full or force):
            if self._linger.since is None:
                self._linger.since = now
            if now - self._linger.since < lim.linger:
                return None
        batch = await self._buffer.seal(events, self._build)
        self._linger.since = None
        self._newest_next = not newest
        self.sealed += 1
        return batch

    def linger_left(self) -> float:
        """Seconds until a partial batch is due (or the linger time when none is waiting)."""
        if self._linger.since is None:
            return self._limits.linger
        return max(0.0, self._limits.linger - (self._clock.monotonic() - self._linger.since))
