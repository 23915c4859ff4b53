"""What the POS framers produce, and the pieces they share.

`TextFrame` (a receipt's text), `JsonFrame` (one JSON object), `Reply` (bytes to answer
on the line) and `Problem` (bad input met: a reason and a size, never content); the
`Framer` protocol; text cleaning and decoding; `ReceiptLines`, a receipt being assembled
line by line within a size bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

ProblemReason = Literal["oversize", "decode", "lrc", "noise", "truncated", "json", "command"]

STX, ETX, EOT, ENQ, ACK, NAK = 0x02, 0x03, 0x04, 0x05, 0x06, 0x15
ESC, GS, FS, DLE, LF, CR, HT, FF = 0x1B, 0x1D, 0x1C, 0x10, 0x0A, 0x0D, 0x09, 0x0C


@dataclass(slots=True, frozen=True)
class TextFrame:
    """One message of text (a receipt); lines separated by "\\n"."""

    text: str


@dataclass(slots=True, frozen=True)
class JsonFrame:
    """One JSON object (jsonl framing)."""

    obj: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Reply:
    """Bytes the backend must write back on the line (ACK / NAK)."""

    data: bytes


@dataclass(slots=True, frozen=True)
class Problem:
    """Bad input met: `size` bytes concerned (0 when unknown). Carries no content."""

    reason: ProblemReason
    size: int = 0


Output = TextFrame | JsonFrame | Reply | Problem


class Framer(Protocol):
    def feed(self, data: bytes) -> list[Output]:
        """Outputs completed by these bytes, in stream order."""
        ...

    def idle(self) -> list[Output]:
        """The line went quiet: end what a silence ends (a partial receipt, lines framing)."""
        ...

    def reset(self) -> list[Output]:
        """The link was lost: forget any partial message (reported as `truncated`)."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes or characters held for unfinished messages (bounded by ~max_frame)."""
        ...


CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(s: str) -> str:
    """Newlines normalized to "\\n", other control characters removed, lines right-stripped,
    blank lines at both ends dropped."""
    s = CONTROLS.sub("", s.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in s.split("\n")).strip("\n")


def decode(raw: bytes, encoding: str) -> tuple[str, bool]:
    """(text, ok): invalid bytes become U+FFFD and ok is False."""
    try:
        return raw.decode(encoding), True
    except UnicodeDecodeError:
        return raw.decode(encoding, "replace"), False


class ReceiptLines:
    """Lines of one receipt being assembled, bounded to `max_chars` characters; past the
    bound the receipt is dropped (its lines are only counted) and reported at its end."""

    def __init__(self, max_chars: int) -> None:
        self._max = max_chars
        self._lines: list[str] = []
        self._size = 0
        self._overflow = 0

    def add(self, line: str) -> None:
        self.spill(len(line) + 1) if self._overflow else self._append(line)

    def _append(self, line: str) -> None:
        self._size += len(line) + 1
        if self._size > self._max:
            self.spill(0)
        else:
            self._lines.append(line)

    def spill(self, n: int) -> None:
        """Mark the receipt over its bound (`n` more characters were lost)."""
        self._overflow += self._size + n
        self._lines.clear()
        self._size = 0

    def end(self) -> Output | None:
        """Close the receipt: its text, an oversize problem, or None when it was blank."""
        out: Output | None
        if self._overflow:
            out = Problem("oversize", self._overflow)
        else:
            text = clean_text("\n".join(self._lines))
            out = TextFrame(text) if text else None
        self.discard()
        return out

    def discard(self) -> int:
        n = self._size + self._overflow
        self._lines.clear()
        self._size = 0
        self._overflow = 0
        return n

    @property
    def size(self) -> int:
        return self._size
