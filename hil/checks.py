"""From a finished run (`RunData`) to figures and verdicts.

Sources of truth, independent of each other: what the peers emitted (their ledgers), what
the receiver stored (`events.jsonl`, its stats), what the daemon logged and left on disk, and
what crossed the wire (the capture). Each `Check` has a status (`pass`, `fail`, or `skip`
with the reason, e.g. a stimulus the stand-in cannot play), the figure measured and the
bound it was held to.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hil import leaks
from hil.daemon import read_log
from hil.peer import Ledger
from hil.runner import RunData, Window

Status = Literal["pass", "fail", "skip", "known"]


@dataclass(slots=True, frozen=True)
class Check:
    name: str
    status: Status
    figure: str
    expected: str
    detail: str = ""


@dataclass(slots=True)
class Analysis:
    checks: list[Check] = field(default_factory=list)
    known: Mapping[str, str] = field(default_factory=dict)  # check name -> open issue
    figures: dict[str, Any] = field(default_factory=dict)
    latency: list[tuple[int, int, bool]] = field(default_factory=list)  # (ts, latency ms, clean)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, ok: bool | None, figure: object, expected: str, detail: str = "") -> None:
        status: Status = "skip" if ok is None else "pass" if ok else "fail"
        if name in self.known:
            if status == "fail":
                status, detail = "known", self.known[name]
            elif status == "pass":
                detail = f"known issue no longer reproduces: {self.known[name]}"
        self.checks.append(Check(name, status, str(figure), expected, detail))


def pct(values: Sequence[int], p: float) -> int | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def read_events(data: RunData) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if data.events_path.exists():
        with data.events_path.open(encoding="utf-8") as fh:
            out.extend(json.loads(ln) for ln in fh if ln.strip())
    return out


@dataclass(slots=True, frozen=True)
class ChainFacts:
    batches: int
    epochs: int
    holes: int  # runs of missing seqs inside an epoch
    broken: int  # batches whose prev is not the hh of the stored batch before them


def chain_of(db: Path) -> ChainFacts:
    """Walk the receiver's stored batches (read-only): holes and broken links per epoch."""
    if not db.exists():
        return ChainFacts(0, 0, 0, 0)
    conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT epoch, seq, hh, prev FROM batches ORDER BY epoch, seq").fetchall()
    finally:
        conn.close()
    holes = broken = 0
    last: tuple[int, int, bytes] | None = None
    for epoch, seq, hh, prev in rows:
        if last is not None and last[0] == epoch:
            if seq != last[1] + 1:
                holes += 1
            elif prev != last[2]:
                broken += 1
        last = (epoch, seq, hh)
    return ChainFacts(len(rows), len({r[0] for r in rows}), holes, broken)


PRE_MS = 1000  # events captured this long before a fault may be caught by it


def _window_of(ts: int, windows: Iterable[Window], grace_ms: int) -> Window | None:
    """The last fault window holding capture time `ts` (from `PRE_MS` before it to `grace_ms` after)."""
    hit = None
    for w in windows:
        if w.start_ms - min(grace_ms, PRE_MS) <= ts <= w.end_ms + grace_ms:
            hit = w if hit is None or w.end_ms > hit.end_ms else hit
    return hit


def _bound(n: int, lo: int, hi: int | None) -> str:
    return f"{lo}..{hi}" if hi is not None else f">= {lo}"


async def analyse(data: RunData) -> Analysis:
    """Every expectation of the scenario, in the order of the report."""
    a = Analysis(known=data.scenario.expect.known_issues)
    for p in data.problems:
        a.add("run", False, p, "the run completes")
    events = read_events(data)
    by_src = Counter(str(e["src"]) for e in events)
    ledgers = {k: await p.ledger(by_src) for k, p in data.peers.items()}
    a.figures["peers"] = {k: {"mode": p.mode, "description": p.description} for k, p in data.peers.items()}
    _counts(a, data, events, ledgers)
    _delivery(a, data, events)
    _chain(a, data)
    _latency(a, data, events)
    _backlog(a, data)
    _daemon(a, data)
    idents = [i for lg in ledgers.values() for i in lg.identifiers]
    found = await asyncio.to_thread(leaks.scan, data.scan_paths, leaks.needles(idents))
    a.figures.update(identifiers_checked=len(set(idents)), leaks=[str(x) for x in found[:20]])
    a.add("leaks", len(found) <= data.scenario.expect.leaks, f"{len(found)} in db files, logs, receiver, wire "
          f"({len(set(idents))} identifiers)", f"<= {data.scenario.expect.leaks}")  # fmt: skip
    a.figures["steps"] = dict(Counter(s.outcome.applied for s in data.steps))
    return a


def _counts(a: Analysis, data: RunData, events: list[dict[str, Any]], ledgers: Mapping[str, Ledger]) -> None:
    """Events by type at the receiver, against bounds and against what the peers emitted."""
    ex = data.scenario.expect
    by_type = Counter(str(e["type"]) for e in events)
    a.figures["by_type"] = dict(sorted(by_type.items()))
    for etype, bound in sorted(ex.events.items()):
        n = by_type.get(etype, 0)
        a.add(f"events.{etype}", bound.min <= n and (bound.max is None or n <= bound.max), n,
              _bound(n, bound.min, bound.max))  # fmt: skip
    if ex.from_peers == "off":
        return
    power = [w for w in data.windows if w.kind == "power"]
    dropped = _reported_drops(events)
    for kind, ledger in ledgers.items():
        # what the daemon reported dropping of this source (or of every source) may be missing too
        lost = dropped.get(kind, 0) + dropped.get("*", 0)
        for etype, want in sorted(ledger.expected.items()):
            got, slack = by_type.get(etype, 0), _near(ledger, etype, power) + lost
            note = f" (-{slack} at power cuts / reported dropped)" if slack else ""
            if not ledger.exact:  # a radio: what the peer emitted is a minimum
                a.add(f"from_peers.{etype}", got >= want - slack, got, f">= {want} emitted (a radio: minimum){note}")
            elif ex.from_peers == "exact":
                a.add(f"from_peers.{etype}", got == want, got, f"{want} emitted")
            else:
                a.add(f"from_peers.{etype}", want - slack <= got <= want, got, f"{want} emitted{note}")


def _reported_drops(events: list[dict[str, Any]]) -> dict[str, int]:
    """edge.dropped counts by source; an unknown count (-1) counts as a huge loss."""
    out: dict[str, int] = {}
    for e in events:
        if e["type"] == "edge.dropped":
            n = int(e["data"].get("count", 0))
            src = str(e["data"].get("source"))
            out[src] = out.get(src, 0) + (10**9 if n < 0 else n)
    return out


def _near(ledger: Ledger, etype: str, windows: Sequence[Window]) -> int:
    """Stimuli of `etype` emitted around power cuts (the daemon may or may not have seen them)."""
    return sum(1 for t, et in ledger.emitted if et == etype
               and any(w.start_ms - PRE_MS <= t <= w.end_ms + PRE_MS for w in windows))  # fmt: skip


def _delivery(a: Analysis, data: RunData, events: list[dict[str, Any]]) -> None:
    """Every id the daemon assigned arrived once, or its loss was reported (edge.dropped)."""
    ex = data.scenario.expect
    ids = [int(e["id"]) for e in events]
    unique = set(ids)
    top_id = max([*unique, *[(s.next_event_id or 1) - 1 for s in data.samples]], default=0)
    drops = [e for e in events if e["type"] == "edge.dropped"]
    dropped = sum(max(0, int(e["data"].get("count", 0))) for e in drops)
    unknown_loss = any(int(e["data"].get("count", 0)) < 0 for e in drops)
    missing = top_id - len(unique)
    a.figures.update(events_received=len(unique), events_assigned=top_id, lines=len(ids), dropped=dropped,
                     missing=missing, drop_reasons=dict(Counter(
                         f"{e['data'].get('source')}/{e['data'].get('reason')}" for e in drops)))  # fmt: skip
    unexplained = max(0, missing - dropped)
    a.add("delivered", unexplained <= ex.missing_max or unknown_loss, f"{missing} missing, {dropped} reported dropped",
          f"missing - reported <= {ex.missing_max}", "a salvage reported an unknown loss" if unknown_loss else "")
    a.add("dropped", ex.dropped.min <= dropped and (ex.dropped.max is None or dropped <= ex.dropped.max), dropped,
          _bound(dropped, ex.dropped.min, ex.dropped.max))  # fmt: skip
    dupes = len(ids) - len(unique)
    a.add("duplicates", dupes <= ex.duplicates, dupes, f"<= {ex.duplicates} (receiver deduped "
          f"{data.receiver.duplicates} resent batches)")  # fmt: skip


def _chain(a: Analysis, data: RunData) -> None:
    """From what the receiver stored: every seq present, every prev linking; what it refused."""
    ex, r = data.scenario.expect, data.receiver
    ch = chain_of(data.workdir / "receiver" / "receiver.db")
    rejected = sum(r.rejected.values())
    a.figures.update(batches_accepted=r.accepted, batches_resent_deduped=r.duplicates, wire_batches=data.wire_batches,
                     rejected=dict(r.rejected), epochs=ch.epochs, seq_holes=ch.holes, broken_links=ch.broken,
                     out_of_order=r.gaps)  # fmt: skip
    resets = max(0, ch.epochs - 1)
    a.add("chain", ch.broken == 0 and rejected <= ex.chain.rejected and resets <= ex.chain.resets
          and ch.holes <= ex.chain.holes_max,
          f"{ch.batches} batches, {ch.holes} seq holes, {ch.broken} broken links, {resets} resets, "
          f"{rejected} rejected ({r.gaps} out-of-order arrivals)",
          f"0 broken, holes <= {ex.chain.holes_max}, resets <= {ex.chain.resets}, rejected <= {ex.chain.rejected}")


def _latency(a: Analysis, data: RunData, events: list[dict[str, Any]]) -> None:
    """Capture -> receiver outside fault windows; and how soon after a fault its events arrived."""
    ex = data.scenario.expect
    grace = int(ex.latency.grace * 1000)
    clean: list[int] = []
    late = worst = 0
    for e in events:
        if "received_ms" not in e:
            continue
        ts, rx = int(e["ts"]), int(e["received_ms"])
        w = _window_of(ts, data.windows, grace)
        a.latency.append((ts, rx - ts, w is None))
        if w is None:
            clean.append(rx - ts)
            continue
        worst = max(worst, rx - w.end_ms)
        if ex.recovery is not None and rx - w.end_ms > ex.recovery * 1000:
            late += 1
    lat = {"p50": pct(clean, 0.5), "p99": pct(clean, 0.99), "max": max(clean, default=None), "n": len(clean)}
    a.figures.update(latency_ms=lat, recovery_ms=worst)
    for key, limit in (("p50", ex.latency.p50_ms), ("p99", ex.latency.p99_ms), ("max", ex.latency.max_ms)):
        if limit is not None:
            v = lat[key]
            a.add(f"latency.{key}", None if v is None else v <= limit, f"{v} ms", f"<= {limit} ms",
                  "" if v is not None else "no event outside fault windows")  # fmt: skip
    if ex.recovery is not None:
        a.add("recovery", late == 0, f"worst {worst} ms after its fault, {late} later than bound",
              f"<= {ex.recovery * 1000:.0f} ms")  # fmt: skip


def _backlog(a: Analysis, data: RunData) -> None:
    ex = data.scenario.expect
    peak = max((s.backlog for s in data.samples if s.backlog is not None), default=0)
    a.figures.update(backlog_peak=peak, backlog_final=data.final_backlog)
    if ex.backlog.peak_min:
        a.add("backlog.peak", peak >= ex.backlog.peak_min, peak, f">= {ex.backlog.peak_min}")
    if ex.backlog.drained:
        a.add("backlog.drained", data.final_backlog == 0, data.final_backlog, "0 at the end")


def _daemon(a: Analysis, data: RunData) -> None:
    """From the daemon's logs and lives: driver degradations, salvage, clean stops, crashes."""
    ex = data.scenario.expect
    logs = [e for life in data.lives for e in read_log(life.log)]
    degraded = Counter(str(e.get("driver")) for e in logs if e.get("event") == "driver_degraded")
    a.figures["degraded"] = dict(degraded)
    unsupported = {s.kind for s in data.steps if s.outcome.applied == "unsupported" and s.kind}
    for name, want in sorted(ex.degraded.items()):
        kind = name.split(":")[0]
        n = degraded.get(name, 0)
        if kind in unsupported:
            a.add(f"degraded.{name}", None, n, f"degraded: {want}",
                  f"{kind} stimuli unsupported by its {data.peers[kind].mode}")  # fmt: skip
        else:
            a.add(f"degraded.{name}", (n > 0) == want, n, f"degraded: {want}")
    salvaged = any(e.get("event") == "buffer_corrupt_moved_aside" for e in logs)
    a.figures["salvaged"] = salvaged
    if ex.salvaged is not None:
        a.add("salvaged", salvaged == ex.salvaged, salvaged, str(ex.salvaged))
    storage = Counter(str(e.get("kind")) for e in logs if e.get("event") == "buffer_degraded")
    a.figures["storage_degraded"] = dict(storage)
    if ex.storage_degraded is not None:
        a.add("storage_degraded", bool(storage) == ex.storage_degraded, dict(storage) or "never",
              str(ex.storage_degraded))  # fmt: skip
    a.figures["lives"] = [{"n": lf.n, "ended_by": lf.ended_by, "exit": lf.exit_code, "stop_s": lf.stop_s}
                          for lf in data.lives]  # fmt: skip
    stops = [lf for lf in data.lives if lf.ended_by == "sigterm"]
    if ex.clean_stop:
        codes = [lf.exit_code for lf in stops]
        slowest = max((lf.stop_s or 0.0 for lf in stops), default=0.0)
        a.add("clean_stop", bool(stops) and all(c == 0 for c in codes),
              f"{len(stops)} SIGTERM stops, exit codes {codes}, slowest {slowest:.1f} s", "exit 0")  # fmt: skip
    crashed = [lf.n for lf in data.lives if lf.ended_by == "exited"]
    a.add("no_crash", not crashed, f"lives {crashed} exited by themselves" if crashed else "none", "none")
