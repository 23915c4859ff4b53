"""The event pipeline, in one place: driver readings -> stages -> durable buffer.

    driver.readings()            (drivers/: BLE, NFC, POS backends; may carry raw identifiers)
        |  Reading
    CardScrubStage               card numbers removed from all text before any other stage sees it
        |  Reading
    NormalizeStage               per-source shaping (POS receipt text -> structured receipt), clock flag
        |  Reading
    PrivacyStage                 identifiers -> pseudonyms (or dropped); e-mail/phone in text scrubbed
        |  Pending               (no raw identifier past this point)
    Buffer.put()                 group commit into SQLite; the buffer assigns the event id
        |  Event
    uplink                       sealed, signed batches (edge/uplink/)

Each stage is a plain callable built once with its state, testable as `stage(reading)`.
A stage that raises rejects that one reading: it is counted and logged (without its
content) and the pipeline goes on. Parsers of device bytes never crash the daemon.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Any, Protocol, TypeVar

import structlog

from drivers.pos.receipt import ReceiptParser, parse_receipt
from edge.clock import Clock
from edge.events import Pending, Reading
from edge.privacy.stage import CardScrubStage, PrivacyStage

log = structlog.get_logger("edge.pipeline")

ReadingStage = Callable[[Reading], Reading]
T = TypeVar("T")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SKEW_MS = 24 * 3600 * 1000
# capture times before this (2025-01-01T00:00Z, before this software existed) are a device or
# driver clock gone wrong (a Pi without RTC boots near 1970), even when the box's clock is synced
PAST_FLOOR_MS = 1_735_689_600_000
_MAX_TYPES = 1024  # bound on remembered valid event types


class Sink(Protocol):
    async def put(self, p: Pending) -> None: ...

    def put_nowait(self, p: Pending) -> bool:
        """Queue `p` if there is room now; False (and nothing done) when `put` would wait."""
        ...


class NormalizeStage:
    """Per-source shaping into the event model.

    - `pos.receipt_text` (receipt lines from a POS tap, already card-scrubbed) becomes a
      structured `pos.receipt` by its link's rules (`receipt_parsers`, keyed by the link
      name = the reading's `register`; default rules otherwise); the loyalty number stays an
      identifier for the next stage.
    - The event type must be a dotted lowercase name.
    - When the wall clock is not NTP-synchronized, or a capture time lies more than a day
      in the future, or before `PAST_FLOOR_MS`, the event says so (`clock: "unsynced"` /
      `"future"` / `"past"`) instead of silently carrying a wrong time.
    """

    def __init__(self, clock: Clock, receipt_parsers: Mapping[str, ReceiptParser] | None = None) -> None:
        self._parsers = dict(receipt_parsers or {})
        self._synchronized = clock.synchronized
        self._wall_ms = clock.wall_ms
        self._types: set[str] = set()  # event types already checked (a driver has a handful)

    def set_parsers(self, receipt_parsers: Mapping[str, ReceiptParser]) -> None:
        """New receipt rules (a POS link reconfigured while running), from the next reading on."""
        self._parsers = dict(receipt_parsers)

    def __call__(self, r: Reading) -> Reading:
        typ = r.type
        if typ in self._types:
            pass
        elif typ == "pos.receipt_text":
            text = r.text.get("receipt", "")
            register = str(r.data.get("register", ""))
            data, ids = parse_receipt(text, register, self._parsers.get(register))
            r = Reading("pos", "pos.receipt", r.ts, data, ids)
        elif _TYPE_RE.match(typ):
            if len(self._types) < _MAX_TYPES:
                self._types.add(typ)
        else:
            raise ValueError("event type is not a dotted lowercase name")
        if not self._synchronized():
            flag = "unsynced"
        elif r.ts > self._wall_ms() + _SKEW_MS:
            flag = "future"
        elif r.ts < PAST_FLOOR_MS:
            flag = "past"
        else:
            return r
        return Reading(r.src, r.type, r.ts, {**r.data, "clock": flag}, r.ids, r.text)


class Pipeline:
    """Runs readings through the stages into the sink; counts what it rejects.

    Per reading: the stages run synchronously, then the sink takes the event without a
    context switch while its queue has room (`put_nowait`), and only otherwise `submit`
    waits (backpressure). `pump` feeds a whole async iterator of readings that way.
    """

    def __init__(
        self,
        pre: Sequence[ReadingStage],
        privacy: Callable[[Reading], Pending],
        sink: Sink,
    ) -> None:
        self._pre = tuple(pre)
        self._privacy = privacy
        self._sink = sink
        self._run = _compose([_direct(s) for s in self._pre], _direct(privacy))
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def set_receipt_parsers(self, receipt_parsers: Mapping[str, ReceiptParser]) -> None:
        for stage in self._pre:
            if isinstance(stage, NormalizeStage):
                stage.set_parsers(receipt_parsers)

    def process(self, r: Reading) -> Pending | None:
        """Apply every stage; None when a stage rejected the reading."""
        try:
            return self._run(r)
        except Exception as exc:
            self._reject(r, exc)
            return None

    def _reject(self, r: Reading, exc: Exception) -> None:
        self.rejected[r.src] += 1
        # the reading itself may hold raw identifiers: log only its shape
        log.warning("reading_rejected", src=r.src, type=r.type, error=type(exc).__name__)

    async def submit(self, r: Reading) -> None:
        """Process one reading into the sink, waiting only while the sink is full."""
        p = self.process(r)
        if p is not None:
            if not self._sink.put_nowait(p):
                await self._sink.put(p)
            self.accepted[p.src] += 1

    async def pump(self, readings: AsyncIterable[Reading]) -> None:
        """`submit` every reading of `readings` (a driver's stream) until it ends."""
        run = self._run
        put_nowait = self._sink.put_nowait
        put = self._sink.put
        accepted = self.accepted
        async for r in readings:
            try:
                p = run(r)
            except Exception as exc:
                self._reject(r, exc)
                continue
            if not put_nowait(p):
                await put(p)
            accepted[p.src] += 1

    def status(self) -> dict[str, Any]:
        return {"accepted": dict(self.accepted), "rejected": dict(self.rejected)}


def _direct(stage: Callable[[Reading], T]) -> Callable[[Reading], T]:
    """The stage's bound `__call__` for a stage object: calling that is ~3x cheaper per
    reading than calling the object (which looks `__call__` up on every call)."""
    if isinstance(stage, (FunctionType, MethodType, BuiltinFunctionType)):
        return stage
    call: Callable[[Reading], T] = getattr(stage, "__call__")  # noqa: B004, B009 - binds it; mypy rejects stage.__call__
    return call


def _compose(pre: Sequence[ReadingStage], last: Callable[[Reading], Pending]) -> Callable[[Reading], Pending]:
    """One function applying `pre` in order, then `last` (unrolled for the usual lengths)."""
    if not pre:
        return last
    if len(pre) == 1:
        (a,) = pre
        return lambda r: last(a(r))
    if len(pre) == 2:  # the standard pipeline: card scrub, normalize
        a, b = pre
        return lambda r: last(b(a(r)))

    def run(r: Reading) -> Pending:
        for stage in pre:
            r = stage(r)
        return last(r)

    return run


def build_pipeline(
    clock: Clock,
    privacy: PrivacyStage,
    sink: Sink,
    *,
    receipt_parsers: Mapping[str, ReceiptParser] | None = None,
) -> tuple[Pipeline, CardScrubStage]:
    """The standard pipeline: card scrub -> normalize -> privacy -> sink."""
    cards = CardScrubStage()
    return Pipeline([cards, NormalizeStage(clock, receipt_parsers)], privacy, sink), cards
