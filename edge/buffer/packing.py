"""Event bodies as MessagePack and the batch insert, built for the ingest hot path (100k+/s).

A stored body is the wire Event map `{"id", "ts", "src", "type", "data"}` (schema.py). When
an event is queued its id is not known yet, so `EventPacker` builds everything after the id
(`rest`); the writer prepends the 5-entry map header and the id (`body`). The key/value
bytes of `src` and `type` are the same for every event of one kind, so they are packed once
per (src, type) and reused: per event only `ts` and `data` go through the packer.

`ColumnInsert` writes a whole group commit with ONE statement whose four parameters are
built by C-level joins, %-formatting and json.dumps of plain integers (per event no tuple to
bind, no nested JSON to re-parse): `json_each` walks one integer per event and `substr`
(byte-indexed on BLOBs) slices ts and body out. One sqlite3_step does the work without the
GIL, and in autocommit mode the statement is its own atomic, durable transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import accumulate, chain, repeat
from typing import Any

import msgpack

from edge.events import Pending

Item = tuple[int, str, int, bytes]  # a queued event: ts, src, priority rank, `rest`
MAP5_ID = b"\x85\xa2id"  # msgpack: map of 5 entries, then the key "id"
_TS_KEY = b"\xa2ts"
_MAX_HEADS = 1024  # distinct (src, type) pairs remembered


def _to_plain(o: Any) -> Any:
    if isinstance(o, Mapping):
        return dict(o)
    raise TypeError(f"cannot store a {type(o).__name__} in an event")


class EventPacker:
    """`packer(p)` -> (priority rank of p.src, `rest`): the body of `p` without header and id.

    Raises KeyError for an unknown source, TypeError/ValueError/OverflowError for data
    MessagePack cannot hold (mappings other than dict are packed as dicts).
    """

    __slots__ = ("_heads", "_pack", "_rank")

    def __init__(self, rank: Mapping[str, int]) -> None:
        self._rank = rank
        self._pack = msgpack.Packer(use_bin_type=True, default=_to_plain).pack
        self._heads: dict[str, tuple[str, int, bytes]] = {}

    def __call__(self, p: Pending) -> tuple[int, bytes]:
        pack = self._pack
        head = self._heads.get(p.type)
        if head is None or head[0] != p.src:
            head = self._head(p.src, p.type)
        return head[1], b"".join((_TS_KEY, pack(p.ts), head[2], pack(p.data)))

    def _head(self, src: str, typ: str) -> tuple[str, int, bytes]:
        pack = self._pack
        head = (src, self._rank[src], b"".join((pack("src"), pack(src), pack("type"), pack(typ), pack("data"))))
        if typ not in self._heads and len(self._heads) < _MAX_HEADS:
            self._heads[typ] = head  # by type alone (one dict lookup); the source is checked
        return head

    def body(self, eid: int, ts: int, src: str, typ: str, data: Any) -> bytes:
        """A complete body (for events the buffer makes itself, e.g. `edge.dropped`)."""
        return self._pack({"id": eid, "ts": ts, "src": src, "type": typ, "data": data})


_TS_W = 13  # ts as 13 ASCII digits (a millisecond time until the year 2286; "-" fits too)
_TS_MIN, _TS_MAX = -(10 ** (_TS_W - 1)) + 1, 10**_TS_W - 1
# per event one JSON integer: offset of its body << 24 | size << 4 | priority rank
_RANK_BITS, _SIZE_BITS = 4, 20
_MAX_SIZE = (1 << _SIZE_BITS) - 1  # bodies up to 1 MiB - 1
_MAX_END = 1 << (63 - _RANK_BITS - _SIZE_BITS)  # offsets fit a signed 64-bit integer


class ColumnInsert:
    """`params(items, first_id)` -> (parameters of `sql`, bytes per rank, events per rank),
    or None when the batch does not fit the encoding (an absurd ts, a body of a MiB or more,
    ids crossing a MessagePack width boundary): the caller then uses the general path
    (bounds.INSERT_JSON).

    Parameters: ?1 the first id; ?2 every ts as 13 ASCII digits (a BLOB, so `substr` is
    byte-indexed); ?3 a flat JSON array with one integer per event (offset << 24 | size << 4
    | rank): `json_each` over it drives the rows, ~5x cheaper per row than a recursive CTE;
    ?4 all bodies concatenated."""

    __slots__ = ("_pack_id", "_ranks", "sql")

    def __init__(self, rank: Mapping[str, int]) -> None:
        if max(rank.values()) >= 1 << _RANK_BITS or len(set(rank.values())) != len(rank):
            raise ValueError("priority ranks must be distinct and below 16")
        self._ranks = len(rank)
        self._pack_id = msgpack.Packer().pack
        # src from its rank: literals from the configured priorities (SOURCES), never input
        case = " ".join(f"WHEN {r} THEN '{src}'" for src, r in sorted(rank.items(), key=lambda x: x[1]))
        prio = f"value & {(1 << _RANK_BITS) - 1}"
        size = f"(value >> {_RANK_BITS}) & {_MAX_SIZE}"
        self.sql = (
            "INSERT INTO events (id, ts, src, prio, size, body) SELECT ?1 + key, "  # noqa: S608 - fixed text
            f"CAST(substr(?2, key * {_TS_W} + 1, {_TS_W}) AS INTEGER), CASE {prio} {case} END, {prio}, "
            f"{size}, substr(?4, value >> {_RANK_BITS + _SIZE_BITS}, {size}) FROM json_each(?3)"
        )

    def params(
        self, items: Sequence[Item], first_id: int
    ) -> tuple[tuple[int, bytes, str, bytes], list[int], list[int]] | None:
        n = len(items)
        pack_id = self._pack_id
        width = len(pack_id(first_id))
        if not n or len(pack_id(first_id + n - 1)) != width:
            return None
        head = len(MAP5_ID) + width
        rests = [it[3] for it in items]
        sizes = [head + len(r) for r in rests]
        ranks = [it[2] for it in items]
        total = sum(sizes)
        try:
            ts = tuple([it[0] for it in items])
            if max(sizes) > _MAX_SIZE or total >= _MAX_END or min(ts) < _TS_MIN or max(ts) > _TS_MAX:
                return None
            ts_col = (b"%013d" * n) % ts
        except (TypeError, ValueError):  # a ts that is not a number: the general path stores it as is
            return None
        per_rank_b = [0] * self._ranks
        per_rank_n = [0] * self._ranks
        if ranks.count(ranks[0]) == n:  # the usual batch: one source
            per_rank_b[ranks[0]] = total
            per_rank_n[ranks[0]] = n
        else:
            for r, size in zip(ranks, sizes, strict=True):
                per_rank_b[r] += size
                per_rank_n[r] += 1
        shift = _RANK_BITS + _SIZE_BITS
        meta = json.dumps([
            (off << shift) | (size << _RANK_BITS) | r
            for off, size, r in zip(accumulate(sizes, initial=1), sizes, ranks)  # noqa: B905 - accumulate is longer by one
        ])
        bodies = b"".join(chain.from_iterable(zip(repeat(MAP5_ID), map(pack_id, range(first_id, first_id + n)), rests)))
        return (first_id, ts_col, meta, bodies), per_rank_b, per_rank_n
