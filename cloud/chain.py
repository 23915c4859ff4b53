"""Chain and dedupe: where a verified batch goes in its device's chain, or why it does not.

Design. uplink-v1 deduplicates on (tenant, store, device, seq) and checks `prev` against a held
`seq - 1`; gaps and resets are reported, not rejected. The receiver keeps chains in *epochs*: a
seq 1 arriving when the current epoch already holds a (different) seq 1 opens a new epoch (a
reset: the device lost its state). When the current epoch holds no seq 1, an incoming seq 1
joins it whatever `highest` is: it is the epoch's first batch, late (3, 4 then 1, 2 is one
chain, not a reset), and linking propagates forward from it. Held batches that do not continue
it (an older chain's, if the device did start over) are displaced by the batches that link, as
below. An exact resend (same seq and hh) from any epoch is a duplicate.

Links. A held batch is *linked* when it is anchored to its epoch's seq 1 through held batches
(seq 1 itself, or `prev` = hh of a linked `seq - 1`); batches after a gap are unlinked until the
gap fills, and filling it relinks them forward. Only linked batches are proof of the chain:

- a batch whose held `seq - 1` is linked and does not match its prev: `chain-broken` (the spec);
- a different batch for a seq whose held batch is linked: `chain-broken` (a fork: the device
  promised never to reuse a seq; acking it ok would claim we stored what we did not);
- the same conflicts against an UNLINKED held batch are ambiguous: either one may be an old-epoch
  batch replayed after a reset (genuine, signed, never stored, and now in the wrong chain). The
  newcomer is then `deferred`: no ack, the device resends later, and by then the gap has
  usually filled and settled it;
- a newcomer that links (to a linked `seq - 1`) displaces an unlinked held batch at its seq and
  any unlinked successor that does not continue it: those are *detached* (kept, deduplicated,
  out of the chain), so an old-epoch replay can no longer make the device's genuine batch
  `chain-broken`.

Settling. A deferral waits for the gap to fill, but a gap can be permanent (the edge's buffer
drops sealed batches when it is full), and then the device would resend its genuine batch
forever. `Deferrals` bounds that: once the same batch (identity, seq, hh) has come back
`max_resends` times after its first deferral, or `max_age` seconds have passed since it, the
core asks `decide(..., settle=True)`, which resolves every ambiguous conflict for the newcomer:
it is accepted (unlinked, as it does not link), an unlinked, different held batch at its seq is
detached with the run that continues it (the intruder's claim dropped), and an unlinked held
neighbour that does not fit it (`seq - 1`, `seq + 1`) is left as it is (no claim on this seq; a
batch that links displaces it later). Conflicts with LINKED batches stay `chain-broken`. Both
batches stay stored and deduplicated whichever way it goes, so settling loses nothing; a
settlement is counted (`settled`) and logged (`batch_settled`). The price: a replayed old batch
that keeps coming back can, once, displace an unlinked genuine one (never a linked one) from the
chain, after which that part of the epoch stays unlinked (it is still stored and acked).

`decide` reads through the transaction (so batches of the same group are seen) and returns a
`Decision`; the core applies it. Pure logic otherwise: no I/O of its own, no clock (`Deferrals`
is handed the time).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from cloud.store import DeviceState, Ids, StoredBatch, StoreTxn
from edge.wire.uplink import Batch

Verdict = Literal["accepted", "chain-broken", "deferred"]
_MAX_CASCADE = 100_000  # bound on the forward walk (relink/detach); a device's window is far smaller


@dataclass(slots=True, frozen=True)
class Decision:
    verdict: Verdict
    epoch: int = 0
    highest: int = 0
    linked: bool = False
    reset: bool = False
    gap: tuple[int, int] | None = None  # (missing_from, missing_to) when this batch jumps ahead
    detach: tuple[tuple[int, bytes], ...] = ()  # (seq, hh) moved out of the epoch
    relink: tuple[tuple[int, bytes], ...] = ()  # (seq, hh) of held successors now linked
    detail: str = ""


def _live(rows: list[StoredBatch], epoch: int) -> StoredBatch | None:
    return next((r for r in rows if r.epoch == epoch and not r.detached), None)


def is_duplicate(txn: StoreTxn, ids: Ids, seq: int, hh: bytes) -> bool:
    """This exact batch (identity, seq, hh) is already stored, in any epoch."""
    return any(r.hh == hh for r in txn.at_seq(ids, seq))


def decide(txn: StoreTxn, b: Batch, *, settle: bool = False) -> Decision:  # noqa: PLR0911, PLR0912 - one return per rule of the module doc
    """Where `b` goes. The caller has already answered exact resends (`is_duplicate`, which the core
    asks before authentication); ValueError if `b` is one, as that is a caller bug. With `settle`,
    what would be `deferred` is accepted instead (see "Settling" in the module doc)."""
    ids = b.ids
    rows = txn.at_seq(ids, b.seq)
    if any(r.hh == b.hh for r in rows):
        raise ValueError("decide() called for a batch already stored; ask is_duplicate first")
    state = txn.device(ids) or DeviceState(epoch=1, highest=0)
    epoch, highest = state.epoch, state.highest
    current = _live(rows, epoch)
    if b.seq == 1:
        if current is not None:  # the epoch has its seq 1 already: the device started over
            return Decision("accepted", epoch=epoch + 1, highest=1, linked=True, reset=True)
        # the epoch has no seq 1 yet: this is its first batch, late (whatever arrived before it)
        return Decision("accepted", epoch=epoch, highest=max(highest, 1), linked=True,
                        relink=_forward(txn, ids, 1, b.hh, epoch, mode="relink"))  # fmt: skip
    pred = _live(txn.at_seq(ids, b.seq - 1), epoch)
    fits = pred is not None and pred.hh == b.prev
    if pred is not None and not fits:
        if pred.linked:
            return Decision("chain-broken", detail=f"prev does not match the held seq {b.seq - 1}")
        if not settle:
            return Decision("deferred", detail=f"prev does not match the held, unlinked seq {b.seq - 1}")
    linked = fits and pred is not None and pred.linked
    detach: list[tuple[int, bytes]] = []
    if current is not None:
        if current.linked:
            return Decision("chain-broken", detail=f"a different batch with seq {b.seq} is held")
        if not linked and not settle:
            return Decision("deferred", detail=f"an unlinked, different batch with seq {b.seq} is held")
        detach += [(b.seq, current.hh), *_forward(txn, ids, b.seq, current.hh, epoch, mode="detach")]
    succ = _live(txn.at_seq(ids, b.seq + 1), epoch)
    relink: tuple[tuple[int, bytes], ...] = ()
    if succ is not None and (b.seq + 1, succ.hh) not in detach:
        if succ.prev == b.hh:
            if linked:
                relink = _forward(txn, ids, b.seq, b.hh, epoch, mode="relink")
        elif linked:
            detach += [(b.seq + 1, succ.hh), *_forward(txn, ids, b.seq + 1, succ.hh, epoch, mode="detach")]
        elif not settle:
            return Decision("deferred", detail=f"the held seq {b.seq + 1} does not continue this batch")
    gap = (highest + 1, b.seq - 1) if highest and b.seq > highest + 1 else None
    return Decision("accepted", epoch=epoch, highest=max(highest, b.seq), linked=linked, gap=gap,
                    detach=tuple(detach), relink=relink)  # fmt: skip


def _forward(
    txn: StoreTxn, ids: Ids, seq: int, hh: bytes, epoch: int, *, mode: Literal["relink", "detach"]
) -> tuple[tuple[int, bytes], ...]:
    """The held run after (seq, hh) that continues it: successors whose prev links one to the next."""
    out: list[tuple[int, bytes]] = []
    for _ in range(_MAX_CASCADE):
        nxt = _live(txn.at_seq(ids, seq + 1), epoch)
        if nxt is None or nxt.prev != hh or (mode == "relink" and nxt.linked):
            break
        seq, hh = seq + 1, nxt.hh
        out.append((seq, hh))
    return tuple(out)


@dataclass(slots=True)
class Deferrals:
    """How often, and since when, each deferred batch has come back; says when to settle it.

    `note` is called for every deferral of a batch (identity, seq, hh) with the monotonic time: it
    returns None while the batch may stay deferred, and the reason to settle it ("resends" after
    `max_resends` returns following the first deferral, "age" once `max_age` seconds have passed
    since it), forgetting it then. Kept in memory (several workers each count their own: the bound
    then holds per worker); the `capacity` most recently deferred are kept (LRU), an evicted one
    starts over, at worst."""

    max_resends: int = 3
    max_age: float = 600.0
    capacity: int = 65_536
    _seen: OrderedDict[tuple[Ids, int, bytes], tuple[int, float]] = field(default_factory=OrderedDict)

    def note(self, ids: Ids, seq: int, hh: bytes, now: float) -> str | None:
        key = (ids, seq, hh)
        resends, first = self._seen.get(key, (-1, now))
        resends += 1
        reason = "resends" if resends >= self.max_resends else "age" if now - first >= self.max_age else None
        if reason is not None:
            self._seen.pop(key, None)
            return reason
        self._seen[key] = (resends, first)
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return None

    def forget(self, ids: Ids, seq: int, hh: bytes) -> None:
        """The batch was settled otherwise (the gap filled): drop its count."""
        self._seen.pop((ids, seq, hh), None)
