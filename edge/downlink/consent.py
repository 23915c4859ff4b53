"""Consent from the cloud (downlink-v1 §Consent): 256 shards of consented stable pseudonyms.

`ConsentSync` is the privacy layer's consent list when the device has a cloud downlink (a store
without one keeps the consent file, edge/privacy/consent.py): `pseudonym in sync` is one set
lookup on the per-event path. A shard never received is empty: nobody in it consented (fail
closed), so a fresh device uses every stable class's fallback until its shards arrive.

`apply(doc)` takes a verified `consent` document. It is dropped (counted in `dropped` by reason,
logged with shard and rev only) unless `shard` is two lowercase hex digits, `rev` is an int
greater than the shard's current one (a replayed or reordered retained copy: `stale`), and
`consented` is an array of str, sorted, unique, each in that shard. Otherwise, in this order:

1. the new revision, with the pseudonyms it withdraws as a pending purge, is committed to
   `consent.db` in the state folder (so a restart keeps the shards, and a crash before step 3
   finishes the purge at the next start: `resume()`);
2. the in-memory set changes before anything awaits, so from then on a withdrawn pseudonym
   gets its class's fallback policy (ephemeral or drop) for every new reading;
3. every buffered unsent event carrying a withdrawn pseudonym is deleted in ONE buffer
   transaction together with one `edge.consent_purged` event `{"shard", "rev", "events": n}`
   (edge/buffer/purge.py; sealed batches are left as they are, see docs/privacy.md), and the
   pending purge is cleared. A purge that fails (a full disk) stays pending and is retried
   with the next withdrawing revision and at the next start.

No log line, counter or report carries a pseudonym: only shards, revs and counts.
`consent.db` holds the consented pseudonyms (as the consent file does) with `secure_delete` on
and the WAL truncated after every change, so a withdrawn pseudonym does not linger in it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog

from edge.buffer.store import PurgeResult
from edge.wire.downlink import Document, consent_shard

log = structlog.get_logger("edge.downlink.consent")

CONSENT_FILE = "consent.db"
PURGED_EVENT = "edge.consent_purged"
SHARDS = 256
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shards (shard TEXT PRIMARY KEY NOT NULL, rev INTEGER NOT NULL, "
    "consented BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pending (shard TEXT PRIMARY KEY NOT NULL, rev INTEGER NOT NULL, "
    "removed BLOB NOT NULL)",
)


def _members_problem(consented: list[str], shard: str) -> str | None:
    if any(a >= b for a, b in itertools.pairwise(consented)):
        return "unsorted"
    if any(consent_shard(p) != shard for p in consented):
        return "wrong-shard"
    return None


class Purger(Protocol):
    """The buffer's consent purge (edge.buffer.Buffer.purge_carrying)."""

    async def purge_carrying(self, needles: Sequence[str], report_type: str,
                             report: Callable[[int], dict[str, Any]]) -> PurgeResult: ...


class ConsentSync:
    """Consent shards received from the cloud, persisted in `state_dir/consent.db`."""

    def __init__(self, state_dir: Path, buffer: Purger | None = None) -> None:
        path = Path(state_dir) / CONSENT_FILE
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode = WAL", "synchronous = FULL", "secure_delete = ON", "busy_timeout = 5000"):
            self._db.execute(f"PRAGMA {pragma}")
        for stmt in _SCHEMA:
            self._db.execute(stmt)
        self._buffer = buffer
        self._shards: dict[str, tuple[int, frozenset[str]]] = {}
        self._all: set[str] = set()
        self._lock = asyncio.Lock()
        self.dropped: Counter[str] = Counter()
        self.purged_events = 0
        for shard, rev, blob in self._db.execute("SELECT shard, rev, consented FROM shards"):
            try:
                members = frozenset(str(p) for p in msgpack.unpackb(blob, raw=False))
            except (ValueError, TypeError, msgpack.UnpackException):
                # nobody in it counts as consented (fail closed) until the shard's next revision
                log.error("consent_shard_unreadable", shard=str(shard)[:2])
                continue
            self._shards[shard] = (int(rev), members)
            self._all |= members

    def bind(self, buffer: Purger) -> None:
        """The buffer to purge (opened after the privacy layer that already consults this)."""
        self._buffer = buffer

    def close(self) -> None:
        self._db.close()

    def __contains__(self, item: object) -> bool:
        return item in self._all

    def __len__(self) -> int:
        return len(self._all)

    def counts(self) -> tuple[int, int]:
        """(shards received, consented pseudonyms in all of them): for `reported`."""
        return len(self._shards), len(self._all)

    def revs(self) -> dict[str, int]:
        """shard -> rev applied (purge included)."""
        return {s: r for s, (r, _) in sorted(self._shards.items())}

    def status(self) -> dict[str, Any]:
        shards, pseudonyms = self.counts()
        return {"shards": shards, "pseudonyms": pseudonyms, "dropped": dict(self.dropped),
                "purged_events": self.purged_events}

    async def apply(self, doc: Document) -> None:
        async with self._lock:
            checked = self._check(doc.body)
            if isinstance(checked, str):
                self.dropped[checked] += 1
                shard = doc.body.get("shard")
                log.warning("consent_dropped", reason=checked, digest=doc.digest,
                            shard=shard if isinstance(shard, str) and _SHARD_RE.fullmatch(shard) else None,
                            rev=doc.body.get("rev") if type(doc.body.get("rev")) is int else None)
                return
            shard, rev, new = checked
            old = self._shards.get(shard, (0, frozenset()))[1]
            removed = sorted(old - new)
            await asyncio.to_thread(self._store, shard, rev, new, removed)
            # at once, before any await: new readings of a withdrawn person get the fallback
            self._shards[shard] = (rev, new)
            self._all.difference_update(removed)
            self._all.update(new)
            log.info("consent_shard_applied", shard=shard, rev=rev, consented=len(new), withdrawn=len(removed))
            if removed:
                await self._run_pending()

    async def resume(self) -> None:
        """Finish purges a crash, a stop or a buffer error interrupted (call once the buffer is
        bound; every revision that withdraws someone retries them too)."""
        async with self._lock:
            await self._run_pending()

    async def _run_pending(self) -> None:
        rows = await asyncio.to_thread(
            lambda: self._db.execute("SELECT shard, rev, removed FROM pending ORDER BY shard").fetchall())
        for shard, rev, blob in rows:
            await self._purge(shard, int(rev), list(msgpack.unpackb(blob, raw=False)))

    def _check(self, body: Mapping[str, Any]) -> tuple[str, int, frozenset[str]] | str:
        shard, rev, consented = body.get("shard"), body.get("rev"), body.get("consented")
        if type(shard) is not str or not _SHARD_RE.fullmatch(shard):
            return "bad-shard"
        if type(rev) is not int or rev < 1:
            return "bad-rev"
        if not isinstance(consented, list) or not all(type(p) is str for p in consented):
            return "bad-consented"
        if (bad := _members_problem(consented, shard)) is not None:
            return bad
        if rev <= self._shards.get(shard, (0, frozenset()))[0]:
            return "stale"
        return shard, rev, frozenset(consented)

    def _store(self, shard: str, rev: int, new: frozenset[str], removed: list[str]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO shards (shard, rev, consented) VALUES (?, ?, ?)",
                       (shard, rev, msgpack.packb(sorted(new))))
            if removed:
                prev = db.execute("SELECT removed FROM pending WHERE shard = ?", (shard,)).fetchone()
                carry = set(msgpack.unpackb(prev[0], raw=False)) if prev else set()  # an unfinished purge
                db.execute("INSERT OR REPLACE INTO pending (shard, rev, removed) VALUES (?, ?, ?)",
                           (shard, rev, msgpack.packb(sorted((carry - new) | set(removed)))))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _done(self, shard: str, rev: int) -> None:
        self._db.execute("DELETE FROM pending WHERE shard = ? AND rev = ?", (shard, rev))
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _purge(self, shard: str, rev: int, removed: list[str]) -> None:
        buffer = self._buffer
        if buffer is None:
            log.warning("consent_purge_deferred", shard=shard, rev=rev, reason="no buffer bound yet")
            return
        try:
            result = await buffer.purge_carrying(
                removed, PURGED_EVENT, lambda n: {"shard": shard, "rev": rev, "events": n})
        except Exception as exc:  # e.g. the disk is full: the purge stays pending and is retried
            log.error("consent_purge_failed", shard=shard, rev=rev, error=type(exc).__name__,
                      effect="fallback applies already; buffered events are deleted on the next try")
            return
        await asyncio.to_thread(self._done, shard, rev)
        self.purged_events += result.deleted
        log.info("consent_purged", shard=shard, rev=rev, events=result.deleted,
                 sealed_batches_kept=result.sealed_batches, sealed_events_kept=result.sealed_events)
