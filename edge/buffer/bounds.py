"""Bounds and drop accounting of the buffer, applied inside the writer's transaction.

`drop_oldest`: the oldest events of the lowest-priority source go first (stored ones, then
that source's incoming ones), moving up in priority only when a source is empty; sealed
batches go only when no event is left (quarantined first, then the oldest). `reject_new`:
an incoming event is stored if it fits, possibly by evicting stored events of strictly
lower priority, else rejected. A full disk always drops oldest lowest-priority first.

Every drop is counted per (source, reason) and stays "pending" until an `edge.dropped`
event reporting it is committed: one per (source, reason) per commit, with the id range.

Retention never trusts the wall clock alone (a Pi without RTC boots at 1970 or at its last
saved time; a bad NTP source can step it ahead). Each synchronized retention run records a
mark (boot id, monotonic ms, wall ms, highest committed id) in meta `retention_marks`. An event
is old only if its capture ts is older than the retention AND it was committed before a mark
that is itself at least that old: by monotonic time for marks of this boot, by (synchronized)
wall time for marks of earlier boots. Marks are thinned to geometric spacing, so deletion lags
the configured age by at most a few percent of it; with no mark old enough nothing goes for age.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import structlog

from edge.config import Buffer as BufferCfg

log = structlog.get_logger("edge.buffer")

Reason = Literal["full", "rejected", "retention", "disk_full", "full_batch", "invalid"]
Row = tuple[int, int, str, int, int, bytes]  # id, ts, src, prio, size, body
Meta = tuple[int, int, str, int, int, int]  # id, ts, src, prio, size, offset of body (1-based)
Key = tuple[str, str]  # (source, reason)
Packer = Callable[[int, int, str, str, Any], bytes]  # (id, ts, src, type, data) -> body

# One statement inserts a whole batch: metadata as a JSON array of [id, ts, src, prio, size,
# offset] rows, bodies concatenated in one blob (substr on a BLOB slices bytes). A single
# sqlite3_step does all the work without the GIL, and in autocommit mode the statement is its
# own atomic, durable transaction. (Per-row executemany re-takes the GIL after every row,
# which costs up to a switch interval each while the event loop is busy.)
_ARROW = sqlite3.sqlite_version_info >= (3, 38)  # the ->> operator; json_extract before


def _col(i: int) -> str:
    return f"value->>{i}" if _ARROW else f"json_extract(value, '$[{i}]')"


INSERT_JSON = (
    "INSERT INTO events (id, ts, src, prio, size, body) SELECT "  # noqa: S608 - fixed text, no input
    + ", ".join(_col(i) for i in range(5))
    + f", substr(?2, {_col(5)}, {_col(4)}) FROM json_each(?1)"
)
_UPSERT_DROP = "INSERT OR REPLACE INTO drops VALUES (?, ?, ?, ?, ?, ?, ?)"
_UNBOUNDED = 1 << 62


@dataclass(slots=True)
class Drop:
    total: int = 0  # cumulative
    pending: int = 0  # not yet reported
    first: int | None = None  # id range of the pending ones, when they had ids
    last: int | None = None
    last_ms: int | None = None


@dataclass(slots=True)
class Level:
    """What is stored, per priority rank, plus sealed batches."""

    events: list[int]
    bytes: list[int]
    batch_events: int = 0
    batch_bytes: int = 0

    def copy(self) -> Level:
        return Level(list(self.events), list(self.bytes), self.batch_events, self.batch_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes) + self.batch_bytes

    @property
    def total_events(self) -> int:
        return sum(self.events) + self.batch_events

    def add(self, rows: Iterable[Row | Meta]) -> None:
        for r in rows:
            self.events[r[3]] += 1
            self.bytes[r[3]] += r[4]


@dataclass(slots=True)
class Tx:
    """State changes of one transaction; the buffer adopts them only after COMMIT."""

    level: Level
    drops: dict[Key, Drop]
    now: int
    touched: set[Key] = field(default_factory=set)

    def drop(self, src: str, reason: str, n: int, first: int | None, last: int | None) -> None:
        d = self.drops.setdefault((src, reason), Drop())
        d.total += n
        d.pending += n
        if first is not None and last is not None:
            d.first = first if d.first is None else min(d.first, first)
            d.last = last if d.last is None else max(d.last, last)
        d.last_ms = self.now
        self.touched.add((src, reason))

    def reported(self, keys: list[Key]) -> None:
        for key in keys:
            d = self.drops[key]
            d.pending, d.first, d.last = 0, None, None
            self.touched.add(key)


def insert_params(rows: list[Row]) -> tuple[str, bytes]:
    """Parameters of INSERT_JSON for `rows`."""
    metas = []
    off = 1
    for r in rows:
        metas.append((r[0], r[1], r[2], r[3], r[4], off))
        off += r[4]
    return json.dumps(metas), b"".join([r[5] for r in rows])


class Bounds:
    """Applies `max_bytes` / `max_events` with the configured policy on one connection."""

    def __init__(self, db: aiosqlite.Connection, cfg: BufferCfg, rank: dict[str, int], pack: Packer) -> None:
        self._db = db
        self._cfg = cfg
        self._rank = rank
        self._src_of = {r: s for s, r in rank.items()}
        self._pack = pack

    def over(self, level: Level, add_b: int, add_n: int) -> tuple[int, int]:
        """How far (bytes, events) the store would be over its bounds; <= 0 when within."""
        over_b = level.total_bytes + add_b - self._cfg.max_bytes
        mx = self._cfg.max_events
        return over_b, (level.total_events + add_n - mx if mx is not None else -_UNBOUNDED)

    async def fit(self, tx: Tx, rows: list[Row], next_id: int) -> tuple[list[Row], list[Row]]:
        """Make room for incoming `rows` and build the drop reports (ids from `next_id`).

        Returns (rows kept, report rows). With drop_oldest the reports get room too (a
        second pass evicts events for them, never a batch: a few small reports may overshoot);
        with reject_new a report is stored only if it fits."""
        reject = self._cfg.when_full == "reject_new"
        reserve_b = reserve_n = 0
        reports: list[Row] = []
        keys: list[Key] = []
        for _ in range(3):
            # room for the reports themselves, but never at the cost of a sealed batch
            rows = await self.make_room(
                tx, rows, "full", reject=reject, reserve=(reserve_b, reserve_n), batches=not reserve_n
            )
            over_b, over_n = self.over(tx.level, sum(r[4] for r in rows), len(rows))
            reports, keys = self.reports(tx, next_id, -over_b if reject else None, -over_n)
            rep_b = sum(r[4] for r in reports)
            if reject or (rep_b <= -over_b and len(reports) <= -over_n):
                break
            reserve_b, reserve_n = rep_b + 64, len(reports)
        tx.reported(keys)
        return rows, reports

    def reports(
        self, tx: Tx, next_id: int, avail_b: int | None = None, avail_n: int = _UNBOUNDED
    ) -> tuple[list[Row], list[Key]]:
        """One edge.dropped row per (source, reason) with pending drops; with `avail_b` only
        those that fit in (avail_b, avail_n)."""
        out: list[Row] = []
        keys: list[Key] = []
        for key in sorted(k for k, d in tx.drops.items() if d.pending > 0):
            d = tx.drops[key]
            data: dict[str, Any] = {"source": key[0], "count": d.pending, "reason": key[1]}
            if d.first is not None:
                data["first_id"], data["last_id"] = d.first, d.last
            eid = next_id + len(out)
            body = self._pack(eid, tx.now, "edge", "edge.dropped", data)
            if avail_b is not None:
                if len(body) > avail_b or avail_n < 1:
                    continue
                avail_b, avail_n = avail_b - len(body), avail_n - 1
            out.append((eid, tx.now, "edge", self._rank["edge"], len(body), body))
            keys.append(key)
        return out, keys

    async def make_room(
        self,
        tx: Tx,
        rows: list[Row],
        reason: Reason,
        *,
        reject: bool = False,
        reserve: tuple[int, int] = (0, 0),
        force_b: int = 0,
        batches: bool = True,
    ) -> list[Row]:
        """Evict (and drop incoming rows) until `rows` + `reserve` fit, or `force_b` bytes are
        freed; returns the incoming rows kept."""
        over_b, over_n = self.over(tx.level, sum(r[4] for r in rows) + reserve[0], len(rows) + reserve[1])
        over_b = max(over_b, force_b)
        if over_b <= 0 and over_n <= 0:
            return rows
        if reject:
            return await self._reject(tx, rows)
        keep = [True] * len(rows)
        for rank in range(len(tx.level.events) - 1, -1, -1):
            if over_b <= 0 and over_n <= 0:
                break
            if tx.level.events[rank]:
                n, b = await self._evict_rank(tx, rank, (over_b, over_n), reason)
                over_b, over_n = over_b - b, over_n - n
            for i, r in enumerate(rows):  # then this rank's incoming events, oldest first
                if over_b <= 0 and over_n <= 0:
                    break
                if keep[i] and r[3] == rank:
                    keep[i] = False
                    over_b, over_n = over_b - r[4], over_n - 1
                    tx.drop(r[2], reason, 1, r[0], r[0])
        while batches and (over_b > 0 or over_n > 0) and tx.level.batch_events > 0:
            n, b = await self._evict_batch(tx)
            over_b, over_n = over_b - b, over_n - n
        return [r for r, k in zip(rows, keep, strict=True) if k]

    async def _reject(self, tx: Tx, rows: list[Row]) -> list[Row]:
        lv = tx.level
        over_b, over_n = self.over(lv, 0, 0)
        avail_b, avail_n = -over_b, -over_n
        plan_b, plan_n = [0] * len(lv.events), [0] * len(lv.events)
        kept: list[Row] = []
        for r in rows:
            need_b, need_n = r[4] - avail_b, 1 - avail_n
            if need_b > 0 or need_n > 0:
                lower = range(len(lv.events) - 1, r[3], -1)  # strictly lower priority, lowest first
                can_b = sum(lv.bytes[k] - plan_b[k] for k in lower)
                can_n = sum(lv.events[k] - plan_n[k] for k in lower)
                if can_b < need_b or can_n < need_n:
                    tx.drop(r[2], "rejected", 1, r[0], r[0])
                    continue
                for k in lower:
                    tb = min(max(need_b, 0), lv.bytes[k] - plan_b[k])
                    tn = min(max(need_n, 0), lv.events[k] - plan_n[k])
                    plan_b[k], plan_n[k] = plan_b[k] + tb, plan_n[k] + tn
                    need_b, need_n = need_b - tb, need_n - tn
                    avail_b, avail_n = avail_b + tb, avail_n + tn
            kept.append(r)
            avail_b, avail_n = avail_b - r[4], avail_n - 1
        for k in range(len(lv.events)):
            if plan_b[k] > 0 or plan_n[k] > 0:
                await self._evict_rank(tx, k, (plan_b[k], plan_n[k]), "full")
        return kept

    async def _evict_rank(self, tx: Tx, rank: int, need: tuple[int, int], reason: Reason) -> tuple[int, int]:
        """Delete the oldest stored events of one rank until both needs are met; (n, bytes)."""
        lv, (need_b, need_n) = tx.level, need
        freed_b = freed_n = 0
        first: int | None = None
        last = 0
        while (freed_b < need_b or freed_n < need_n) and freed_n < lv.events[rank]:
            avg = max(1, lv.bytes[rank] // max(1, lv.events[rank]))
            est = max(need_n - freed_n, (need_b - freed_b) // avg + 1)
            got = await self._db.execute_fetchall(
                "SELECT id, size FROM events WHERE prio = ? AND id > ? ORDER BY id LIMIT ?",
                (rank, last, min(max(est + est // 4 + 16, 64), 20_000)),
            )
            if not got:
                break
            for eid, size in got:
                if freed_b >= need_b and freed_n >= need_n:
                    break
                first = eid if first is None else first
                last = eid
                freed_b, freed_n = freed_b + size, freed_n + 1
        if first is None:
            return 0, 0
        await self._db.execute(
            "DELETE FROM events WHERE prio = ? AND id BETWEEN ? AND ?", (rank, first, last)
        )
        lv.events[rank] -= freed_n
        lv.bytes[rank] -= freed_b
        tx.drop(self._src_of[rank], reason, freed_n, first, last)
        return freed_n, freed_b

    async def _evict_batch(self, tx: Tx) -> tuple[int, int]:
        """Delete the oldest sealed batch (quarantined ones first); (events, bytes)."""
        got = list(
            await self._db.execute_fetchall(
                "SELECT seq, length(payload), n, first, last FROM batches"
                " ORDER BY state = 'pending', seq LIMIT 1"
            )
        )
        if not got:
            tx.level.batch_events = tx.level.batch_bytes = 0
            return 0, 0
        seq, size, n, first, last = got[0]
        await self._db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
        tx.level.batch_events -= n
        tx.level.batch_bytes -= size
        tx.drop("*", "full_batch", n, first, last)
        log.warning(
            "buffer_batch_dropped", seq=seq, events=n, hint="the buffer is full of unacknowledged batches"
        )
        return n, size

    async def expire(self, tx: Tx, retention: Mapping[Any, float], upto: Callable[[int], int]) -> int:
        """Delete events older than their source's retention (by capture time, seconds) among
        those with id <= `upto(age_ms)` (committed at least that long ago, see Marks); the
        caller has checked the clock is synchronized. Returns how many."""
        deleted = 0
        for src, age in retention.items():
            rank = self._rank[src]
            age_ms = int(age * 1000)
            top = upto(age_ms)
            if not tx.level.events[rank] or top < 1:
                continue
            args = (rank, tx.now - age_ms, top)  # a future capture time is never older
            got = await self._db.execute_fetchall(
                "SELECT count(*), coalesce(sum(size), 0), min(id), max(id) FROM events"
                " WHERE prio = ? AND ts < ? AND id <= ?",
                args,
            )
            n, size, first, last = next(iter(got))
            if n:
                await self._db.execute("DELETE FROM events WHERE prio = ? AND ts < ? AND id <= ?", args)
                tx.level.events[rank] -= n
                tx.level.bytes[rank] -= size
                tx.drop(src, "retention", n, first, last)
                deleted += n
        return deleted

    async def write_drops(self, tx: Tx) -> None:
        if tx.touched:
            rows = [(s, r, *_drop_cols(tx.drops[(s, r)])) for s, r in sorted(tx.touched)]
            await self._db.executemany(_UPSERT_DROP, rows)


def _drop_cols(d: Drop) -> tuple[int, int, int | None, int | None, int | None]:
    return d.total, d.pending, d.first, d.last, d.last_ms


# ---------------------------------------------------------------------------- retention marks

MARKS_KEY = "retention_marks"
MAX_MARKS = 128  # one a minute over 30 days thins to ~9% spacing
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id: `EDGE_BOOT_ID` (the unit sets it to systemd's %b, because
    `ProcSubset=pid` hides /proc/sys), else the kernel's; unreadable -> a random one, so only
    this open's marks use monotonic time."""
    if env := os.environ.get("EDGE_BOOT_ID", "").strip():
        return env
    try:
        return _BOOT_ID.read_text().strip() or secrets.token_hex(16)
    except OSError:
        return secrets.token_hex(16)


@dataclass(slots=True, frozen=True)
class Mark:
    """At monotonic `mono_ms` of boot `boot` (wall `wall_ms`, synchronized), ids <= `max_id`
    were committed."""

    boot: str
    mono_ms: int
    wall_ms: int
    max_id: int


@dataclass(slots=True, frozen=True)
class Marks:
    """The recorded marks (oldest first) as seen at one retention run."""

    marks: tuple[Mark, ...]
    boot: str
    mono_ms: int
    wall_ms: int

    def age(self, m: Mark) -> int:
        """How long ago `m` was recorded, ms: never more than truly elapsed on this boot."""
        return self.mono_ms - m.mono_ms if m.boot == self.boot else self.wall_ms - m.wall_ms

    def upto(self, age_ms: int) -> int:
        """Highest id committed at least `age_ms` ago (0: none known)."""
        for m in reversed(self.marks):
            if self.age(m) >= age_ms:
                return m.max_id
        return 0

    def add(self, max_id: int, keep_ms: int, n: int = MAX_MARKS) -> list[Mark]:
        """The marks to store after this run: plus the new one, without those older than the
        newest one at least `keep_ms` old, thinned to `n` by geometric spacing."""
        out = [*self.marks, Mark(self.boot, self.mono_ms, self.wall_ms, max_id)]
        ages = [self.age(m) for m in out]
        old = [i for i, a in enumerate(ages) if a >= keep_ms]
        if old:
            out, ages = out[old[-1] :], ages[old[-1] :]
        while len(out) > max(n, 2):
            # drop the interior mark whose removal opens the smallest gap relative to its age
            i = min(range(1, len(out) - 1), key=lambda k: (ages[k - 1] - ages[k + 1]) / max(ages[k + 1], 1))
            del out[i], ages[i]
        return out


async def load_marks(db: aiosqlite.Connection, boot: str, mono_ms: int, wall_ms: int) -> Marks:
    """The stored marks; anything unreadable counts as no mark (nothing is deleted for age)."""
    got = list(await db.execute_fetchall("SELECT v FROM meta WHERE k = ?", (MARKS_KEY,)))
    return Marks(_parse_marks(got[0][0] if got else None), boot, mono_ms, wall_ms)


async def save_marks(db: aiosqlite.Connection, marks: Sequence[Mark]) -> None:
    doc = json.dumps([[m.boot, m.mono_ms, m.wall_ms, m.max_id] for m in marks], separators=(",", ":"))
    await db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (MARKS_KEY, doc))


def _parse_marks(raw: object) -> tuple[Mark, ...]:
    try:
        doc = json.loads(raw) if isinstance(raw, str) else []
    except ValueError:
        return ()
    out: list[Mark] = []
    for it in doc if isinstance(doc, list) else []:
        if (
            isinstance(it, list)
            and len(it) == 4
            and isinstance(it[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in it[1:])
        ):
            out.append(Mark(it[0], it[1], it[2], it[3]))
    return tuple(out)
