"""The simulated backends: realistic readings of the promised types, deterministic for a
seed, paced at the configured rate on the injected clock (and fast when asked), and
carrying injected raw identifiers early on (the simulations' part of the leak test)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from drivers.base import classify_injected
from drivers.ble.adverts import Advert
from drivers.ble.sim import BleSim
from drivers.ble.simstore import RandomStore, random_private_address
from drivers.nfc.sim import NfcSim
from drivers.pos.receipt import parse_receipt
from drivers.pos.sim import PosSim
from edge.clock import FakeClock, SystemClock
from edge.config import Ble, Nfc, PosLink, SimRate
from edge.events import Ident, Reading
from edge.privacy.scrub import holds_card

MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
HEX14 = re.compile(r"^04[0-9A-F]{12}$")


class FakeSleep:
    """Advances the FakeClock instead of sleeping; records each delay."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)


async def take(it: AsyncIterator[Reading]) -> list[Reading]:
    return [r async for r in it]


def gtin13_ok(code: str) -> bool:
    """GS1 check digit, written out independently of the code under test."""
    if len(code) != 13 or not code.isdigit():
        return False
    s = sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(code[:12]))
    return (10 - s % 10) % 10 == int(code[12])


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def valid_random_address(mac: str) -> bool:
    """BLE Core spec Vol 6 Part B 1.3.2: static (top bits 11) or resolvable private (01),
    random parts neither all zeros nor all ones."""
    if not MAC.match(mac):
        return False
    v = int(mac.replace(":", ""), 16)
    top = v >> 46
    if top == 0b11:
        rand = v & ((1 << 46) - 1)
        return rand not in (0, (1 << 46) - 1)
    if top == 0b01:
        prand_rand = (v >> 24) & ((1 << 22) - 1)
        return prand_rand not in (0, (1 << 22) - 1)
    return False


def shape(r: Reading) -> tuple[Any, ...]:
    return (
        r.type,
        r.ts,
        sorted(r.data.items()),
        sorted((k, v.cls, v.raw) for k, v in r.ids.items()),
        dict(r.text),
    )


# -- BLE --------------------------------------------------------------------------------

BEACONS = {"known": [
    {"name": "door", "ibeacon": {"uuid": "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", "major": 1, "minor": 2}},
    {"name": "shelf-7", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000007"}},
]}


async def test_ble_sim_yields_the_real_event_types_for_a_made_up_store() -> None:
    """Over two store-hours at 5 adverts/s: phones enter and exit (dwell from the presence
    engine), occupancy every minute, the configured beacons seen and with telemetry; every
    phone event carries a valid random address only as an identifier."""
    clock = FakeClock()
    cfg = Ble.model_validate({"sim": {"rate": 5, "seed": 7}, "beacons": BEACONS})
    sim = BleSim(cfg, clock, limit=1500, sleep=FakeSleep(clock))
    got = await take(sim.readings())
    assert len(got) == 1500
    counts = Counter(r.type for r in got)
    assert set(counts) == {"presence.enter", "presence.exit", "presence.occupancy", "beacon.seen", "beacon.telemetry"}
    assert counts["presence.enter"] >= counts["presence.exit"] > 50
    present: set[str] = set()
    for r in got:
        assert r.src == "ble"
        if r.type.startswith("beacon."):
            assert r.ids == {}
            assert r.data["beacon"] in ("door", "shelf-7")
            continue
        if r.type == "presence.occupancy":
            assert r.ids == {}
            assert r.data["interval_ms"] == 60_000
            continue
        ident = r.ids["device"]
        assert ident.cls == "ble_address"
        assert valid_random_address(ident.raw)
        assert not any(ident.raw in str(v) for v in r.data.values())
        if r.type == "presence.enter":
            assert ident.raw not in present
            present.add(ident.raw)
            assert -100 <= r.data["rssi"] <= -30
        else:
            present.remove(ident.raw)
            assert r.data["rssi_min"] <= r.data["rssi_mean"] <= r.data["rssi_max"]
            assert r.data["reason"] == "gone"
            assert r.data["dwell_ms"] >= 0
    assert sim.stats()["foreign_beacon_adverts"] > 0  # the neighbour's beacons are ignored


async def test_ble_sim_is_deterministic_for_a_seed() -> None:
    async def run(seed: int) -> list[tuple[Any, ...]]:
        clock = FakeClock()
        sim = BleSim(Ble(sim=SimRate(rate=5, seed=seed)), clock, limit=300, sleep=FakeSleep(clock))
        return [shape(r) for r in await take(sim.readings())]

    assert await run(11) == await run(11)
    assert await run(11) != await run(12)


def test_random_private_addresses_have_the_spec_shape() -> None:
    rng = random.Random(5)
    for kind in ("resolvable", "static"):
        addrs = [random_private_address(rng, kind) for _ in range(3000)]
        assert all(valid_random_address(a) for a in addrs)
        assert len(set(addrs)) == len(addrs)
    assert all(int(random_private_address(rng, "resolvable")[:2], 16) >> 6 == 0b01 for _ in range(100))
    assert all(int(random_private_address(rng, "static")[:2], 16) >> 6 == 0b11 for _ in range(100))


# -- NFC --------------------------------------------------------------------------------


NFC_RULES = [
    {"name": "gs1", "kind": "product", "gs1_digital_link": True},
    {"name": "club", "kind": "loyalty", "uri_prefix": "https://club.example/card/"},
]


async def test_nfc_sim_yields_product_and_loyalty_taps() -> None:
    """Shelf tags are GS1 Digital Links (a valid GTIN-14 in data); loyalty cards written for
    the configured rule carry the card UID and the loyalty number only as identifiers."""
    clock = FakeClock()
    cfg = Nfc.model_validate({"sim": {"rate": 0.5, "seed": 3}, "rules": NFC_RULES})
    sim = NfcSim(cfg, clock, limit=600, sleep=FakeSleep(clock))
    got = await take(sim.readings())
    kinds = Counter(r.data["kind"] for r in got)
    assert set(kinds) == {"product", "loyalty", "unknown"}
    assert 0.2 <= kinds["loyalty"] / len(got) <= 0.45
    for r in got:
        assert (r.src, r.type) == ("nfc", "nfc.tap")
        assert r.ids["card"].cls == "nfc_uid"
        assert re.match(r"^[0-9A-F]{14}$", r.ids["card"].raw)
        if r.data["kind"] == "product":
            assert r.data["rule"] == "gs1"
            assert len(r.data["gtin"]) == 14
            assert gtin13_ok(r.data["gtin"][1:])
            assert r.data["tag_type"] == "Type2"
            assert set(r.ids) == {"card"}
        elif r.data["kind"] == "loyalty":
            assert r.data["rule"] == "club"
            assert r.data["tag_type"] in ("Type2", "Type4")
            assert r.ids["loyalty"].cls == "loyalty_id"
            assert re.match(r"^\d{12}$", r.ids["loyalty"].raw)
            assert not any(r.ids["loyalty"].raw in str(v) for v in r.data.values())
    loyal = Counter(r.ids["loyalty"].raw for r in got if "loyalty" in r.ids)
    assert loyal.most_common(1)[0][1] >= 2  # returning customers tap again
    products = Counter(r.data["gtin"] for r in got if r.data["kind"] == "product")
    assert products.most_common(1)[0][1] >= 5 * min(products.values())  # some products are popular
    assert sim.stats()["debounced"] > 0


# -- POS --------------------------------------------------------------------------------

PAN_LINE = re.compile(r"^(VISA|MASTERCARD|MAESTRO|AMEX|GIROCARD|CARD) ([\d ]{13,23}?)\s{2,}\d+\.\d\d$", re.M)


def scrub_cards(text: str) -> str:
    """What the pipeline's card scrubber does, approximately: full PANs become [card]."""

    def repl(m: re.Match[str]) -> str:
        return f"{m[1]} [card]" if luhn_ok(m[2].replace(" ", "")) else m[0]

    return PAN_LINE.sub(repl, text)


async def test_pos_sim_prints_receipts_a_printer_tap_would_see() -> None:
    """Receipt text with header, items, TOTAL, masked cards; now and then a full card
    number (~5 %), an e-mail (~5 %) or a phone (~3 %); totals add up once parsed."""
    clock = FakeClock()
    sim = PosSim(
        PosLink(name="till-1", sim=SimRate(rate=0.2, seed=5)), clock, limit=400, sleep=FakeSleep(clock)
    )
    got = await take(sim.readings())
    full_pans = emails = phones = loyalty = 0
    receipt_ids = set()
    for r in got:
        assert (r.src, r.type) == ("pos", "pos.receipt_text")
        assert r.data == {"register": "till-1"}
        assert r.ids == {}
        text = r.text["receipt"]
        assert "Register: till-1" in text
        assert "\nTOTAL EUR" in text
        full_pans += sum(1 for m in PAN_LINE.finditer(text) if luhn_ok(m[2].replace(" ", "")))
        emails += "Receipt sent to " in text and bool(re.search(r"\S+@\S+\.\w+", text))
        phones += "Delivery contact: +" in text
        loyalty += bool(re.search(r"^Loyalty: \d{12}$", text, re.M))
        data, ids = parse_receipt(scrub_cards(text), "till-1")
        assert data["items"]
        lines = [
            round(it["qty"] * it["price_cents"])
            if isinstance(it["qty"], int)
            else (round(it["qty"] * 1000) * it["price_cents"] + 500) // 1000
            for it in data["items"]
        ]
        assert data["total_cents"] == sum(lines)
        assert data["currency"] == "EUR"
        assert data["payment"] in ("visa", "mastercard", "maestro", "amex", "girocard", "cash")
        assert all(("gtin" in it) != ("sku" in it) for it in data["items"])
        assert all(gtin13_ok(it["gtin"]) for it in data["items"] if "gtin" in it)
        assert set(ids) <= {"loyalty"}
        receipt_ids.add(data["receipt_id"])
    assert len(receipt_ids) == 400
    assert 5 <= full_pans <= 40
    assert 5 <= emails <= 40
    assert 2 <= phones <= 30
    assert 100 <= loyalty <= 220


async def test_two_pos_links_with_one_seed_print_different_receipts() -> None:
    clock = FakeClock()
    a = PosSim(PosLink(name="till-1", sim=SimRate(seed=1)), clock, limit=3, sleep=FakeSleep(clock))
    b = PosSim(PosLink(name="till-2", sim=SimRate(seed=1)), clock, limit=3, sleep=FakeSleep(clock))
    ta = [r.text["receipt"] for r in await take(a.readings())]
    tb = [r.text["receipt"] for r in await take(b.readings())]
    assert ta != tb


# -- pacing -----------------------------------------------------------------------------


async def test_rate_is_readings_per_second_on_the_injected_clock() -> None:
    """1000 receipts at 5/s take ~200 s of (fake) time and almost no real time."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    sim = PosSim(PosLink(name="till-1", sim=SimRate(rate=5, seed=1)), clock, limit=1000, sleep=sleep)
    start_mono, start_wall, t0 = clock.monotonic(), clock.wall_ms(), time.perf_counter()
    got = await take(sim.readings())
    assert len(got) == 1000
    assert 175 <= clock.monotonic() - start_mono <= 225
    assert 175_000 <= got[-1].ts - start_wall <= 225_000
    assert all(d > 0 for d in sleep.delays)
    assert time.perf_counter() - t0 < 1.0


async def test_fast_mode_does_not_sleep_per_reading() -> None:
    """At a very high rate the advertisement source sleeps only once in a few hundred adverts."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    store = RandomStore(Ble(sim=SimRate(rate=200_000, seed=1)), clock, sleep=sleep)
    t0 = time.perf_counter()
    got: list[Advert] = []
    async for a in store:
        got.append(a)
        if len(got) == 50_000:
            break
    assert len(got) == 50_000
    assert 0 < len(sleep.delays) <= 50_000 / 100
    assert clock.monotonic() - 1000.0 == pytest.approx(50_000 / 200_000, rel=0.05)
    assert time.perf_counter() - t0 < 10


async def test_fast_mode_with_the_real_clock_yields_to_the_loop() -> None:
    """With the system clock and a slower consumer: only sleep(0) now and then."""
    delays: list[float] = []

    async def recording_sleep(s: float) -> None:
        delays.append(s)
        await asyncio.sleep(s)

    nfc = Nfc(sim=SimRate(rate=1_000_000, seed=1), debounce=0)  # every activation a reading
    sim = NfcSim(nfc, SystemClock(), limit=20_000, sleep=recording_sleep)
    got = await take(sim.readings())
    assert len(got) == 20_000
    assert len(delays) <= 20_000 / 50
    assert sum(delays) < 0.5


# -- injected identifiers (the simulations' part of the leak test) ------------------------

INJECT = [
    "D2:4B:11:7C:3A:9E",
    "04A1B2C3D4E5F6",
    "123456789012",
    "4111111111111111",
    "jane.leaktest@example.com",
    "+44 7700 900999",
]


async def test_injected_identifiers_appear_in_the_first_readings() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    ble = await take(BleSim(Ble(sim=SimRate(seed=1)), clock, inject=INJECT, limit=50, sleep=sleep).readings())
    assert ble[0].type == "presence.enter"
    assert ble[0].ids["device"] == Ident("ble_address", "D2:4B:11:7C:3A:9E")
    nfc_cfg = Nfc.model_validate({"sim": {"seed": 1}, "rules": NFC_RULES})
    nfc = await take(NfcSim(nfc_cfg, clock, inject=INJECT, limit=50, sleep=sleep).readings())
    assert nfc[0].data["kind"] == "loyalty"
    assert dict(nfc[0].ids) == {
        "card": Ident("nfc_uid", "04A1B2C3D4E5F6"),
        "loyalty": Ident("loyalty_id", "123456789012"),
    }
    assert all(r.ids.get("card") != nfc[0].ids["card"] for r in nfc[1:])
    pos = await take(PosSim(PosLink(name="till-1"), clock, inject=INJECT, limit=3, sleep=sleep).readings())
    first = pos[0].text["receipt"]
    assert "VISA 4111111111111111" in first
    assert "Loyalty: 123456789012" in first
    assert "Receipt sent to jane.leaktest@example.com" in first
    assert "Delivery contact: +44 7700 900999" in first
    assert not any(raw in r.text["receipt"] for r in pos[1:] for raw in INJECT[3:])


async def test_several_injected_values_of_a_class_go_to_successive_readings() -> None:
    clock = FakeClock()
    inject = ["nfc_uid:04000000000001", "nfc_uid:04000000000002", "loyalty_id:5550001"]
    nfc = await take(
        NfcSim(Nfc.model_validate({"sim": {"seed": 2}, "rules": NFC_RULES}), clock, inject=inject, limit=2,
               sleep=FakeSleep(clock)).readings()
    )
    assert [r.ids["card"].raw for r in nfc] == ["04000000000001", "04000000000002"]
    assert nfc[0].ids["loyalty"].raw == "5550001"
    assert re.match(r"^\d{12}$", nfc[1].ids["loyalty"].raw)  # filled in from the pool


def test_injected_identifiers_are_classified_by_shape_or_prefix() -> None:
    got = classify_injected([*INJECT, "email:not-an-address", "phone:07700 900123"])
    assert {k: list(v) for k, v in got.items() if v} == {
        "ble_address": ["D2:4B:11:7C:3A:9E"],
        "nfc_uid": ["04A1B2C3D4E5F6"],
        "loyalty_id": ["123456789012"],
        "card_number": ["4111111111111111"],
        "email": ["jane.leaktest@example.com", "not-an-address"],
        "phone": ["+44 7700 900999", "07700 900123"],
    }


def test_unrecognized_injected_identifier_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="#1") as err:
        classify_injected(["04A1B2C3D4E5F6", "zz-secret-zz"])
    assert "zz-secret-zz" not in str(err.value)


# -- the BLE seam: an injected advertisement source ------------------------------------------


async def test_an_injected_source_drives_the_ble_sim_and_its_end_closes_sessions() -> None:
    """`SimOptions(ble_source=...)` reaches the BLE sim through build_drivers; a phone heard
    twice enters once; when the source ends its session is closed (reason "stop")."""
    from drivers.base import SimOptions
    from drivers.registry import build_drivers
    from edge.config import Config, Drivers, Identity

    clock = FakeClock()
    phone = "D2:4B:11:7C:3A:9E"

    async def source() -> AsyncIterator[Advert]:
        for _ in range(2):
            clock.advance(1.0)
            yield Advert(clock.monotonic(), phone, -60, {0x004C: bytes.fromhex("1005011820A1B2")})

    cfg = Config(identity=Identity(tenant="t", store="s", device="d"),
                 drivers=Drivers(nfc=Nfc(enabled=False)))
    (driver,) = build_drivers(cfg, clock, sim=SimOptions(ble_source=source()))
    got = [r async for r in driver.readings()]
    assert [r.type for r in got] == ["presence.enter", "presence.exit"]
    assert got[0].ids["device"] == Ident("ble_address", phone)
    assert got[1].data["reason"] == "stop"
    assert got[1].data["dwell_ms"] == 1000
    assert driver.status()["ble"]["adverts"] == 2


async def test_a_failing_source_degrades_the_ble_driver_and_is_retried() -> None:
    from drivers.base import Backoff
    from drivers.ble import BleDriver

    clock = FakeClock()
    runs = 0

    class Broken:
        def __aiter__(self) -> AsyncIterator[Advert]:
            return self._run()

        async def _run(self) -> AsyncIterator[Advert]:
            nonlocal runs
            runs += 1
            yield Advert(clock.monotonic(), "D2:4B:11:7C:3A:9E", -60)
            raise RuntimeError("boom")

    cfg = Ble(sim=SimRate(seed=1))
    driver = BleDriver(cfg, clock, backend=BleSim(cfg, clock, source=Broken()),
                       backoff=Backoff(initial=0.01, max=0.01, jitter=0.0))
    types = []
    async for r in driver.readings():
        types.append(r.type)
        if len(types) == 4:
            break
    assert types == ["presence.enter", "presence.exit"] * 2
    assert runs == 2
    assert driver.counters.errors >= 1
    assert driver.degraded_reason in (None, "sim_source_failed")


def _luhn_fill(body: str) -> str:
    return next(body + c for c in "0123456789" if luhn_ok(body + c))


def _injected_as_card(value: str) -> bool:
    try:
        return value in classify_injected([value])["card_number"]
    except ValueError:  # no shape of its own (a 13-digit code that is no card)
        return False


def test_injected_bare_digits_are_cards_exactly_when_the_card_scrub_says_so() -> None:
    """One implementation: `classify_injected` takes a bare digit string as a card number
    when the card scrub (`holds_card`) does: a card outside the network table (UzCard
    8600...) is one, a Luhn-valid EAN-13 (a loyalty or product code to the scrubber) is not."""
    uzcard = _luhn_fill("860012345678901")
    assert list(classify_injected([uzcard])["card_number"]) == [uzcard]
    ean13 = "5901234123457"  # valid EAN-13, Luhn-valid
    assert luhn_ok(ean13)
    with pytest.raises(ValueError, match="#0"):
        classify_injected([ean13])
    rng = random.Random(5)
    for _ in range(3000):
        value = _luhn_fill("".join(rng.choices("0123456789", k=rng.randrange(12, 19))))
        assert _injected_as_card(value) is holds_card(value), value
