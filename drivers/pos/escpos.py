"""The ESC/POS receipt tap: the byte stream between a POS and its receipt printer -> the
receipts' text.

Printable bytes are text in the current code page (ESC t; ESC @ resets to the configured
encoding); LF, FF and the print-and-feed commands end a line; every other command is
skipped with its parameters and payload: raster images (GS v 0), bit images (ESC *, GS *),
graphics and 2D codes (GS ( ..., GS 8 L, ESC ( ..., FS ( ...), barcodes (GS k), drawer
kicks, real-time requests (DLE ...). A paper cut (GS V, ESC i, ESC m) ends the receipt.
An unknown command, or a payload command with an implausible header (GS v not followed by
`0` and a valid mode, ESC * with a bad mode, GS ( / ESC ( / FS ( without a function
letter, GS 8 not followed by L), skips its selector byte and is counted.

Line noise can look like a command declaring a long payload, and skipping it would swallow
the receipts after it. So a payload skip
- is capped at `max(max_frame, 64 KiB)` (counted `oversize`): payloads are never held, so
  an image may be larger than the text bound, but a logo is ~20 KiB;
- ends at idle() (a real payload streams without a pause);
- is probed at every ESC @ (initialize) inside it: a second framer parses from there, and
  if it reaches a paper cut with a non-blank receipt and without meeting any problem, the
  payload was noise (counted `command`): the probe's state and receipt are taken over and
  the partial receipt before the noise is dropped (counted `truncated`). Image data that
  happens to contain ESC @ makes the probe meet a problem or reach the payload's end
  first, and the payload is skipped as declared.
Noise text is not a receipt: a "receipt" holding many stray control bytes or bad commands
and mostly non-ASCII text (see `_Junk`) is counted `noise` when a cut-like byte pair ends
it or an ESC @ follows it (the next real receipt then starts clean).
Only the receipt so far, its unfinished line included (at most `max_frame` together; twice
while probing) and a few bytes of an unfinished command header are held; payloads are
skipped as they stream by.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from drivers.pos.frames import (
    CR,
    DLE,
    ENQ,
    EOT,
    ESC,
    FF,
    FS,
    GS,
    HT,
    LF,
    Output,
    Problem,
    ReceiptLines,
    TextFrame,
    decode,
)

# ESC t n -> Python codec (Epson code page numbers; single-byte pages only)
CODE_PAGES = {
    0: "cp437", 2: "cp850", 3: "cp860", 4: "cp863", 5: "cp865", 13: "cp857", 14: "cp737",
    15: "iso8859-7", 16: "cp1252", 17: "cp866", 18: "cp852", 19: "cp858", 32: "cp720",
    33: "cp775", 34: "cp855", 35: "cp861", 36: "cp862", 37: "cp864", 38: "cp869",
    39: "iso8859-2", 40: "iso8859-15", 45: "cp1250", 46: "cp1251", 47: "cp1253",
    48: "cp1254", 49: "cp1255", 50: "cp1256", 51: "cp1257", 52: "cp1258",
}
_PRINTABLE_RUN = re.compile(rb"[^\x00-\x1f\x7f]+")
# commands with a fixed number of parameter bytes after the command byte
_ESC_FIXED = {
    **dict.fromkeys(b"@2<LS\x0cim", 0),
    **dict.fromkeys(b"!-EGMadeJKtR 3AU+Vr{%?T=u", 1),
    **dict.fromkeys(b"$\\cBf", 2),
    **dict.fromkeys(b"p", 3),
    **dict.fromkeys(b"W", 8),
}
_GS_FIXED = {
    **dict.fromkeys(b":", 0),
    **dict.fromkeys(b"!BHfhwabrIETjZ/|", 1),
    **dict.fromkeys(b"LW$\\P", 2),
    **dict.fromkeys(b"^", 3),
    **dict.fromkeys(b"g", 4),
}
_FS_FIXED = {**dict.fromkeys(b"&.", 0), **dict.fromkeys(b"!-CW", 1), **dict.fromkeys(b"Sp", 2)}
# (prefix, command byte) -> number of fixed parameter bytes
_FIXED = {
    **{(ESC, c): k for c, k in _ESC_FIXED.items()},
    **{(GS, c): k for c, k in _GS_FIXED.items()},
    **{(FS, c): k for c, k in _FS_FIXED.items()},
    (DLE, EOT): 1,
    (DLE, ENQ): 1,
}
_MIN_SKIP_CAP = 64 * 1024  # payload skips are capped at max(max_frame, this); logos are ~20 KiB
_MAX_NUL_RUN = 256  # NUL-terminated parameters (barcode data, tab stops) are short

CmdKind = Literal["none", "cut", "init", "feed", "codepage", "unknown"]
_KINDS: dict[tuple[int, int], CmdKind] = {
    (ESC, ord("i")): "cut",
    (ESC, ord("m")): "cut",
    (ESC, ord("@")): "init",
    (ESC, ord("d")): "feed",
    (ESC, ord("J")): "feed",
    (ESC, FF): "feed",
}
Buf = bytes | bytearray


@dataclass(slots=True, frozen=True)
class _Cmd:
    length: int  # bytes of the command itself (prefix, selector, fixed parameters)
    skip: int = 0  # payload bytes that follow
    until_nul: bool = False  # payload runs to a NUL byte
    kind: CmdKind = "none"
    arg: int = 0


def _u16(buf: Buf, at: int) -> int:
    return buf[at] + 256 * buf[at + 1]


_UNKNOWN = _Cmd(2, kind="unknown")  # an implausible header: skip the selector, resync after
_RASTER_MODES = frozenset((0, 1, 2, 3, 48, 49, 50, 51))


def _prefixed(buf: Buf, i: int) -> _Cmd | None:
    """ESC|GS|FS ( fn pL pH <p bytes>: 2D codes, graphics, settings (fn is a letter)."""
    if len(buf) - i < 5:
        return None
    fn = buf[i + 2] | 0x20  # lower-cased
    return _Cmd(5, skip=_u16(buf, i + 3)) if 0x61 <= fn <= 0x7A else _UNKNOWN


def _bit_image(buf: Buf, i: int) -> _Cmd | None:
    """ESC * m nL nH d1..dk: k = n columns of 1 (8-dot, m 0|1) or 3 (24-dot, m 32|33) bytes."""
    if len(buf) - i < 5:
        return None
    m = buf[i + 2]
    if m not in (0, 1, 32, 33):
        return _UNKNOWN
    return _Cmd(5, skip=_u16(buf, i + 3) * (1 if m < 32 else 3))


def _codepage(buf: Buf, i: int) -> _Cmd | None:
    return None if len(buf) - i < 3 else _Cmd(3, kind="codepage", arg=buf[i + 2])


def _cut(buf: Buf, i: int) -> _Cmd | None:
    """GS V m, or GS V m n for the feed-and-cut variants."""
    if len(buf) - i < 3:
        return None
    length = 4 if buf[i + 2] in (65, 66, 97, 98, 103, 104) else 3
    return None if len(buf) - i < length else _Cmd(length, kind="cut")


def _raster(buf: Buf, i: int) -> _Cmd | None:
    """GS v 0 m xL xH yL yH d1..dk: k = x bytes * y dots."""
    if len(buf) - i < 8:
        return None
    if buf[i + 2] != ord("0") or buf[i + 3] not in _RASTER_MODES:
        return _UNKNOWN
    return _Cmd(8, skip=_u16(buf, i + 4) * _u16(buf, i + 6))


def _barcode(buf: Buf, i: int) -> _Cmd | None:
    """GS k m d1..dk NUL (m <= 6), or GS k m n d1..dn."""
    if len(buf) - i < 3:
        return None
    if buf[i + 2] <= 6:
        return _Cmd(3, until_nul=True)
    return None if len(buf) - i < 4 else _Cmd(4, skip=buf[i + 3])


def _graphics32(buf: Buf, i: int) -> _Cmd | None:
    """GS 8 L p1 p2 p3 p4 ...: large graphics with a 32-bit length."""
    if len(buf) - i < 7:
        return None
    if buf[i + 2] != ord("L"):
        return _UNKNOWN
    return _Cmd(7, skip=int.from_bytes(buf[i + 3 : i + 7], "little"))


def _downloaded_image(buf: Buf, i: int) -> _Cmd | None:
    """GS * x y d1..d(x*y*8)."""
    return None if len(buf) - i < 4 else _Cmd(4, skip=buf[i + 2] * buf[i + 3] * 8)


def _dle_dc4(buf: Buf, i: int) -> _Cmd | None:
    """DLE DC4 fn ...: real-time requests (drawer pulse, power off, buffer clear)."""
    return None if len(buf) - i < 3 else _Cmd({1: 5, 2: 5, 7: 4, 8: 10}.get(buf[i + 2], 3))


def _tab_stops(buf: Buf, i: int) -> _Cmd | None:
    return _Cmd(2, until_nul=True)


def _user_chars(buf: Buf, i: int) -> _Cmd | None:
    """ESC & y c1 c2 ...: user-defined characters; too irregular to follow, resync after."""
    return None if len(buf) - i < 5 else _Cmd(5, kind="unknown")


_SPECIAL: dict[tuple[int, int], Callable[[Buf, int], _Cmd | None]] = {
    (ESC, ord("(")): _prefixed,
    (GS, ord("(")): _prefixed,
    (FS, ord("(")): _prefixed,
    (ESC, ord("*")): _bit_image,
    (ESC, ord("t")): _codepage,
    (ESC, ord("D")): _tab_stops,
    (ESC, ord("&")): _user_chars,
    (GS, ord("V")): _cut,
    (GS, ord("v")): _raster,
    (GS, ord("k")): _barcode,
    (GS, ord("8")): _graphics32,
    (GS, ord("*")): _downloaded_image,
    (DLE, 0x14): _dle_dc4,
}


def _command(buf: Buf, i: int) -> _Cmd | None:
    """The command starting at buf[i] (ESC, GS, FS or DLE), or None if more bytes are needed."""
    if len(buf) - i < 2:
        return None
    key = (buf[i], buf[i + 1])
    special = _SPECIAL.get(key)
    if special is not None:
        cmd = special(buf, i)
        return None if cmd is None or cmd.length > len(buf) - i else cmd
    k = _FIXED.get(key)
    if k is None:  # a stray DLE is just a byte; an unknown command skips its selector
        return _Cmd(1) if key[0] == DLE else _Cmd(2, kind="unknown")
    return None if len(buf) - i < 2 + k else _Cmd(2 + k, kind=_KINDS.get(key, "none"))


@dataclass(slots=True)
class _Junk:
    """Signs of line noise in the current receipt: stray control bytes, bad commands and
    undecodable text (`bad`) and the share of text bytes above ASCII."""

    bad: int = 0
    text: int = 0
    high: int = 0

    def noise(self) -> bool:
        """Random bytes hold a stray control byte or a bad command every ~10 bytes and are
        half above ASCII; a real receipt has none (or a few unsupported commands) and is
        mostly ASCII (digits, prices, spaces, even in Cyrillic)."""
        return self.bad >= 4 and self.bad * 64 >= self.text and self.high * 4 > self.text


_LOW = bytes(range(128))


class EscPosFramer:
    """Receipt text from an ESC/POS printer stream (see the module docstring)."""

    def __init__(self, *, encoding: str = "cp437", max_frame: int = 64 * 1024) -> None:
        self._default = codecs.lookup(encoding).name
        self._encoding = self._default
        self._max = max_frame
        self._max_skip = max(max_frame, _MIN_SKIP_CAP)
        self._receipt = ReceiptLines(max_frame)
        self._parts: list[str] = []  # decoded pieces of the current line
        self._seg = bytearray()  # undecoded bytes of the current line (current code page)
        self._line_size = 0
        self._pending = bytearray()  # an unfinished command header (a few bytes)
        self._skip = 0
        self._skipped = 0  # bytes of the current payload skipped so far
        self._until_nul = 0  # > 0: bytes still allowed before the NUL
        self._junk = _Junk()
        self._probes = True  # False in a probe: probes do not probe
        self._probe: EscPosFramer | None = None  # parsing from an ESC @ inside the payload
        self._esc_last = False  # the last payload byte searched for ESC @ was ESC

    def feed(self, data: bytes) -> list[Output]:
        outs: list[Output] = []
        self._scan(data, outs, stop=False)
        return outs

    def _scan(self, data: Buf, outs: list[Output], *, stop: bool) -> int:
        """Parse `data`; with `stop`, only up to the first output. Bytes of data consumed."""
        buf: Buf = data
        held = len(self._pending)
        if held:
            buf = self._pending + data
            self._pending = bytearray()
        i, n = 0, len(buf)
        while i < n and not (stop and outs):
            if self._skip or self._until_nul:
                i = self._payload(buf, i, outs)
                continue
            b = buf[i]
            if b >= 0x20 and b != 0x7F:
                m = _PRINTABLE_RUN.match(buf, i)
                end = m.end() if m is not None else i + 1
                self._text(buf[i:end])
                i = end
            elif b in (LF, FF):
                self._newline(outs)
                i += 1
            elif b == HT:
                self._text(b" ")
                i += 1
            elif b in (ESC, GS, FS, DLE):
                cmd = _command(buf, i)
                if cmd is None:  # the rest is an unfinished command header (< 10 bytes)
                    self._pending = bytearray(buf[i:])
                    return len(data)
                i += cmd.length
                self._apply(cmd, outs)
            else:  # CR, NUL, CAN, other C0 controls: nothing to print
                if b and b != CR:  # a stray control byte: a sign of line noise (padding is NUL)
                    self._junk.bad += 1
                i += 1
        return max(0, i - held)

    def _payload(self, buf: Buf, i: int, outs: list[Output]) -> int:
        """Skip a command's payload (counted, or up to its NUL); the index after it."""
        n = len(buf)
        if self._skip:
            end = i + min(self._skip, n - i)
            resume = self._probe_skipped(buf, i, end, outs) if self._probes else None
            if resume is not None:  # the payload was noise: the probe's state is ours now
                return resume
            self._skip -= end - i
            self._skipped += end - i
            if not self._skip:  # the payload was real: forget any probe
                self._probe = None
                self._esc_last = False
            return end
        j = buf.find(b"\x00", i, i + self._until_nul)
        if j >= 0:
            self._until_nul = 0
            return j + 1
        used = min(self._until_nul, n - i)
        self._until_nul -= used
        if not self._until_nul:  # no NUL where one must be: resync here
            self._bad_input(outs, Problem("command", _MAX_NUL_RUN))
        return i + used

    def _probe_skipped(self, buf: Buf, i: int, end: int, outs: list[Output]) -> int | None:
        """Probe buf[i:end] (payload bytes) from each ESC @ in it; the index to resume at
        if a probe proved the payload to be noise, else None."""
        start = i
        while start < end:
            lead = b""
            if self._probe is None:
                if self._esc_last and buf[start] == ord("@"):
                    at, lead = start, b"\x1b"
                else:
                    j = buf.find(b"\x1b@", start, end)
                    if j < 0:
                        self._esc_last = buf[end - 1] == ESC
                        return None
                    at = j
                self._esc_last = False
                self._probe = EscPosFramer(encoding=self._default, max_frame=self._max)
                self._probe._probes = False
            else:
                at = start
            probe_outs: list[Output] = []
            used = self._probe._scan(lead + bytes(buf[at:end]), probe_outs, stop=True)
            if not probe_outs:  # clean so far: wait for more
                return None
            probe, self._probe = self._probe, None
            stop = at + used - len(lead)
            clean = not any(isinstance(o, Problem) for o in probe_outs)
            if not (clean and any(isinstance(o, TextFrame) for o in probe_outs)):
                start = max(stop, at + 1)  # not a clean ESC/POS stream: search on after it
                continue
            self._skipped += stop - i
            self._adopt(probe, outs)
            outs += probe_outs
            return stop
        return None

    def _adopt(self, probe: EscPosFramer, outs: list[Output]) -> None:
        """The payload being skipped was noise: continue as `probe` (which parsed from an
        ESC @ inside it), dropping the partial receipt from before the noise."""
        outs.append(Problem("command", self._skipped))
        lost = self._receipt.discard() + len(self._seg) + sum(len(p) for p in self._parts)
        if lost:
            outs.append(Problem("truncated", lost))
        self._encoding, self._receipt = probe._encoding, probe._receipt
        self._parts, self._seg, self._line_size = probe._parts, probe._seg, probe._line_size
        self._pending, self._skip, self._until_nul = probe._pending, probe._skip, probe._until_nul
        self._skipped, self._junk, self._esc_last = probe._skipped, probe._junk, False

    def _apply(self, cmd: _Cmd, outs: list[Output]) -> None:
        if cmd.skip > self._max_skip:
            self._bad_input(outs, Problem("oversize", cmd.skip))
        self._skip = min(cmd.skip, self._max_skip)
        self._skipped = 0
        if cmd.until_nul:
            self._until_nul = _MAX_NUL_RUN
        if cmd.kind == "cut":
            self._newline(outs)
            self._close(outs)
        elif cmd.kind == "feed":
            self._newline(outs)
        elif cmd.kind == "codepage":
            self._flush_seg(outs)
            self._encoding = CODE_PAGES.get(cmd.arg, self._default)
        elif cmd.kind == "init":
            self._drop_noise(outs)
            self._flush_seg(outs)
            self._encoding = self._default
        elif cmd.kind == "unknown":
            self._bad_input(outs, Problem("command", cmd.length))

    def _bad_input(self, outs: list[Output], problem: Problem) -> None:
        self._junk.bad += 1
        outs.append(problem)

    def _close(self, outs: list[Output]) -> None:
        """End the receipt: its text, unless it is line noise (counted `noise`)."""
        done = self._receipt.end()
        junk, self._junk = self._junk, _Junk()
        if isinstance(done, TextFrame) and junk.noise():
            outs.append(Problem("noise", len(done.text)))
        elif done is not None:
            outs.append(done)

    def _drop_noise(self, outs: list[Output]) -> None:
        """ESC @ after line noise: the receipt so far is noise (a real one ends in a cut)."""
        if self._junk.noise():
            self._seg.clear()
            self._parts.clear()
            self._line_size = 0
            outs.append(Problem("noise", self._receipt.discard() + self._junk.text))
            self._junk = _Junk()

    def _text(self, chunk: bytes | bytearray) -> None:
        if self._receipt.size + self._line_size + len(chunk) > self._max:
            # the receipt with this line would pass its bound: it is oversize now, and the
            # line is not held beside a full receipt (receipt and line stay within max_frame)
            self._receipt.spill(self._line_size + len(chunk))
            self._seg.clear()
            self._parts.clear()
            self._line_size = 0
            return
        self._seg += chunk
        self._line_size += len(chunk)
        self._junk.text += len(chunk)
        self._junk.high += len(chunk.translate(None, _LOW))  # the bytes above ASCII

    def _flush_seg(self, outs: list[Output]) -> None:
        if self._seg:
            text, ok = decode(bytes(self._seg), self._encoding)
            if not ok:
                self._bad_input(outs, Problem("decode", len(self._seg)))
            self._parts.append(text)
            self._seg.clear()

    def _newline(self, outs: list[Output]) -> None:
        self._flush_seg(outs)
        line = "".join(self._parts)
        self._parts.clear()
        self._line_size = 0
        self._receipt.add(line)

    def idle(self) -> list[Output]:
        """The line went quiet: a payload being skipped was noise (a real one streams without
        a pause), and the receipt so far ends (for printers without a cutter)."""
        outs: list[Output] = []
        if self._probe is not None:  # clean since an ESC @ inside the payload: continue as the probe
            probe, self._probe = self._probe, None
            self._adopt(probe, outs)
        if self._skip or self._until_nul:
            outs.append(Problem("command", self._skipped))
            self._skip = self._until_nul = 0
        self._esc_last = False
        if self._seg or self._parts:
            self._newline(outs)
        self._close(outs)
        return outs

    def reset(self) -> list[Output]:
        n = self._receipt.discard() + len(self._seg) + len(self._pending)
        self._seg.clear()
        self._parts.clear()
        self._line_size = 0
        self._pending.clear()
        self._skip = self._skipped = self._until_nul = 0
        self._junk = _Junk()
        self._probe = None
        self._esc_last = False
        self._encoding = self._default
        return [Problem("truncated", n)] if n else []

    @property
    def buffered(self) -> int:
        probe = self._probe.buffered if self._probe is not None else 0
        return self._receipt.size + len(self._seg) + sum(len(p) for p in self._parts) + len(self._pending) + probe
