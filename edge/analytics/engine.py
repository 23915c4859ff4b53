"""Store KPIs per interval from the pipeline's events (after privacy: pseudonyms, never raw ids).

Fed one `Pending` at a time by `edge.analytics.sink.AnalyticsSink` (the hot path: one dict
lookup for event types analytics does not read), `tick()` about once a second, `flush()` at
stop. What it reads:

- `presence.enter` / `presence.exit` / `presence.zone` (ble): visits, dwell, zones. A visit
  is held in memory under the session's pseudonym while it lasts, never stored.
- `nfc.tap` (product taps per GTIN) and `pos.receipt` (receipts, loyalty share, basket size).

Address rotation: when a session ends by falling silent while near (`weak_ms` small, reason
"gone") and, within `rotation_gap` of its last advertisement, a new session entered at an
RSSI within `rotation_rssi` dB in the same zone, the new session continues the old visit (it
takes the old visit's start; its footfall is taken back). The old pseudonym is forgotten at
that moment; nothing links the two afterwards, and nothing of it is ever written anywhere.

Staff and fixed devices: a visit (across rotations) reaching `staff_after` becomes staff: it
leaves occupancy and dwell, its footfall is taken back in the day's totals (and reported as
`staff_new` in that interval), and it is counted among the staff present.

Intervals start at local midnight (every `interval`); each stays open `settle` after its end
(exits arrive `exit_after` late, with the ts when the device was last near), then it is
published as one `analytics.interval` event (src `edge`) and kept (counts only) for today's
snapshot. Occupancy is sampled every `sample_every`; samples taken after a device was last
near are corrected when its exit arrives.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any

from edge.analytics.config import Analytics
from edge.analytics.publish import Cells
from edge.clock import Clock
from edge.events import Pending

EVENT_TYPE = "analytics.interval"
DWELL_EDGES_S = (300, 900, 1800, 3600)
DWELL_LABELS = ("0-5m", "5-15m", "15-30m", "30-60m", "60m+")
BASKET_LABELS = ("0", "1", "2-3", "4-6", "7-10", "11+")
_BASKET_OF = (0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4)  # items -> bucket index, 11+ -> 5
ROTATION_WEAK_MS = 3000  # a session heard weakly longer than this before silence walked away
_BEFORE_MS = 2000  # the new address may be heard this much before the old one's last advert
_MAX_VISITS = 100_000


@dataclass(slots=True)
class _Visit:
    start: int  # ms: the visit's start (its first session's enter, across rotations)
    enter: int  # ms: this session's enter
    zone: int
    counted_in: int = 0  # ms: start of the interval whose footfall counted this session
    staff: bool = False
    linked: bool = False  # continues an earlier session (cannot be claimed again)


@dataclass(slots=True)
class _Acc:
    """One interval's true counts (only in memory; published through `Cells`)."""

    start: int
    end: int
    day: date
    nzones: int
    footfall: int = 0
    rotations: int = 0
    dwell: list[float] = field(default_factory=list)
    buckets: list[int] = field(default_factory=lambda: [0] * len(DWELL_LABELS))
    samples: list[list[int]] = field(default_factory=list)  # per sample: count per zone, then staff
    transitions: Counter[str] = field(default_factory=Counter)
    taps: Counter[str] = field(default_factory=Counter)
    taps_other: int = 0
    receipts: int = 0
    loyalty: int = 0
    basket: list[int] = field(default_factory=lambda: [0] * len(BASKET_LABELS))
    staff_new: int = 0
    cells: Cells | None = None
    row: dict[str, Any] | None = None  # the published row, once closed


class StoreAnalytics:
    """The analytics component: `observe`, `tick`, `flush`, `snapshot` (see the module docstring)."""

    def __init__(
        self,
        cfg: Analytics,
        zones: Sequence[str],
        clock: Clock,
        *,
        exit_after: float,
        tz: tzinfo | None = None,
        rng: random.Random | None = None,
        max_visits: int = _MAX_VISITS,
    ) -> None:
        self.cfg = cfg
        self.zones = list(zones) or ["store"]
        self._zone_ix = {z: i for i, z in enumerate(self.zones)}
        self._clock = clock
        self._tz = tz
        self._rng = rng if rng is not None else random.SystemRandom()
        self._interval = round(cfg.interval * 1000)
        self._sample = round(cfg.sample_every * 1000)
        self._staff_ms = round(cfg.staff_after * 1000)
        self._gap = round(cfg.rotation_gap * 1000)
        self._tol = cfg.rotation_rssi
        self._rotation = cfg.rotation
        self.settle_ms = round((exit_after + cfg.rotation_gap + cfg.sample_every) * 1000) + 5000
        self._keep_ms = round(exit_after * 1000) + self._gap + self._sample + 5000
        self._max_visits = max_visits
        self._visits: dict[str, _Visit] = {}
        self._occ = [0] * len(self.zones)
        self._staff = 0
        self._recent: deque[tuple[int, str, int, int]] = deque()  # (enter ts, pseudonym, zone, rssi)
        self._recent_samples: deque[tuple[int, list[int]]] = deque()  # (sample time, its counts)
        self._open: dict[int, _Acc] = {}  # by start, oldest first
        self._cur: _Acc | None = None
        self._closed: list[_Acc] = []  # today's (and yesterday's last) published intervals
        self._next_sample = 0
        self._day: date | None = None
        self.suppressed_today = 0
        self.ticker_since: int | None = None  # wall ms: when `run_ticker` started (None: no ticker)
        self.last_tick_ms: int | None = None  # wall ms of the last `tick()` that completed
        self.counters: Counter[str] = Counter()
        self._handlers: dict[str, Callable[[Pending], None]] = {
            "presence.enter": self._enter,
            "presence.exit": self._exit,
            "presence.zone": self._zone,
            "nfc.tap": self._tap,
            "pos.receipt": self._receipt,
        }

    # -- time ----------------------------------------------------------------------------

    def _local(self, ts: int) -> datetime:
        d = datetime.fromtimestamp(ts / 1000, self._tz)
        return d if self._tz is not None else d.astimezone()

    def _bounds(self, ts: int) -> tuple[int, int, date]:
        utc_offset = self._local(ts).utcoffset()
        off = round(utc_offset.total_seconds() * 1000) if utc_offset is not None else 0
        start = (ts + off) // self._interval * self._interval - off
        return start, start + self._interval, self._local(start).date()

    def _new_acc(self, ts: int) -> _Acc:
        start, end, day = self._bounds(ts)
        acc = self._open.get(start)
        if acc is None:
            acc = self._open[start] = _Acc(start, end, day, len(self.zones))
            acc.cells = Cells(self.cfg.k, self.cfg.epsilon, self._rng)
            self._open = dict(sorted(self._open.items()))
        return acc

    def _acc(self, ts: int) -> _Acc:
        """The open interval holding `ts`; the oldest open one for older events (late)."""
        cur = self._cur
        if cur is not None and cur.start <= ts < cur.end:
            return cur
        for acc in self._open.values():
            if acc.start <= ts < acc.end:
                return acc
        if self._open and ts < next(iter(self._open.values())).start:
            self.counters["late_events"] += 1
            return next(iter(self._open.values()))
        now = self._clock.wall_ms()
        acc = self._new_acc(min(ts, now + 60_000))  # a capture time far ahead is the device clock's
        if self._cur is None or acc.start > self._cur.start:
            self._cur = acc
        return acc

    # -- events (hot path) -----------------------------------------------------------------

    def observe(self, p: Pending) -> None:
        h = self._handlers.get(p.type)
        if h is not None:
            h(p)

    def _zone_of(self, data: Mapping[str, Any], key: str = "zone") -> int:
        z = data.get(key)
        return self._zone_ix.get(z, 0) if isinstance(z, str) else 0

    def _enter(self, p: Pending) -> None:
        data, ts = p.data, p.ts
        acc = self._acc(ts)
        pid = data.get("device")
        if not isinstance(pid, str):
            acc.footfall += 1  # identifier dropped by policy: a visit we cannot follow
            return
        if pid in self._visits:
            return
        if len(self._visits) >= self._max_visits:
            self.counters["visits_over_limit"] += 1
            return
        z = self._zone_of(data)
        self._visits[pid] = _Visit(ts, ts, z, counted_in=acc.start)
        self._occ[z] += 1
        acc.footfall += 1
        if self._rotation:
            rssi = data.get("rssi")
            recent = self._recent
            recent.append((ts, pid, z, rssi if isinstance(rssi, int) else 0))
            horizon = ts - self._keep_ms
            while recent and recent[0][0] < horizon:
                recent.popleft()

    def _uncount(self, column: int, since: int) -> None:
        """Take one device out of `column` in the samples taken after `since`."""
        for g, counts in reversed(self._recent_samples):
            if g <= since:
                break
            if counts[column] > 0:
                counts[column] -= 1

    def _exit(self, p: Pending) -> None:
        data, ts = p.data, p.ts
        pid = data.get("device")
        v = self._visits.pop(pid, None) if isinstance(pid, str) else None
        if v is None:
            v = self._orphan(data, ts)
            if v is None:
                return
        if isinstance(pid, str) and self._recent:  # nothing of a finished session stays behind
            self._recent = deque(e for e in self._recent if e[1] != pid)
        if v.staff:
            self._staff -= 1
            self._uncount(len(self.zones), ts)
        else:
            self._occ[v.zone] -= 1
            self._uncount(v.zone, ts)
        weak = data.get("weak_ms")
        if (self._rotation and data.get("reason") == "gone" and isinstance(pid, str)
                and isinstance(data.get("rssi_last"), int) and isinstance(weak, int) and weak <= ROTATION_WEAK_MS):
            nxt = self._match(ts, self._zone_of(data, "zone_last") if "zone_last" in data else v.zone,
                              data["rssi_last"])
            if nxt is not None:
                self._link(v, nxt)
                return
        if not v.staff:
            acc = self._acc(ts)
            d = max(0.0, (ts - v.start) / 1000)
            acc.dwell.append(d)
            b = 0
            while b < len(DWELL_EDGES_S) and d >= DWELL_EDGES_S[b]:
                b += 1
            acc.buckets[b] += 1

    def _orphan(self, data: Mapping[str, Any], ts: int) -> _Visit | None:
        """The visit of an exit whose pseudonym is unknown: the pseudonym key rotated during
        the session. Its enter time (ts - dwell_ms) finds it; rare (once per key epoch)."""
        dwell = data.get("dwell_ms")
        if not isinstance(dwell, int):
            return None
        enter = ts - dwell
        best, off = None, 3
        for pid, v in self._visits.items():
            if abs(v.enter - enter) < off:
                best, off = pid, abs(v.enter - enter)
        if best is None:
            self.counters["exit_unknown"] += 1
            return None
        self.counters["exit_after_key_rotation"] += 1
        return self._visits.pop(best)

    def _match(self, ts: int, zone: int, rssi: int) -> str | None:
        """The session that most likely continues one last near at `ts` (see the module docstring)."""
        best, score = None, math.inf
        lo, hi, tol = ts - _BEFORE_MS, ts + self._gap, self._tol
        visits = self._visits
        for e_ts, pid, _z, e_rssi in reversed(self._recent):
            if e_ts < lo:
                break
            if e_ts > hi:
                continue
            dr = abs(e_rssi - rssi)
            if dr > tol:
                continue
            v = visits.get(pid)
            if v is None or v.linked or v.enter != e_ts:
                continue
            z = v.zone  # where the new session is now (smoothed since its enter), else where it entered
            if z != zone and 2 * dr > tol:
                continue
            s = abs(e_ts - ts) / self._gap + dr / tol + (0.5 if z != zone else 0.0)
            if s < score:
                best, score = pid, s
        return best

    def _link(self, old: _Visit, pid: str) -> None:
        v = self._visits[pid]
        acc = self._open.get(v.counted_in)
        if acc is not None:  # the new session's enter was not a new visit
            acc.footfall -= 1
            acc.rotations += 1
        else:  # its interval is already published (a clock step, events held back): it stays counted
            self.counters["rotations_after_close"] += 1
        v.start, v.linked = old.start, True
        if old.staff and not v.staff:
            self._make_staff(v, since=v.enter, new=False)

    def _make_staff(self, v: _Visit, *, since: int, new: bool) -> None:
        v.staff = True
        self._occ[v.zone] -= 1
        self._uncount(v.zone, since)
        self._staff += 1
        for g, counts in reversed(self._recent_samples):
            if g <= since:
                break
            counts[-1] += 1
        if new:
            cur = self._acc(self._clock.wall_ms())
            cur.staff_new += 1

    def _zone(self, p: Pending) -> None:
        pid = p.data.get("device")
        v = self._visits.get(pid) if isinstance(pid, str) else None
        if v is None:
            return
        z = self._zone_of(p.data)
        if z == v.zone:
            return
        if not v.staff:
            self._occ[v.zone] -= 1
            self._occ[z] += 1
            self._acc(p.ts).transitions[f"{self.zones[v.zone]}>{self.zones[z]}"] += 1
        v.zone = z

    def _tap(self, p: Pending) -> None:
        acc = self._acc(p.ts)
        gtin = p.data.get("gtin")
        if p.data.get("kind") == "product" and isinstance(gtin, str) and (
                gtin in acc.taps or len(acc.taps) < self.cfg.max_gtins):
            acc.taps[gtin] += 1
        else:
            acc.taps_other += 1

    def _receipt(self, p: Pending) -> None:
        acc = self._acc(p.ts)
        acc.receipts += 1
        if p.data.get("loyalty") is not None:
            acc.loyalty += 1
        items = p.data.get("items")
        n = 0
        if isinstance(items, list):
            for it in items:
                q = it.get("qty") if isinstance(it, dict) else None
                n += q if isinstance(q, int) and not isinstance(q, bool) and q > 0 else 1  # weighed: one item
        acc.basket[_BASKET_OF[n] if n < len(_BASKET_OF) else len(BASKET_LABELS) - 1] += 1

    # -- time passes ---------------------------------------------------------------------

    def tick(self) -> list[Pending]:
        """Occupancy samples and staff up to now; the events of intervals that are settled."""
        now = self._clock.wall_ms()
        self._roll_day()
        cur = self._acc(now)
        if self._cur is None or cur.start > self._cur.start:
            self._cur = cur
        if self._next_sample == 0 or now - self._next_sample > self._interval:
            self._next_sample = now // self._sample * self._sample
        while self._next_sample <= now:
            g = self._next_sample
            staff_before = g - self._staff_ms
            for v in self._visits.values():
                if not v.staff and v.start <= staff_before:
                    self._make_staff(v, since=g, new=True)
            counts = [*self._occ, self._staff]
            self._acc(g).samples.append(counts)
            self._recent_samples.append((g, counts))
            self._next_sample += self._sample
        horizon = now - self._keep_ms
        while self._recent_samples and self._recent_samples[0][0] < horizon:
            self._recent_samples.popleft()
        out = []
        for start, acc in list(self._open.items()):
            if acc.end + self.settle_ms <= now and acc is not self._cur:
                out.append(self._close(acc, partial=False))
                del self._open[start]
        self.last_tick_ms = now
        return out

    def flush(self) -> list[Pending]:
        """At stop: every open interval published now (`partial`), every visit forgotten."""
        out = [self._close(acc, partial=True) for acc in self._open.values()]
        self._open.clear()
        self._cur = None
        self._visits.clear()
        self._recent.clear()
        self._recent_samples.clear()
        self._occ = [0] * len(self.zones)
        self._staff = 0
        return out

    def _close(self, acc: _Acc, *, partial: bool) -> Pending:
        row = self._row(acc, partial=partial)
        acc.row = row
        self.suppressed_today += row["suppressed"] if acc.day == self._today() else 0
        acc.dwell, acc.samples = [], []  # the published row keeps what the snapshot needs
        today = self._today()
        self._closed = [a for a in self._closed if a.day == today]
        self._closed.append(acc)
        self.counters["intervals"] += 1
        return Pending(acc.end if not partial else self._clock.wall_ms(), "edge", EVENT_TYPE, row)

    def _today(self) -> date:
        return self._local(self._clock.wall_ms()).date()

    def _roll_day(self) -> None:
        today = self._today()
        if today != self._day:
            self._day = today
            self.suppressed_today = 0

    # -- publishing ----------------------------------------------------------------------

    def _row(self, acc: _Acc, *, partial: bool) -> dict[str, Any]:
        from edge.analytics.report import interval_row  # one module builds every published shape

        return interval_row(self, acc, partial=partial)

    def snapshot(self) -> dict[str, Any]:
        """Today's figures for the web page (shape in docs/analytics.md); no identifier."""
        from edge.analytics.report import snapshot

        self._roll_day()
        return snapshot(self)

    def ticker_started(self) -> None:
        """Called by `run_ticker`: from now on a missing tick is a health reason."""
        self.ticker_since = self._clock.wall_ms()

    def health_reason(self, stale_s: float = 15.0) -> str | None:
        """None while the ticker advances analytics, else a short reason (no identifiers):
        no `tick()` has completed for `stale_s` since the ticker started or last ticked."""
        if self.ticker_since is None:
            return None
        last = max(self.ticker_since, self.last_tick_ms or 0)
        idle = (self._clock.wall_ms() - last) / 1000
        if idle <= stale_s:
            return None
        return f"analytics: not advanced for {idle:.0f}s ({self.counters['tick_errors']} tick errors)"

    def status(self) -> dict[str, Any]:
        return {"visits": len(self._visits), "staff_present": self._staff, "open_intervals": len(self._open),
                **self.counters}
