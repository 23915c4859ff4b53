"""The real POS backend (pyserial, read on the event loop) against a POS peer on a pty
pair, opened through a symlink like /dev/serial/by-id/...: a python-escpos receipt becomes
a structured receipt through the core's card scrub and normalize stages; STX/ETX frames
are ACKed/NAKed; garbage, oversize frames and floods are counted and logged without
content while the link stays up and memory stays bounded; unplug/replug degrades the
driver and it reconnects; several links run at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import Backoff
from drivers.pos import PosDriver
from drivers.pos.config import PosLink
from drivers.pos.serial import HIGH_WATER, PosSerial
from edge.clock import FakeClock
from edge.errors import DriverError
from edge.events import Ident, Reading
from edge.pipeline import NormalizeStage
from edge.privacy.stage import CardScrubStage
from hil.peers.pos import Item, PosPeer, receipt_job, stx_frame

FAST = Backoff(initial=0.05, max=0.3, jitter=0.0)
WAIT = 20.0  # generous: two cores shared with other test runs


def serial_link(peer: PosPeer, name: str = "till-1", **options: Any) -> PosLink:
    return PosLink(name=name, backend="serial", port=str(peer.path), **options)


class Pump:
    """Consumes a driver's readings in a background task (as the supervisor does)."""

    def __init__(self, driver: PosDriver) -> None:
        self.driver = driver
        self.queue: asyncio.Queue[Reading] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with contextlib.aclosing(self.driver.readings()) as it:
            async for r in it:
                await self.queue.put(r)

    async def next(self) -> Reading:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.driver.aclose()


@contextlib.asynccontextmanager
async def pumping(driver: PosDriver) -> AsyncIterator[Pump]:
    pump = Pump(driver)
    try:
        yield pump
    finally:
        await pump.stop()


async def until(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[PosPeer]:
    """A POS peer plugged in at <tmp>/serial/by-id/usb-...-port0."""
    with PosPeer(tmp_path / "serial" / "by-id") as p:
        yield p


def link_exists(path: Path) -> bool:
    return os.path.lexists(path)


def normalize(r: Reading) -> Reading:
    """The core's first two stages: card scrub, then receipt parsing."""
    return NormalizeStage(FakeClock())(CardScrubStage()(r))


async def test_python_escpos_receipt_becomes_a_structured_receipt(peer: PosPeer) -> None:
    """Text, EAN-13 and CODE128 barcodes, a QR code and the cut, sent as a slow line in
    small pieces: one pos.receipt with the right items, total and loyalty identifier; a
    card number printed in full is scrubbed before parsing."""
    clock = FakeClock()
    driver = PosDriver(serial_link(peer, framing="escpos", baudrate=115200), clock, backoff=FAST)
    printer = peer.printer()
    items = [
        Item("OAT DRINK 1L", "4006381333931", 2, 149),
        Item("DARK CHOC 85%", "4012345678901", 1, 219),
        Item("BANANAS", "SKU 4011", 3, 199),
    ]
    total = receipt_job(printer, register="till-1", receipt_no="0042-01-000123", items=items,
                        loyalty="912345678901", payment="VISA 4111 1111 1111 1111")
    async with pumping(driver) as pump:
        await until(lambda: driver.state == "running", "port open")  # opening flushes stale input
        await peer.print_job(printer, chunk=37, pause=0.001)
        r = await pump.next()
        assert driver.status()["state"] == "running"
    assert (r.src, r.type, r.data) == ("pos", "pos.receipt_text", {"register": "till-1"})
    assert r.ts == clock.wall
    out = normalize(r)
    assert out.type == "pos.receipt"
    assert total == 1114
    assert out.data == {
        "register": "till-1",
        "receipt_id": "0042-01-000123",
        "total_cents": 1114,
        "currency": "EUR",
        "items": [
            {"gtin": "4006381333931", "qty": 2, "price_cents": 149},
            {"gtin": "4012345678901", "qty": 1, "price_cents": 219},
            {"sku": "4011", "qty": 3, "price_cents": 199},
        ],
        "payment": "visa",
    }
    assert out.ids == {"loyalty": Ident("loyalty_id", "912345678901")}
    assert "4111" not in repr(out.data)


async def test_stx_etx_good_frames_acked_bad_lrc_nakked_link_stays_up(peer: PosPeer) -> None:
    """ACK 0x06 after a good frame (and a reading), NAK 0x15 after a bad LRC (no reading,
    counted as lrc), then the next good frame still goes through."""
    driver = PosDriver(serial_link(peer, framing="stx_etx", ack=True), FakeClock(), backoff=FAST)
    async with pumping(driver) as pump:
        await until(lambda: driver.state == "running", "port open")
        await peer.send(stx_frame(b"Receipt: 1\r\nTOTAL 1.00\r\n"))
        assert await peer.read(1, WAIT) == b"\x06"
        assert (await pump.next()).text["receipt"] == "Receipt: 1\nTOTAL 1.00"
        await peer.send(stx_frame(b"Receipt: 2\r\nTOTAL 2.00\r\n", bad_lrc=True))
        assert await peer.read(1, WAIT) == b"\x15"
        await peer.send(b"\x05")  # ENQ: are you there?
        assert await peer.read(1, WAIT) == b"\x06"
        await peer.send(stx_frame(b"Receipt: 3\r\nTOTAL 3.00\r\n"))
        assert await peer.read(1, WAIT) == b"\x06"
        assert (await pump.next()).text["receipt"] == "Receipt: 3\nTOTAL 3.00"
        assert pump.queue.empty()
        assert driver.status()["input_problems"] == {"lrc": 1}


async def test_garbage_and_oversize_are_counted_and_logged_without_content(peer: PosPeer) -> None:
    """Invalid UTF-8, a 200 KiB line with a card number in it, an oversize receipt: each
    counted by reason and logged once as pos_bad_input with sizes only; the next receipt
    arrives; no log line quotes the input."""
    link = serial_link(peer, framing="lines", max_frame=1024, receipt_end=r"^TOTAL")
    driver = PosDriver(link, FakeClock(), backoff=FAST)
    with capture_logs() as logs:
        async with pumping(driver) as pump:
            await until(lambda: driver.state == "running", "port open")
            await peer.send(b"SECRET \xff\xfe\xfd 4111111111111111\nTOTAL 1.00\n")
            first = await pump.next()
            await peer.send(b"SECRET 4111111111111111 " * 8000 + b"\n")  # one line, ~200 KiB
            await peer.send(b"SECRET line\n" * 200 + b"TOTAL 9.99\n")  # a receipt over 1 KiB
            await peer.send(b"Receipt: 5\nTOTAL 5.00\n")
            last = await pump.next()
    assert first.text["receipt"] == "SECRET \ufffd\ufffd\ufffd 4111111111111111\nTOTAL 1.00"  # the core scrubs it
    assert last.text["receipt"] == "Receipt: 5\nTOTAL 5.00"
    assert driver.status()["input_problems"] == {"decode": 1, "oversize": 2}
    bad = [e for e in logs if e["event"] == "pos_bad_input"]
    assert [e["reason"] for e in bad] == ["decode", "oversize"]  # rate-limited per reason
    assert all(set(e) == {"event", "log_level", "link", "reason", "size", "total", "since_last_log"} for e in bad)
    flat = json.dumps(logs, default=str)
    assert "SECRET" not in flat
    assert "4111" not in flat


async def test_a_flood_keeps_memory_bounded_and_the_link_up(peer: PosPeer) -> None:
    """4 MiB of random bytes on an ESC/POS tap (no cut), then a real receipt: memory held
    stays within the framer's bound (the receipt and its open line within max_frame, as much
    again for a probe of a suspect payload, plus command headers; test_pos_framing checks it
    after every chunk), and the receipt still arrives."""
    link = serial_link(peer, framing="escpos", max_frame=4096)
    driver = PosDriver(link, FakeClock(), backoff=FAST)
    backend = driver.backend
    assert isinstance(backend, PosSerial)
    rng = random.Random(6)
    peak = 0
    async with pumping(driver) as pump:
        await until(lambda: driver.state == "running", "port open")
        for _ in range(64):
            await peer.send(rng.randbytes(64 * 1024))
            peak = max(peak, backend.status()["buffered"])
        # noise may have declared a payload (an image) of up to 1 MiB: pad past it, then cut
        await peer.send(bytes(1024 * 1024 + 16) + b"\x1b@\x1dV\x00")
        printer = peer.printer()
        receipt_job(printer, register="till-1", receipt_no="77", items=[Item("TEA", "4006381333931", 1, 100)])
        await peer.print_job(printer)
        got = [await pump.next()]
        while "Receipt: 77" not in got[-1].text["receipt"]:
            got.append(await pump.next())
        assert (driver.status()["state"], driver.status()["errors"]) == ("running", 0)
    assert peak <= 2 * (4096 + 16)


async def test_a_slow_consumer_pauses_reading_and_loses_nothing(peer: PosPeer) -> None:
    """500 JSON receipts sent while nobody consumes: at most HIGH_WATER frames (plus one
    read's worth) wait in memory; the kernel buffer and the sender hold the rest; all 500
    arrive, in order."""
    driver = PosDriver(serial_link(peer, framing="jsonl"), FakeClock(), backoff=FAST)
    backend = driver.backend
    assert isinstance(backend, PosSerial)
    lines = b"".join(json.dumps({"receipt_id": f"R{i}", "total_cents": i}).encode() + b"\n" for i in range(500))
    it = driver.readings()
    first = asyncio.ensure_future(anext(it))
    await until(lambda: driver.state == "running", "port open")  # opening flushes stale input
    sender = asyncio.create_task(peer.send(lines))
    got = [await asyncio.wait_for(first, WAIT)]
    await asyncio.sleep(0.3)  # the consumer stalls; the reader keeps going until HIGH_WATER
    queued = backend.status()["queued"]
    assert HIGH_WATER <= queued <= HIGH_WATER + 4096 // 16
    while len(got) < 500:
        got.append(await asyncio.wait_for(anext(it), WAIT))
    await sender
    await it.aclose()
    await driver.aclose()
    assert [r.data["receipt_id"] for r in got] == [f"R{i}" for i in range(500)]
    assert all(r.type == "pos.receipt" for r in got)


async def test_unplug_degrades_and_replug_reconnects(peer: PosPeer) -> None:
    """The pty closes and its by-id link disappears: the driver degrades (port_gone, then
    port_missing while the path is absent) and retries with backoff; when a new device
    appears behind the same path it reopens and receipts flow again."""
    driver = PosDriver(serial_link(peer, framing="stx_etx"), FakeClock(), backoff=FAST)
    with capture_logs() as logs:
        async with pumping(driver) as pump:
            await until(lambda: driver.state == "running", "port open")
            await peer.send(stx_frame(b"TOTAL 1.00"))
            assert (await pump.next()).text["receipt"] == "TOTAL 1.00"
            peer.unplug()
            await until(lambda: driver.state == "degraded", "degraded")
            await until(lambda: driver.degraded_reason == "port_missing", "a reopen attempt")
            status = driver.status()
            assert (status["state"], status["backend"]) == ("degraded", "serial")
            assert not link_exists(peer.path)
            peer.replug()
            await until(lambda: driver.state == "running", "reconnect")
            await peer.send(stx_frame(b"TOTAL 2.00"))
            assert (await pump.next()).text["receipt"] == "TOTAL 2.00"
    reasons = [e["reason"] for e in logs if e["event"] == "driver_degraded"]
    assert reasons[0] == "port_gone"
    assert "port_missing" in reasons
    assert any(e["event"] == "driver_recovered" for e in logs)
    assert driver.status()["restarts"] >= 2
    assert peer.plugs == 2


async def test_far_end_closed_mid_frame_then_reopened(peer: PosPeer) -> None:
    """Half a frame, then the far end goes away: the half is dropped (truncated), never
    glued to the next device's first frame."""
    driver = PosDriver(serial_link(peer, framing="stx_etx"), FakeClock(), backoff=FAST)
    backend = driver.backend
    assert isinstance(backend, PosSerial)
    async with pumping(driver) as pump:
        await until(lambda: driver.state == "running", "port open")
        await peer.send(b"\x02TOTAL 9")
        await until(lambda: backend.status()["buffered"] > 0, "half a frame held")
        peer.replug()
        await until(lambda: driver.status()["restarts"] >= 1 and driver.state == "running", "reconnect")
        await peer.send(stx_frame(b"TOTAL 3.00"))
        assert (await pump.next()).text["receipt"] == "TOTAL 3.00"
        assert driver.status()["input_problems"] == {"truncated": 1}


async def test_missing_port_at_start_is_degraded_not_fatal(tmp_path: Path) -> None:
    """No device yet: constructing the driver does not touch the port; reading degrades
    with reason port_missing and a hint; plugging the device in brings it up."""
    peer = PosPeer(tmp_path / "by-id")
    driver = PosDriver(serial_link(peer), FakeClock(), backoff=FAST)
    assert driver.state == "starting"
    with capture_logs() as logs:
        async with pumping(driver):
            await until(lambda: driver.degraded_reason == "port_missing", "degraded")
            with peer:
                await until(lambda: driver.state == "running", "running")
    hint = next(e["hint"] for e in logs if e["event"] == "driver_degraded")
    assert "/dev/serial/by-id" in hint


async def test_a_port_held_by_another_process_is_port_busy(peer: PosPeer) -> None:
    """Ports are opened exclusively: a second opener gets reason port_busy; after the
    first closes, the port opens again."""
    link = serial_link(peer)
    first, second = PosSerial(link, FakeClock()), PosSerial(link, FakeClock())
    await first.open()
    with pytest.raises(DriverError) as err:
        await second.open()
    assert err.value.reason == "port_busy"
    await first.aclose()
    await second.open()
    await second.aclose()


async def test_two_links_at_once_each_with_its_framing(tmp_path: Path) -> None:
    """An ESC/POS tap and a lines link with a silence gap, read concurrently on one loop;
    each reading names its register."""
    with PosPeer(tmp_path / "a") as pa, PosPeer(tmp_path / "b") as pb:
        da = PosDriver(serial_link(pa, "till-1", framing="escpos"), FakeClock(), backoff=FAST)
        db = PosDriver(serial_link(pb, "till-2", framing="lines", receipt_gap=0.2), FakeClock(), backoff=FAST)
        async with pumping(da) as qa, pumping(db) as qb:
            await until(lambda: da.state == db.state == "running", "ports open")
            printer = pa.printer()
            receipt_job(printer, register="till-1", receipt_no="11", items=[Item("TEA", "4006381333931", 1, 100)])
            await asyncio.gather(
                pa.print_job(printer, chunk=64),
                pb.send(b"Receipt: 22\r\n4011  2 x 1.00\r\nTOTAL 2.00\r\n", chunk=5, pause=0.01),
            )
            ra, rb = await qa.next(), await qb.next()
    assert ra.data == {"register": "till-1"}
    assert rb.data == {"register": "till-2"}
    assert "Receipt: 11" in ra.text["receipt"]
    assert rb.text["receipt"] == "Receipt: 22\n4011  2 x 1.00\nTOTAL 2.00"
    assert normalize(rb).data["items"] == [{"sku": "4011", "qty": 2, "price_cents": 100}]


async def test_jsonl_link_gives_structured_receipts_and_receipt_text(peer: PosPeer) -> None:
    """A structured JSON receipt is whitelisted into pos.receipt (loyalty as identifier);
    one carrying "receipt" text goes to the pipeline as pos.receipt_text; an object that
    is no receipt is counted."""
    driver = PosDriver(serial_link(peer, framing="jsonl"), FakeClock(), backoff=FAST)
    async with pumping(driver) as pump:
        await until(lambda: driver.state == "running", "port open")
        await peer.send(
            b'{"hello": "world"}\n'
            b'{"receipt_id": "A1", "total_cents": 250, "loyalty": "123456789", "email": "x@example.com",'
            b' "items": [{"gtin": "4006381333931", "qty": 1, "price_cents": 250}]}\n'
            b'{"receipt": "Receipt: B2\\nTOTAL 1.00"}\n'
        )
        structured, text = await pump.next(), await pump.next()
    assert structured.type == "pos.receipt"
    assert structured.data["items"] == [{"gtin": "4006381333931", "qty": 1, "price_cents": 250}]
    assert "x@example.com" not in repr(structured.data)
    assert structured.ids == {"loyalty": Ident("loyalty_id", "123456789")}
    assert (text.type, text.text) == ("pos.receipt_text", {"receipt": "Receipt: B2\nTOTAL 1.00"})
    assert driver.status()["input_problems"] == {"json": 1}
