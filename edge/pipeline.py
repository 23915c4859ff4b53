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
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import structlog

from drivers.pos.receipt import parse_receipt
from edge.clock import Clock
from edge.events import Pending, Reading
from edge.privacy.stage import CardScrubStage, PrivacyStage

log = structlog.get_logger("edge.pipeline")

ReadingStage = Callable[[Reading], Reading]
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SKEW_MS = 24 * 3600 * 1000


class Sink(Protocol):
    async def put(self, p: Pending) -> None: ...


class NormalizeStage:
    """Per-source shaping into the event model.

    - `pos.receipt_text` (receipt lines from a POS tap, already card-scrubbed) becomes a
      structured `pos.receipt`; the loyalty number stays an identifier for the next stage.
    - The event type must be a dotted lowercase name.
    - When the wall clock is not NTP-synchronized, or a capture time lies more than a day
      in the future, the event says so (`clock: "unsynced"` / `"future"`) instead of
      silently carrying a wrong time.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def __call__(self, r: Reading) -> Reading:
        if r.type == "pos.receipt_text":
            text = r.text.get("receipt", "")
            register = str(r.data.get("register", ""))
            data, ids = parse_receipt(text, register)
            r = Reading(src="pos", type="pos.receipt", ts=r.ts, data=data, ids=ids)
        elif not _TYPE_RE.match(r.type):
            raise ValueError("event type is not a dotted lowercase name")
        flag = None
        if not self._clock.synchronized():
            flag = "unsynced"
        elif r.ts > self._clock.wall_ms() + _SKEW_MS:
            flag = "future"
        if flag is not None:
            r = replace(r, data={**r.data, "clock": flag})
        return r


class Pipeline:
    """Runs readings through the stages into the sink; counts what it rejects."""

    def __init__(
        self,
        pre: Sequence[ReadingStage],
        privacy: Callable[[Reading], Pending],
        sink: Sink,
    ) -> None:
        self._pre = tuple(pre)
        self._privacy = privacy
        self._sink = sink
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def process(self, r: Reading) -> Pending | None:
        """Apply every stage; None when a stage rejected the reading."""
        try:
            for stage in self._pre:
                r = stage(r)
            return self._privacy(r)
        except Exception as exc:
            self.rejected[r.src] += 1
            # the reading itself may hold raw identifiers: log only its shape
            log.warning("reading_rejected", src=r.src, type=r.type, error=type(exc).__name__)
            return None

    async def submit(self, r: Reading) -> None:
        p = self.process(r)
        if p is not None:
            await self._sink.put(p)
            self.accepted[p.src] += 1

    def status(self) -> dict[str, Any]:
        return {"accepted": dict(self.accepted), "rejected": dict(self.rejected)}


def build_pipeline(clock: Clock, privacy: PrivacyStage, sink: Sink) -> tuple[Pipeline, CardScrubStage]:
    """The standard pipeline: card scrub -> normalize -> privacy -> sink."""
    cards = CardScrubStage()
    return Pipeline([cards, NormalizeStage(clock)], privacy, sink), cards
