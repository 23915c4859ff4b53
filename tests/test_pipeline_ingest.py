"""The ingest hot path: pipeline pump, the buffer's no-wait put and its one-statement group
commit, the pseudonym cache, and the shortcuts that must never change a result.

Real SQLite files in tmp_path, a FakeClock, real KeyStore; wire constants are literals.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.buffer import Buffer
from edge.clock import FakeClock
from edge.config import Config, Privacy
from edge.events import Ident, Pending, Reading, Source
from edge.pipeline import NormalizeStage, Pipeline, build_pipeline
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.scrub import scrub_cards
from edge.privacy.stage import PrivacyStage

NOW = 1_767_225_600_000  # FakeClock's default wall time (2026-01-01T00:00:00Z)
MAC = "aa:bb:cc:dd:ee:ff"


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
        "buffer": buffer,
    })  # fmt: skip


def make_keys(tmp_path: Path, clock: FakeClock) -> KeyStore:
    keys = KeyStore(tmp_path / "keys", clock)
    keys.init()
    return keys


async def stream(readings: Iterable[Reading]) -> AsyncIterator[Reading]:
    for r in readings:
        yield r


async def stored(buf: Buffer) -> list[dict[str, Any]]:
    return [msgpack.unpackb(e.body) for e in await buf.unsealed(1_000_000, 1 << 40)]


def adv(i: int) -> Reading:
    data = {"kind": "phone", "rssi": -60 - i % 30}
    return Reading("ble", "ble.adv", NOW + i, data, {"device": Ident("ble_address", MAC)})


# ----------------------------------------------------------------------------- pipeline


async def test_pump_stores_every_reading_and_counts_what_a_stage_rejects(tmp_path: Path) -> None:
    """pump() = submit() for a whole stream: pseudonymized events in order, rejects counted."""
    clock = FakeClock()
    cfg = make_cfg(tmp_path)
    buf = await Buffer.open(cfg, clock)
    privacy = PrivacyStage(Pseudonymizer(Privacy(), make_keys(tmp_path, clock), None))
    pipeline, _cards = build_pipeline(clock, privacy, buf)
    bad = Reading("ble", "Not A Type", NOW)
    await pipeline.pump(stream([adv(0), bad, adv(1)]))
    await pipeline.submit(adv(2))
    await buf.flush()
    events = await stored(buf)
    await buf.close()
    assert [e["id"] for e in events] == [1, 2, 3]
    assert [e["ts"] for e in events] == [NOW, NOW + 1, NOW + 2]
    assert {e["data"]["device"] for e in events} == {events[0]["data"]["device"]}
    assert events[0]["data"]["device"].startswith("ble:e1:")
    assert pipeline.status() == {"accepted": {"ble": 3}, "rejected": {"ble": 1}}


async def test_pump_waits_for_room_and_loses_nothing(tmp_path: Path) -> None:
    """A full queue makes the pump wait (backpressure), it never drops."""
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path, queue_max=100, commit_max_events=100, commit_interval="10s"), clock)
    pipeline = Pipeline([], lambda r: Pending(r.ts, r.src, r.type, dict(r.data)), buf)
    peak = 0

    async def readings() -> AsyncIterator[Reading]:
        nonlocal peak
        for i in range(1000):
            peak = max(peak, buf.queued)
            yield Reading("nfc", "nfc.tap", NOW + i, {"i": i})

    await pipeline.pump(readings())
    assert await buf.flush() == 1000
    assert [e["data"]["i"] for e in await stored(buf)] == list(range(1000))
    assert 0 < peak <= 100
    await buf.close()


def test_stages_may_be_functions_or_callable_objects_and_run_in_order() -> None:
    seen: list[str] = []

    def first(r: Reading) -> Reading:
        seen.append("first")
        return Reading(r.src, r.type, r.ts, {**r.data, "n": 1})

    class Second:
        def __call__(self, r: Reading) -> Reading:
            seen.append("second")
            return Reading(r.src, r.type, r.ts, {**r.data, "n": r.data["n"] + 1})

    class Sink:
        async def put(self, p: Pending) -> None: ...

        def put_nowait(self, p: Pending) -> bool:
            return True

    pipeline = Pipeline(
        [first, Second(), NormalizeStage(FakeClock())], lambda r: Pending(r.ts, r.src, r.type, r.data), Sink()
    )
    p = pipeline.process(Reading("pos", "pos.x", NOW))
    assert p is not None
    assert p.data == {"n": 2}
    assert seen == ["first", "second"]


def test_omitted_mappings_are_one_shared_read_only_empty_mapping() -> None:
    r = Reading("ble", "ble.adv", NOW)
    assert (r.data, r.ids, r.text) == ({}, {}, {})
    with pytest.raises(TypeError):
        r.data["x"] = 1  # type: ignore[index]  # the point: it is read-only
    assert r == Reading("ble", "ble.adv", NOW, {}, {}, {})


# ----------------------------------------------------------------------------- group commit


async def test_stored_bodies_are_exact_across_id_widths_and_mixed_sources(tmp_path: Path) -> None:
    """Bodies are msgpack of the wire map whichever insert path wrote them: ids cross the
    MessagePack widths (127/128, 255/256, 65535/65536) inside and at the edge of a commit,
    and one commit mixes sources; the backlog per source adds up."""
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path, commit_max_events=5000), clock)
    n = 66_000
    srcs: tuple[Source, ...] = ("ble", "nfc", "pos", "edge")
    for i in range(n):
        src = srcs[i % 7 % 4]
        await buf.put(Pending(NOW + i, src, f"{src}.t{i % 3}", {"i": i, "b": b"\x00\xff"}))
    assert await buf.flush() == n
    got = await buf.unsealed(1_000_000, 1 << 40)
    assert [e.id for e in got] == list(range(1, n + 1))
    for e in got[:300] + got[65_400:65_700] + got[-5:]:
        i = e.id - 1
        src = srcs[i % 7 % 4]
        want = {"id": e.id, "ts": NOW + i, "src": src, "type": f"{src}.t{i % 3}", "data": {"i": i, "b": b"\x00\xff"}}
        assert e.body == msgpack.packb(want, use_bin_type=True)
        assert (e.ts, e.src, e.size) == (NOW + i, src, len(e.body))
    stats = await buf.stats()
    for src in srcs:
        mine = [e for e in got if e.src == src]
        assert (stats.backlog[src].events, stats.backlog[src].bytes) == (len(mine), sum(e.size for e in mine))
    await buf.close()


@pytest.mark.parametrize("ts", [-5, 0, 10**13, 2**63 - 1])
async def test_unusual_capture_times_are_stored_as_given(tmp_path: Path, ts: int) -> None:
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    for i in range(3):
        await buf.put(Pending(ts if i == 1 else NOW, "pos", "pos.receipt", {"i": i}))
    await buf.flush()
    got = await buf.unsealed(10, 1 << 30)
    await buf.close()
    assert [(e.id, e.ts) for e in got] == [(1, NOW), (2, ts), (3, NOW)]
    assert msgpack.unpackb(got[1].body)["ts"] == ts


async def test_an_event_of_a_megabyte_is_stored_whole(tmp_path: Path) -> None:
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    big = "x" * (1 << 20)
    for i in range(3):
        await buf.put(Pending(NOW, "pos", "pos.receipt", {"note": big if i == 1 else "", "i": i}))
    await buf.flush()
    got = await buf.unsealed(10, 1 << 30)
    await buf.close()
    assert [msgpack.unpackb(e.body)["data"]["note"] == big for e in got] == [False, True, False]
    assert got[1].size > 1 << 20


async def test_commits_run_concurrently_with_producers_and_keep_order(tmp_path: Path) -> None:
    """Two producers interleave; ids follow put() order, every event is committed once."""
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path, commit_max_events=50, commit_interval="1ms"), clock)
    order: list[int] = []

    async def producer(base: int) -> None:
        for i in range(500):
            order.append(base + i)
            if not buf.put_nowait(Pending(NOW, "ble", "ble.adv", {"k": base + i})):
                await buf.put(Pending(NOW, "ble", "ble.adv", {"k": base + i}))
            if i % 37 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(producer(0), producer(10_000))
    await buf.flush()
    assert [e["data"]["k"] for e in await stored(buf)] == order
    await buf.close()


# ----------------------------------------------------------------------------- privacy shortcuts


def test_pseudonym_cache_gives_the_uncached_answer_and_is_bounded(tmp_path: Path) -> None:
    """The LRU is an optimization only: same pseudonyms as without it, before and after
    evictions and a key rotation (which empties it: old pseudonyms are never served)."""
    clock = FakeClock()
    keys = make_keys(tmp_path, clock)
    cached = Pseudonymizer(Privacy(), keys, None, cache_size=4)
    plain = Pseudonymizer(Privacy(), keys, None, cache_size=0)
    idents = [Ident("ble_address", f"aa:bb:cc:dd:ee:{i:02x}") for i in range(10)] + [Ident("nfc_uid", "04a23b1c5d8000")]
    before = [cached.pseudonym(i) for i in idents * 3]
    assert before == [plain.pseudonym(i) for i in idents * 3]
    assert all(p is not None and p.split(":")[1] == "e1" for p in before)
    keys.rotate()
    after = [cached.pseudonym(i) for i in idents]
    assert after == [plain.pseudonym(i) for i in idents]
    assert not set(before) & set(after)
    assert {p.split(":")[1] for p in after if p} == {"e2"}


CARD = "4111 1111 1111 1111"
SPELLINGS = [CARD, CARD.replace(" ", "-"), CARD.replace(" ", "")]


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.sampled_from(SPELLINGS))
def test_a_card_anywhere_in_any_text_is_scrubbed(before: str, after: str, card: str) -> None:
    """The prefilter that skips texts without a 13-character run of digits/spaces/dashes
    never skips a card, whatever surrounds it (unicode, surrogates, digits)."""
    text = f"{before} {card} {after}"
    out, n = scrub_cards(text)
    assert n >= 1
    assert card not in out
