"""Framers: the bytes of one serial link -> messages. Pure, incremental, bounded.

Each framer takes bytes in chunks of any size (`feed`), as they come off the wire, and
returns what those bytes completed: receipt texts (`TextFrame`), JSON objects
(`JsonFrame`), bytes to answer on the line (`Reply`: ACK/NAK) and the problems it met
(`Problem`: counted and logged by the backend, never with content). It never raises on
input and never holds more than `max_frame` of a message (lines: the receipt so far plus
the line being received, each at most `max_frame`; ESC/POS: twice while probing a
suspect payload) plus a few bytes of an unfinished command, however long, fast or
malformed the stream is.

- `LinesFramer`   text lines (`terminator`, `encoding`) grouped into receipts: a receipt
                  ends at a form feed, at a line matching `receipt_end`, or at `idle()`
                  (the backend calls it when the line went quiet).
- `StxEtxFramer`  STX <message> ETX <LRC>; LRC = XOR of every byte after STX up to and
                  including ETX. Answers ACK (good) / NAK (bad LRC, oversize) and ACK to
                  ENQ when `ack` is on. Bytes between frames are noise.
- `EscPosFramer`  the tap between a POS and its ESC/POS receipt printer: printable text
                  is kept, commands are skipped with their parameters (raster images
                  GS v 0, GS ( ..., barcodes GS k, ...), code pages follow ESC t, and a
                  paper cut (GS V, ESC i, ESC m) ends the receipt. Noise that declares a
                  payload cannot swallow later receipts: the skip is capped, ends at
                  idle(), and a clean receipt from an ESC @ inside it ends it; noise
                  text is counted `noise`, never a receipt.
- `JsonLinesFramer` one JSON object per line (UTF-8).

Text from every framer is free of control characters except newlines and tabs.
"""

from __future__ import annotations

import json
import re
from functools import reduce
from operator import xor
from typing import Literal

from drivers.pos.escpos import EscPosFramer
from drivers.pos.frames import (
    ACK,
    CONTROLS,
    ENQ,
    ETX,
    NAK,
    Framer,
    JsonFrame,
    Output,
    Problem,
    ProblemReason,
    ReceiptLines,
    Reply,
    TextFrame,
    clean_text,
    decode,
)

__all__ = [
    "EscPosFramer",
    "Framer",
    "JsonFrame",
    "JsonLinesFramer",
    "LinesFramer",
    "Output",
    "Problem",
    "ProblemReason",
    "Reply",
    "StxEtxFramer",
    "TextFrame",
    "clean_text",
    "lrc",
]

class _LineSplitter:
    """Bytes -> complete lines (terminator removed), each at most `max_len` bytes.

    A longer line is dropped as it streams (only the last few bytes are kept, in case they
    start the terminator) and reported once as oversize.
    """

    def __init__(self, terminator: bytes, max_len: int) -> None:
        if not terminator:
            raise ValueError("empty terminator")
        self._term = terminator
        self._max = max_len
        self._buf = bytearray()
        self._discarding = False
        self._dropped = 0

    def feed(self, data: bytes) -> tuple[list[bytes], list[Problem]]:
        lines: list[bytes] = []
        problems: list[Problem] = []
        term, tlen, buf = self._term, len(self._term), self._buf
        scan = max(0, len(buf) - tlen + 1)
        buf += data
        start = 0
        while True:
            idx = buf.find(term, max(scan, start))
            if idx < 0:
                break
            if self._discarding:
                problems.append(Problem("oversize", self._dropped + idx - start))
                self._discarding = False
                self._dropped = 0
            elif idx - start > self._max:
                problems.append(Problem("oversize", idx - start))
            else:
                lines.append(bytes(buf[start:idx]))
            start = idx + tlen
        del buf[:start]
        if len(buf) > self._max:  # no terminator within max_len: drop as it streams
            keep = tlen - 1
            cut = len(buf) - keep
            self._dropped += cut
            self._discarding = True
            del buf[:cut]
        return lines, problems

    def flush(self) -> tuple[bytes | None, Problem | None]:
        """End the current line early: its bytes (None when empty), or the oversize
        problem of a line being discarded."""
        if self._discarding:
            problem = Problem("oversize", self._dropped + len(self._buf))
            self.reset()
            return None, problem
        rest = bytes(self._buf) if self._buf else None
        self._buf.clear()
        return rest, None

    def reset(self) -> int:
        n = len(self._buf) + self._dropped
        self._buf.clear()
        self._discarding = False
        self._dropped = 0
        return n

    @property
    def buffered(self) -> int:
        return len(self._buf)


class LinesFramer:
    """Text lines grouped into receipts (see the module docstring)."""

    def __init__(
        self,
        *,
        terminator: bytes = b"\n",
        encoding: str = "utf-8",
        max_frame: int = 64 * 1024,
        receipt_end: re.Pattern[str] | None = None,
    ) -> None:
        self._split = _LineSplitter(terminator, max_frame)
        self._encoding = encoding
        self._receipt = ReceiptLines(max_frame)
        self._end = receipt_end
        self._ff = b"\f" not in terminator  # a form feed ends a receipt (unless it ends lines)

    def feed(self, data: bytes) -> list[Output]:
        outs: list[Output] = []
        parts = data.split(b"\f") if self._ff else [data]
        for i, part in enumerate(parts):
            if i:  # a form feed: the line so far is the receipt's last
                self._flush_line(outs)
                self._close(outs)
            lines, problems = self._split.feed(part)
            outs += problems
            for raw in lines:
                self._line(raw, outs)
        return outs

    def _line(self, raw: bytes, outs: list[Output]) -> None:
        text, ok = decode(raw, self._encoding)
        if not ok:
            outs.append(Problem("decode", len(raw)))
        text = CONTROLS.sub("", text)
        self._receipt.add(text)
        if self._end is not None and self._end.search(text):
            self._close(outs)

    def _flush_line(self, outs: list[Output]) -> None:
        rest, problem = self._split.flush()
        if problem is not None:
            outs.append(problem)
        if rest is not None:
            self._line(rest, outs)

    def _close(self, outs: list[Output]) -> None:
        done = self._receipt.end()
        if done is not None:
            outs.append(done)

    def idle(self) -> list[Output]:
        outs: list[Output] = []
        self._flush_line(outs)
        self._close(outs)
        return outs

    def reset(self) -> list[Output]:
        n = self._split.reset() + self._receipt.discard()
        return [Problem("truncated", n)] if n else []

    @property
    def buffered(self) -> int:
        return self._split.buffered + self._receipt.size


class StxEtxFramer:
    """STX <message> ETX <LRC> frames (see the module docstring)."""

    def __init__(self, *, encoding: str = "utf-8", max_frame: int = 64 * 1024, ack: bool = False) -> None:
        self._encoding = encoding
        self._max = max_frame
        self._ack = ack
        self._state: Literal["idle", "body", "lrc"] = "idle"
        self._body = bytearray()
        self._overflow = 0

    def feed(self, data: bytes) -> list[Output]:
        outs: list[Output] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == "idle":
                j = data.find(b"\x02", i)
                end = n if j < 0 else j
                if end > i:
                    self._between(data[i:end], outs)
                if j < 0:
                    break
                self._state, i = "body", j + 1
            elif self._state == "body":
                j = data.find(b"\x03", i)
                k = data.find(b"\x02", i, n if j < 0 else j)
                stop = k if k >= 0 else (n if j < 0 else j)
                self._append(data[i:stop])
                if k >= 0:  # a new STX before ETX: the sender gave up on that frame
                    outs.append(Problem("truncated", len(self._body) + self._overflow))
                    self._body.clear()
                    self._overflow = 0
                    i = k + 1
                elif j >= 0:
                    self._state, i = "lrc", j + 1
                else:
                    i = n
            else:
                self._finish(data[i], outs)
                self._state, i = "idle", i + 1
        return outs

    def _between(self, chunk: bytes, outs: list[Output]) -> None:
        enq = chunk.count(ENQ)
        if enq and self._ack:
            outs.extend(Reply(bytes([ACK])) for _ in range(enq))
        benign = enq + sum(chunk.count(c) for c in (b"\x00", b"\x04", b"\x06", b"\x15", b"\r", b"\n"))
        if len(chunk) > benign:
            outs.append(Problem("noise", len(chunk) - benign))

    def _append(self, chunk: bytes) -> None:
        if self._overflow:
            self._overflow += len(chunk)
        elif len(self._body) + len(chunk) > self._max:
            self._overflow = len(self._body) + len(chunk)
            self._body.clear()
        else:
            self._body += chunk

    def _finish(self, lrc: int, outs: list[Output]) -> None:
        body, overflow = bytes(self._body), self._overflow
        self._body.clear()
        self._overflow = 0
        if overflow:
            outs.append(Problem("oversize", overflow))
            ok = False
        elif reduce(xor, body, ETX) != lrc:
            outs.append(Problem("lrc", len(body)))
            ok = False
        else:
            text, decoded = decode(body, self._encoding)
            if not decoded:
                outs.append(Problem("decode", len(body)))
            text = clean_text(text)
            if text:
                outs.append(TextFrame(text))
            ok = True
        if self._ack:
            outs.append(Reply(bytes([ACK if ok else NAK])))

    def idle(self) -> list[Output]:
        return []

    def reset(self) -> list[Output]:
        n = len(self._body) + self._overflow + (1 if self._state != "idle" else 0)
        self._body.clear()
        self._overflow = 0
        self._state = "idle"
        return [Problem("truncated", n)] if n else []

    @property
    def buffered(self) -> int:
        return len(self._body)


def lrc(message: bytes) -> int:
    """The LRC of a STX/ETX frame carrying `message`: XOR of message bytes and ETX."""
    return reduce(xor, message, ETX)


class JsonLinesFramer:
    """One JSON object per line; anything else on a line is dropped as `json`."""

    def __init__(self, *, terminator: bytes = b"\n", max_frame: int = 64 * 1024) -> None:
        self._split = _LineSplitter(terminator, max_frame)

    def feed(self, data: bytes) -> list[Output]:
        lines, problems = self._split.feed(data)
        outs: list[Output] = list(problems)
        for raw in lines:
            self._line(raw, outs)
        return outs

    def _line(self, raw: bytes, outs: list[Output]) -> None:
        if not raw.strip():
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            outs.append(Problem("decode", len(raw)))
            return
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, huge ints, deep nesting
            outs.append(Problem("json", len(raw)))
            return
        if isinstance(obj, dict):
            outs.append(JsonFrame(obj))
        else:
            outs.append(Problem("json", len(raw)))

    def idle(self) -> list[Output]:
        outs: list[Output] = []
        rest, problem = self._split.flush()
        if problem is not None:
            outs.append(problem)
        if rest is not None:
            self._line(rest, outs)
        return outs

    def reset(self) -> list[Output]:
        n = self._split.reset()
        return [Problem("truncated", n)] if n else []

    @property
    def buffered(self) -> int:
        return self._split.buffered
