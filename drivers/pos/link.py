"""One POS link's bytes -> readings, without the port: what the serial and sim backends share.

    bytes -> framer (by `framing`: lines, stx_etx, escpos, jsonl) -> frames, replies, problems
    frame -> Reading: `pos.receipt_text` {register} text {receipt} for a receipt's text (also
             a JSON object's "receipt"/"text"), `pos.receipt` for a structured JSON receipt
             (whitelisted by `ReceiptParser.from_json`)

Problems (bad input) are counted per reason and logged as `pos_bad_input` without any
content, at most once per reason per `LOG_EVERY_S`. Replies (ACK/NAK) go to the `reply`
callable the backend gives (the serial backend writes them on the line).
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable

import structlog

from drivers.pos.config import RULE_FLAGS, PosLink
from drivers.pos.framing import (
    EscPosFramer,
    Framer,
    JsonFrame,
    JsonLinesFramer,
    LinesFramer,
    Output,
    Problem,
    Reply,
    StxEtxFramer,
    TextFrame,
)
from drivers.pos.receipt import ReceiptParser
from edge.clock import Clock
from edge.events import Reading

LOG_EVERY_S = 10.0


def make_framer(link: PosLink) -> Framer:
    """The framer `link.framing` names, with the link's options."""
    enc, max_frame = link.text_encoding, link.max_frame
    term = link.terminator.encode("ascii")
    if link.framing == "lines":
        end = re.compile(link.receipt_end, RULE_FLAGS) if link.receipt_end else None
        return LinesFramer(terminator=term, encoding=enc, max_frame=max_frame, receipt_end=end)
    if link.framing == "stx_etx":
        return StxEtxFramer(encoding=enc, max_frame=max_frame, ack=link.ack)
    if link.framing == "escpos":
        return EscPosFramer(encoding=enc, max_frame=max_frame)
    return JsonLinesFramer(terminator=term, max_frame=max_frame)


def _no_reply(data: bytes) -> None:
    return None


class LinkDecoder:
    """Frames of one link waiting in `frames`; `problems` by reason, kept across `restart()`."""

    def __init__(self, link: PosLink, clock: Clock, reply: Callable[[bytes], None] = _no_reply) -> None:
        self._link = link
        self._clock = clock
        self._reply = reply
        self._parser = ReceiptParser(link.receipt)  # for jsonl's structured receipts
        self.framer: Framer = make_framer(link)
        self.frames: deque[TextFrame | JsonFrame] = deque()
        self.problems: Counter[str] = Counter()
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last log time, count then)
        self._log = structlog.get_logger("drivers.pos")

    def restart(self) -> None:
        """A fresh framer (the port was reopened); frames not taken yet are dropped."""
        self.framer = make_framer(self._link)
        self.frames.clear()

    def feed(self, data: bytes) -> None:
        self.handle(self.framer.feed(data))

    def idle(self) -> None:
        self.handle(self.framer.idle())

    def reset(self) -> None:
        self.handle(self.framer.reset())
        self.frames.clear()

    def handle(self, outs: list[Output]) -> None:
        for out in outs:
            if isinstance(out, TextFrame | JsonFrame):
                self.frames.append(out)
            elif isinstance(out, Reply):
                self._reply(out.data)
            else:
                self.problem(out)

    def problem(self, p: Problem) -> None:
        self.problems[p.reason] += 1
        total = self.problems[p.reason]
        now = self._clock.monotonic()
        last = self._logged.get(p.reason)
        if last is not None and now - last[0] < LOG_EVERY_S:
            return
        since = total - (last[1] if last is not None else 0)
        self._logged[p.reason] = (now, total)
        self._log.warning(
            "pos_bad_input", link=self._link.name, reason=p.reason, size=p.size, total=total, since_last_log=since
        )

    def reading(self, frame: TextFrame | JsonFrame) -> Reading | None:
        """The reading of one frame (None: a JSON object that is not a receipt, counted)."""
        ts = self._clock.wall_ms()
        register = self._link.name
        if isinstance(frame, TextFrame):
            return Reading(
                src="pos", type="pos.receipt_text", ts=ts, data={"register": register}, text={"receipt": frame.text}
            )
        text = frame.obj.get("receipt", frame.obj.get("text"))
        if isinstance(text, str):  # a receipt's text in JSON: scrubbed and parsed by the pipeline
            return Reading(
                src="pos", type="pos.receipt_text", ts=ts, data={"register": register}, text={"receipt": text}
            )
        data, ids = self._parser.from_json(frame.obj, register)
        if not (data["items"] or data["total_cents"] is not None or data["receipt_id"]):
            self.problem(Problem("json"))  # an object, but not a receipt
            return None
        return Reading(src="pos", type="pos.receipt", ts=ts, data=data, ids=ids)
