"""The rig's leak scan: tens of thousands of needles over tens of megabytes, in seconds.

`edge.leakscan.scan` tests needle by needle (`pattern in data`), which is right for the demo's
six identifiers but takes minutes for a store day's thousands (every phone, card and
customer, each in a dozen encodings). Here every window of every needle length is hashed at
once (a polynomial rolling hash, vectorized with numpy, wrapping mod 2**64), looked up in a
bitmap of the needles' hashes, and each candidate is confirmed by comparing the bytes. Needles
longer than `_ANCHOR` bytes are hashed by their first `_ANCHOR` bytes, so a few passes cover
every length. The needles and their encodings are `edge.leakscan`'s; only the search is faster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge.events import IdentClass
from edge.leakscan import Finding, Needle, files_under, needles_for

_B = 0x100000001B3  # odd, so it has an inverse mod 2**64
_M = 1 << 64
_BITS = 24
_CHUNK = 8 * 1024 * 1024
_ANCHOR = 8
U64 = npt.NDArray[np.uint64]


def needles(identifiers: Iterable[tuple[IdentClass, str]]) -> list[Needle]:
    """Every encoding of every identifier (see `edge.leakscan.needles_for`)."""
    out: list[Needle] = []
    for cls, raw in identifiers:
        try:
            out.extend(needles_for(cls, raw))
        except ValueError:  # a malformed identifier from a peer: searched as plain text only
            out.append(Needle(cls, f"{cls}/text", raw.encode()))
    return out


def _hash(p: bytes) -> int:
    h = 0
    for b in p:
        h = (h * _B + b) % _M
    return h


class _Index:
    """anchor length -> hash of the anchor -> needles (pattern, label) starting with it."""

    def __init__(self, found: list[Needle]) -> None:
        self.by_len: dict[int, dict[int, list[tuple[bytes, str]]]] = defaultdict(lambda: defaultdict(list))
        for n in found:
            if n.pattern:
                anchor = n.pattern[:_ANCHOR]
                self.by_len[len(anchor)][_hash(anchor)].append((n.pattern, n.label))
        self.bitmaps: dict[int, npt.NDArray[np.bool_]] = {}
        for length, hashes in self.by_len.items():
            bm = np.zeros(1 << _BITS, dtype=np.bool_)
            bm[[h & ((1 << _BITS) - 1) for h in hashes]] = True
            self.bitmaps[length] = bm
        self.max_len = max((len(n.pattern) for n in found), default=0)


def scan(paths: Iterable[Path], found: list[Needle]) -> list[Finding]:
    """Files (folders walked) containing any needle; one finding per file and needle label."""
    index = _Index(found)
    if not index.by_len:
        return []
    out: list[Finding] = []
    for f in files_under(paths):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        labels: set[str] = set()
        step = _CHUNK
        for start in range(0, max(len(data), 1), step):
            labels |= _scan_chunk(data[start : start + step + index.max_len - 1], index)
        out.extend(Finding(str(f), label) for label in sorted(labels))
    return out


def _powers(n: int, base: int) -> U64:
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)


def _scan_chunk(data: bytes, index: _Index) -> set[str]:
    n = len(data)
    if n == 0:
        return set()
    d = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    bpow = _powers(n, _B)
    binv = _powers(n, pow(_B, -1, _M))
    s = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(d * binv, dtype=np.uint64, out=s[1:])
    mask = np.uint64((1 << _BITS) - 1)
    labels: set[str] = set()
    for length, table in index.by_len.items():
        if length > n:
            continue
        w = (s[length:] - s[: n - length + 1]) * bpow[length - 1 :]
        cand = np.flatnonzero(index.bitmaps[length][(w & mask).astype(np.intp)])
        for i in cand.tolist():
            for pattern, label in table.get(int(w[i]), ()):
                if data.startswith(pattern, i):
                    labels.add(label)
    return labels
