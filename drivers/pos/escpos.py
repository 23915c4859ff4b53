"""The ESC/POS receipt tap: the byte stream between a POS and its receipt printer -> the
receipts' text.

Printable bytes are text in the current code page (ESC t; ESC @ resets to the configured
encoding); LF, FF and the print-and-feed commands end a line; every other command is
skipped with its parameters and payload: raster images (GS v 0), bit images (ESC *, GS *),
graphics and 2D codes (GS ( ..., GS 8 L, ESC ( ..., FS ( ...), barcodes (GS k), drawer
kicks, real-time requests (DLE ...). A paper cut (GS V, ESC i, ESC m) ends the receipt.
An unknown command skips its selector byte and is counted; a declared payload longer than
1 MiB is treated as garbage. Only the receipt so far (at most `max_frame`) and a few bytes
of an unfinished command header are held; payloads are skipped as they stream by.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from drivers.pos.frames import (
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
_MAX_SKIP = 1024 * 1024  # a declared payload longer than this (logos are ~20 KiB) is garbage: resync
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


def _prefixed(buf: Buf, i: int) -> _Cmd | None:
    """ESC|GS|FS ( fn pL pH <p bytes>: 2D codes, graphics, settings."""
    return None if len(buf) - i < 5 else _Cmd(5, skip=_u16(buf, i + 3))


def _bit_image(buf: Buf, i: int) -> _Cmd | None:
    """ESC * m nL nH d1..dk: k = n columns of 1 (8-dot) or 3 (24-dot) bytes."""
    if len(buf) - i < 5:
        return None
    return _Cmd(5, skip=_u16(buf, i + 3) * (1 if buf[i + 2] in (0, 1) else 3))


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
    return None if len(buf) - i < 8 else _Cmd(8, skip=_u16(buf, i + 4) * _u16(buf, i + 6))


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


class EscPosFramer:
    """Receipt text from an ESC/POS printer stream (see the module docstring)."""

    def __init__(self, *, encoding: str = "cp437", max_frame: int = 64 * 1024) -> None:
        self._default = codecs.lookup(encoding).name
        self._encoding = self._default
        self._max = max_frame
        self._receipt = ReceiptLines(max_frame)
        self._parts: list[str] = []  # decoded pieces of the current line
        self._seg = bytearray()  # undecoded bytes of the current line (current code page)
        self._line_size = 0
        self._pending = bytearray()  # an unfinished command header (a few bytes)
        self._skip = 0
        self._until_nul = 0  # > 0: bytes still allowed before the NUL

    def feed(self, data: bytes) -> list[Output]:
        outs: list[Output] = []
        buf: Buf = data
        if self._pending:
            buf = self._pending + data
            self._pending = bytearray()
        i, n = 0, len(buf)
        while i < n:
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
                    break
                i += cmd.length
                self._apply(cmd, outs)
            else:  # CR, NUL, CAN, other C0 controls: nothing to print
                i += 1
        return outs

    def _payload(self, buf: Buf, i: int, outs: list[Output]) -> int:
        """Skip a command's payload (counted, or up to its NUL); the index after it."""
        n = len(buf)
        if self._skip:
            take = min(self._skip, n - i)
            self._skip -= take
            return i + take
        j = buf.find(b"\x00", i, i + self._until_nul)
        if j >= 0:
            self._until_nul = 0
            return j + 1
        used = min(self._until_nul, n - i)
        self._until_nul -= used
        if not self._until_nul:  # no NUL where one must be: resync here
            outs.append(Problem("command", _MAX_NUL_RUN))
        return i + used

    def _apply(self, cmd: _Cmd, outs: list[Output]) -> None:
        if cmd.skip > _MAX_SKIP:
            outs.append(Problem("command", 0))
        else:
            self._skip = cmd.skip
        if cmd.until_nul:
            self._until_nul = _MAX_NUL_RUN
        if cmd.kind == "cut":
            self._newline(outs)
            done = self._receipt.end()
            if done is not None:
                outs.append(done)
        elif cmd.kind == "feed":
            self._newline(outs)
        elif cmd.kind == "codepage":
            self._flush_seg(outs)
            self._encoding = CODE_PAGES.get(cmd.arg, self._default)
        elif cmd.kind == "init":
            self._flush_seg(outs)
            self._encoding = self._default
        elif cmd.kind == "unknown":
            outs.append(Problem("command", cmd.length))

    def _text(self, chunk: bytes | bytearray) -> None:
        if self._line_size + len(chunk) > self._max:  # one line longer than a whole receipt
            self._receipt.spill(self._line_size + len(chunk))
            self._seg.clear()
            self._parts.clear()
            self._line_size = 0
            return
        self._seg += chunk
        self._line_size += len(chunk)

    def _flush_seg(self, outs: list[Output]) -> None:
        if self._seg:
            text, ok = decode(bytes(self._seg), self._encoding)
            if not ok:
                outs.append(Problem("decode", len(self._seg)))
            self._parts.append(text)
            self._seg.clear()

    def _newline(self, outs: list[Output]) -> None:
        self._flush_seg(outs)
        line = "".join(self._parts)
        self._parts.clear()
        self._line_size = 0
        self._receipt.add(line)

    def idle(self) -> list[Output]:
        """Only for printers without a cutter (the backend calls it when a gap is set)."""
        outs: list[Output] = []
        if self._seg or self._parts:
            self._newline(outs)
        done = self._receipt.end()
        if done is not None:
            outs.append(done)
        return outs

    def reset(self) -> list[Output]:
        n = self._receipt.discard() + len(self._seg) + len(self._pending)
        self._seg.clear()
        self._parts.clear()
        self._line_size = 0
        self._pending.clear()
        self._skip = 0
        self._until_nul = 0
        self._encoding = self._default
        return [Problem("truncated", n)] if n else []

    @property
    def buffered(self) -> int:
        return self._receipt.size + len(self._seg) + sum(len(p) for p in self._parts) + len(self._pending)
