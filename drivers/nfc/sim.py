"""Simulated NFC reader: shoppers tapping shelf tags and their loyalty cards.

Each reading is an `nfc.tap`:

- product tag (the store's own NTAG on a shelf edge; its UID is infrastructure, not
  personal): data {kind: "product", gtin: <GTIN-13>, tag_type: "Type2", tag: <tag UID hex>}
- loyalty card: data {kind: "loyalty", tag_type: "Type2" | "Type4"},
  ids {"card": Ident("nfc_uid", <7-byte UID hex>), "loyalty": Ident("loyalty_id", <12 digits>)}

Popular products are tapped more (Zipf weights); loyalty customers come from the shared
pool (`drivers.base.customer_pool`), so the same customers show up on POS receipts.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from drivers.base import SimPacer, Sleep, classify_injected, customer_pool, random_nfc_uid, store_catalogue
from drivers.nfc.config import Nfc
from edge.clock import Clock
from edge.events import Ident, Reading

_P_LOYALTY = 0.3
_TAGS_SEED = 0x7A65


@dataclass(slots=True, frozen=True)
class _Tap:
    """A prepared tap; each reading gets its own copies (plain dicts, safe to serialize)."""

    data: Mapping[str, Any]
    ids: Mapping[str, Ident]


def _product_taps() -> tuple[_Tap, ...]:
    rng = random.Random(_TAGS_SEED)  # the store's shelf tags are fixed, whatever the seed
    return tuple(
        _Tap(
            MappingProxyType(
                {"kind": "product", "gtin": p.code, "tag_type": "Type2", "tag": random_nfc_uid(rng)}
            ),
            MappingProxyType({}),
        )
        for p in store_catalogue()
        if p.code_kind == "gtin"
    )


def _loyalty_tap(uid: str, loyalty: str, tag_type: str) -> _Tap:
    return _Tap(
        MappingProxyType({"kind": "loyalty", "tag_type": tag_type}),
        MappingProxyType({"card": Ident("nfc_uid", uid), "loyalty": Ident("loyalty_id", loyalty)}),
    )


class NfcSim:
    """Simulated NFC backend (see the module docstring for what it yields).

    `inject`: raw identifiers for the leak test (see `drivers.base.classify_injected`).
    The first taps are loyalty-card taps using the injected NFC UIDs and loyalty numbers,
    paired in order (the k-th injected UID with the k-th injected loyalty number; where
    one list is shorter, a pool customer's value fills in). `limit`: stop after that
    many readings. `sleep`: used for pacing.
    """

    name = "sim"

    def __init__(
        self,
        cfg: Nfc,
        clock: Clock,
        *,
        inject: Sequence[str] | None = None,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._rng = random.Random(cfg.sim.seed)
        self._clock = clock
        self._limit = limit
        self._count = 0
        self._pacer = SimPacer(cfg.sim.rate, clock, sleep, self._rng)
        self._products = _product_taps()
        self._cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self._products))))
        self._order = list(range(len(self._products)))
        self._rng.shuffle(self._order)  # which products are popular depends on the seed
        self._customers = customer_pool()
        self._customer_taps = [_loyalty_tap(c.card_uid, c.loyalty, c.tag_type) for c in self._customers]
        inj = classify_injected(inject)
        uids, numbers = inj["nfc_uid"], inj["loyalty_id"]
        self._injected: list[_Tap] = []
        for k in range(max(len(uids), len(numbers))):
            c = self._customers[k]
            uid = uids[k] if k < len(uids) else c.card_uid
            number = numbers[k] if k < len(numbers) else c.loyalty
            self._injected.append(_loyalty_tap(uid, number, c.tag_type))
        self._injected.reverse()

    async def open(self) -> None:
        """Nothing to open: the simulated reader is always there."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def readings(self) -> AsyncIterator[Reading]:
        pacer = self._pacer
        while self._limit is None or self._count < self._limit:
            delay = pacer.next_delay()
            if delay is not None:
                await pacer.sleep(delay)
            tap = self._next_tap()
            self._count += 1
            yield Reading(
                src="nfc", type="nfc.tap", ts=self._clock.wall_ms(), data=dict(tap.data), ids=dict(tap.ids)
            )

    def _next_tap(self) -> _Tap:
        rng = self._rng
        if self._injected:
            return self._injected.pop()
        if rng.random() < _P_LOYALTY:
            return self._customer_taps[int(rng.random() * len(self._customer_taps))]
        rank = bisect.bisect(self._cum_weights, rng.random() * self._cum_weights[-1])
        return self._products[self._order[min(rank, len(self._order) - 1)]]
