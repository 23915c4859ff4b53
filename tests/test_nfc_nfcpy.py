"""The real NFC backend: nfcpy reading an emulated Type 3 tag over nfcpy's udp transport.

Taps of a product tag (GS1 Digital Link), a plain text tag, a loyalty card and a
malformed NDEF area; a tag resting on the reader is one tap, a re-tap after the debounce
interval a new one; an emulator process that vanishes and comes back is a tag lifted and
tapped again; a reader that is absent or unplugged degrades the driver (`status()`) and
it recovers when the reader returns, without a restart. nfcpy never runs on the event
loop and stops when asked.

The udp transport has no reader hardware to unplug: the unplug test opens real nfcpy
frontends through the backend's `frontend` seam and closes them under nfcpy, which then
fails with ENODEV exactly as it does when a USB reader disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nfc
import pytest
import structlog

from drivers.base import Backoff
from drivers.nfc import NfcDriver
from drivers.nfc.config import Nfc, NfcRule
from drivers.nfc.nfcpy import Frontend, NfcpyBackend
from edge.clock import SystemClock
from edge.events import Ident, Reading
from hil.peers.nfctag import EmulatedTag, free_udp_port, loyalty_tag, malformed_tag, product_tag, text_tag

REPO = Path(__file__).resolve().parent.parent
CLUB = "https://club.acme-retail.example/card/"
LOYALTY = "987654321098"
IDM = {name: bytes.fromhex(h) for name, h in
       {"product": "03FE000000000001", "text": "03FE000000000002", "loyalty": "03FE000000000003",
        "malformed": "03FE000000000004"}.items()}
FAST = Backoff(initial=0.1, max=0.5, jitter=0.0)


def config(port: int, **kw: Any) -> Nfc:
    opts: dict[str, Any] = {"poll_interval": 0.05, "debounce": 0.3} | kw
    return Nfc(
        backend="nfcpy",
        device=f"udp:127.0.0.1:{port}",
        targets=["212F"],  # the emulator is NFC-F; each target costs up to 1 s per poll on udp
        rules=[NfcRule(name="gs1", kind="product", gs1_digital_link=True),
               NfcRule(name="club", kind="loyalty", uri_prefix=CLUB)],
        **opts,
    )


async def until(cond: Callable[[], bool], what: str, within: float = 60.0) -> None:
    """Wait (generously: the machine may be busy) for `cond`; fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(driver: NfcDriver) -> AsyncIterator[list[Reading]]:
    """Pump the driver's readings into a list (as the supervisor would) until the block ends."""
    got: list[Reading] = []

    async def pump() -> None:
        async with contextlib.aclosing(driver.readings()) as it:
            async for r in it:
                got.append(r)

    task = asyncio.create_task(pump())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await driver.aclose()


def count_is(items: list[Reading], n: int) -> Callable[[], bool]:
    return lambda: len(items) == n


def stats(driver: NfcDriver) -> dict[str, int]:
    out: dict[str, int] = driver.status()["nfc"]
    return out


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nfc-reader" and t.is_alive()]


async def test_product_text_loyalty_and_malformed_tags_become_taps() -> None:
    """Four tags in turn: product with GTIN/batch/serial, unknown text, loyalty with the
    number as an identifier, malformed NDEF counted and logged; no raw UID or number in
    data or logs; after stop no reader thread is left."""
    port = free_udp_port()
    driver = NfcDriver(config(port, debounce=2.0), SystemClock())
    tag = EmulatedTag(product_tag(idm=IDM["product"]), port)
    images = [product_tag(idm=IDM["product"]), text_tag(idm=IDM["text"]),
              loyalty_tag(LOYALTY, prefix=CLUB, idm=IDM["loyalty"]), malformed_tag(idm=IDM["malformed"])]
    with structlog.testing.capture_logs() as logs:
        async with running(driver) as got:
            for n, image in enumerate(images, 1):
                await asyncio.to_thread(tag.place, image)
                await until(count_is(got, n), f"tap {n}")
                await asyncio.to_thread(tag.lift)
                await until(lambda: stats(driver)["resting"] == 0, "tag lifted")
    product, text, loyalty, malformed = got
    assert product.data == {
        "kind": "product", "tag_type": "Type3", "ndef": "ok",
        "records": [{"type": "uri", "scheme": "https"}, {"type": "text", "lang": "en", "chars": 13}],
        "rule": "gs1", "gtin": "09506000134352", "batch": "ABC123", "serial": "12345"}
    assert product.ids == {"card": Ident("nfc_uid", "03FE000000000001")}
    assert text.data["kind"] == "unknown"
    assert text.data["records"] == [{"type": "text", "lang": "en", "chars": 15}]
    assert (loyalty.data["kind"], loyalty.data["rule"]) == ("loyalty", "club")
    assert loyalty.ids == {"card": Ident("nfc_uid", "03FE000000000003"), "loyalty": Ident("loyalty_id", LOYALTY)}
    assert (malformed.data["kind"], malformed.data["ndef"]) == ("unknown", "invalid")
    assert all((r.src, r.type) == ("nfc", "nfc.tap") for r in got)
    assert stats(driver)["ndef_rejected"] == 1
    assert driver.status()["errors"] == 0
    assert [e for e in logs if e["event"] == "nfc_ndef_rejected"] == [
        {"event": "nfc_ndef_rejected", "reason": "malformed", "bytes": 18, "tag_type": "Type3Tag",
         "log_level": "warning"}]
    text_of_everything = repr(logs) + repr([r.data for r in got])
    for raw in (LOYALTY, *(idm.hex() for idm in IDM.values()), *(idm.hex().upper() for idm in IDM.values())):
        assert raw not in text_of_everything
    assert reader_threads() == []


async def test_resting_tag_is_one_tap_and_a_quick_return_is_the_same_tap() -> None:
    """A tag held on the reader for seconds is one tap; lifted and put back within the
    debounce interval, it is still that tap (counted as debounced)."""
    port = free_udp_port()
    driver = NfcDriver(config(port, debounce=30.0), SystemClock())
    tag = EmulatedTag(loyalty_tag(LOYALTY, prefix=CLUB), port)
    async with running(driver) as got:
        await asyncio.to_thread(tag.place)
        await until(lambda: len(got) == 1, "first tap")
        activations = tag.activations
        await asyncio.sleep(3.0)  # resting: nfcpy keeps checking the tag is there
        await until(lambda: stats(driver)["resting"] == 1, "tag still resting")
        assert len(got) == 1
        await asyncio.to_thread(tag.lift)
        await until(lambda: stats(driver)["resting"] == 0, "tag lifted")
        await asyncio.to_thread(tag.place)
        await until(lambda: stats(driver)["debounced"] >= 1, "the quick return seen")
        assert len(got) == 1
        assert tag.activations > activations
        await asyncio.to_thread(tag.lift)


async def test_retap_after_the_debounce_interval_is_a_new_tap() -> None:
    port = free_udp_port()
    driver = NfcDriver(config(port, debounce=1.0), SystemClock())
    tag = EmulatedTag(product_tag(), port)
    async with running(driver) as got:
        await asyncio.to_thread(tag.place)
        await until(lambda: len(got) == 1, "first tap")
        await asyncio.to_thread(tag.lift)
        await until(lambda: stats(driver)["resting"] == 0, "tag lifted")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(tag.place)
        await until(lambda: len(got) == 2, "second tap")
        await asyncio.to_thread(tag.lift)
    assert [r.data.get("gtin") for r in got[:2]] == ["09506000134352"] * 2, [r.data for r in got]


def start_emulator(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hil.peers.nfctag", "--port", str(port), "--tag", "loyalty", "--number", LOYALTY],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("nfctag ready")
    return proc


async def test_emulator_process_vanishing_and_reappearing_is_a_lift_and_a_new_tap() -> None:
    """An emulator killed mid-session (no goodbye) is, to the reader, a tag taken away:
    the driver stays running; when the emulator comes back, the tag is tapped again."""
    port = free_udp_port()
    driver = NfcDriver(config(port, debounce=1.0), SystemClock(), backoff=FAST)
    async with running(driver) as got:
        proc = await asyncio.to_thread(start_emulator, port)
        try:
            await until(lambda: len(got) == 1, "tap from the first emulator")
            proc.kill()
            await asyncio.to_thread(proc.wait)
            await until(lambda: stats(driver)["resting"] == 0, "the vanished tag noticed")
            assert driver.status()["state"] == "running"
            await asyncio.sleep(1.5)
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            assert proc.stdout is not None
            proc.stdout.close()
        proc = await asyncio.to_thread(start_emulator, port)
        try:
            await until(lambda: len(got) == 2, "tap from the emulator that came back")
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait)
            assert proc.stdout is not None
            proc.stdout.close()
    # the tap after the comeback is read whole; the first one may be read as `unknown` when the
    # machine is loaded (nfcpy gives no NDEF for a read that timed out: seen once on a busy CI run;
    # re-reading made the weekend-offline HIL scenario count taps twice, so the driver does not)
    assert len(got) == 2
    assert got[0].data["kind"] in ("loyalty", "unknown")
    assert got[1].data["kind"] == "loyalty"
    assert driver.status()["errors"] == 0


class UsbPort:
    """Where the reader is plugged in: opens real nfcpy frontends while plugged; unplug()
    closes them under nfcpy (its device is gone: every call fails with ENODEV) and makes
    opening fail with ENODEV, as nfcpy does for a USB reader that is not there."""

    def __init__(self) -> None:
        self.plugged = True
        self.opened: list[Any] = []

    def __call__(self, path: str) -> Frontend:
        if not self.plugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        clf = nfc.ContactlessFrontend(path)
        self.opened.append(clf)
        frontend: Frontend = clf
        return frontend

    def unplug(self) -> None:
        self.plugged = False
        for clf in self.opened:
            clf.close()


async def test_unplugged_reader_degrades_with_backoff_and_recovers_when_it_returns() -> None:
    """Reader gone mid-session: `reader_lost`, then `reader_absent` while it stays away
    (retries with backoff), visible in status(); plugged back: running again and the
    tag still on it is read, with no restart of anything but the backend."""
    port = free_udp_port()
    cfg = config(port, debounce=1.0)
    usb = UsbPort()
    driver = NfcDriver(cfg, SystemClock(), backend=NfcpyBackend(cfg, SystemClock(), frontend=usb), backoff=FAST)
    tag = EmulatedTag(loyalty_tag(LOYALTY, prefix=CLUB), port)
    reasons: list[str | None] = []
    with structlog.testing.capture_logs() as logs:
        async with running(driver) as got:
            await asyncio.to_thread(tag.place)
            await until(lambda: len(got) == 1, "tap before the unplug")
            assert driver.status()["state"] == "running"
            await asyncio.to_thread(usb.unplug)
            await until(lambda: driver.status()["state"] == "degraded", "degraded")
            reasons.append(driver.status()["degraded_reason"])
            await until(lambda: driver.status()["degraded_reason"] == "reader_absent", "open failing")
            await until(lambda: driver.status()["restarts"] >= 3, "retries while absent")
            status = driver.status()
            await asyncio.sleep(1.5)  # longer than the debounce: the tag still on it is a new tap
            usb.plugged = True
            await until(lambda: driver.status()["state"] == "running", "recovered")
            await until(lambda: len(got) == 2, "tap after the reader came back")
            await asyncio.to_thread(tag.lift)
    assert reasons == ["reader_lost"]
    assert (status["state"], status["degraded_reason"], status["backend"]) == ("degraded", "reader_absent", "nfcpy")
    assert status["errors"] >= 3
    degraded = [e for e in logs if e["event"] == "driver_degraded"]
    assert degraded[0]["reason"] == "reader_lost"
    assert all(e["reason"] == "reader_absent" and "plugged in" in e["hint"] for e in degraded[1:])
    assert [e["event"] for e in logs].count("driver_recovered") == 1
    assert LOYALTY not in repr(logs)
    assert got[1].ids["loyalty"] == Ident("loyalty_id", LOYALTY)


async def test_absent_reader_at_start_is_degraded_with_reason_and_hint() -> None:
    """A serial reader path with no device behind it: degraded (`reader_absent`), retried."""
    cfg = Nfc(backend="nfcpy", device="tty:NFCTEST9:pn532")
    driver = NfcDriver(cfg, SystemClock(), backoff=FAST)
    with structlog.testing.capture_logs() as logs:
        async with running(driver):
            await until(lambda: driver.status()["restarts"] >= 2, "retries")
            status = driver.status()
    assert (status["state"], status["degraded_reason"]) == ("degraded", "reader_absent")
    first = next(e for e in logs if e["event"] == "driver_degraded")
    assert "tty:NFCTEST9:pn532" in first["error"]
    assert "plugged in" in first["hint"]


class LoopingFrontend:
    """A stand-in reader that polls (calls `terminate`) and never sees a tag. `wedged`:
    the first connect hangs without polling until `unwedge` is set."""

    def __init__(self, *, wedged: bool = False) -> None:
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.unwedge = threading.Event()
        self.wedged = wedged
        self.closed = 0

    def __call__(self, path: str) -> Frontend:
        return self

    def connect(self, **options: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.wedged:
            self.wedged = False
            self.unwedge.wait(60)
        terminate = options["terminate"]
        while not terminate():
            pass
        return None

    def close(self) -> None:
        self.closed += 1


async def test_nfcpy_runs_in_a_worker_thread_and_stops_when_asked() -> None:
    """connect() runs in the "nfc-reader" thread while the loop keeps running; closing the
    readings ends that thread (terminate callback) and closes the reader."""
    cfg = Nfc(backend="nfcpy", device="udp:127.0.0.1:9")
    fake = LoopingFrontend()
    driver = NfcDriver(cfg, SystemClock(), backend=NfcpyBackend(cfg, SystemClock(), frontend=fake))
    ticks = 0
    async with running(driver):
        await until(fake.entered.is_set, "connect called")
        for _ in range(50):
            await asyncio.sleep(0.001)
            ticks += 1
        assert driver.status()["state"] == "running"
        assert reader_threads() != []
    assert ticks == 50
    assert fake.threads == ["nfc-reader"]
    assert reader_threads() == []
    assert fake.closed == 1
    assert driver.status()["state"] == "stopped"


async def test_wedged_reader_is_detected_and_the_backend_reopens_it() -> None:
    """nfcpy stuck without polling for stall_timeout: degraded `reader_stalled`; once it
    lets go, the reader is reopened and the driver runs again."""
    cfg = Nfc(backend="nfcpy", device="udp:127.0.0.1:9", stall_timeout=5)
    fake = LoopingFrontend(wedged=True)
    driver = NfcDriver(cfg, SystemClock(), backend=NfcpyBackend(cfg, SystemClock(), frontend=fake,
                                                                join_timeout=0.2), backoff=FAST)
    async with running(driver):
        await until(lambda: driver.status()["state"] == "degraded", "watchdog")
        assert driver.status()["degraded_reason"] == "reader_stalled"
        fake.unwedge.set()
        await until(lambda: driver.status()["state"] == "running", "reopened")
        await until(lambda: len(fake.threads) >= 2, "polling again")
