"""Adapters from the runner's `StimulusPeer` to the simulated peers in `hil.peers`.

Each adapter plays its kind's steps on its peer and keeps the ledger (what the daemon must
make of them, and the raw identifiers used). Background traffic (`do: traffic`) is a task
that makes up random steps of the kind (Poisson arrivals at `rate` per second; for POS per
till) and plays them like scripted ones, until `until` or the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from edge.events import IdentClass
from edge.privacy.cards import gtin_check_digit, luhn_complete
from hil.peer import APPLIED, Ledger, Outcome, PeerMode, StimulusPeer
from hil.scenario import (
    Kind,
    NfcTap,
    PosGarbage,
    PosReceipt,
    Scenario,
    Step,
    Traffic,
)

SEND_TIMEOUT = 10.0  # a line the daemon does not read (it is down) must not stall the timeline


class TrafficPlayer:
    """Background traffic tasks of one adapter."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self._sc = scenario
        self._rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self.played = 0

    def start(self, step: Traffic, make: Callable[[random.Random], Step], play: Callable[[Step], Awaitable[Outcome]],
              lanes: int = 1) -> None:  # fmt: skip
        end = time.monotonic() + (step.until if step.until is not None else self._sc.duration) - step.at
        for _ in range(lanes):
            rng = random.Random(self._rng.getrandbits(64))
            task = asyncio.create_task(self._run(step.rate, end, rng, make, play), name=f"hil:traffic:{step.kind}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, rate: float, end: float, rng: random.Random, make: Callable[[random.Random], Step],
                   play: Callable[[Step], Awaitable[Outcome]]) -> None:  # fmt: skip
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if time.monotonic() >= end:
                return
            await play(make(rng))
            self.played += 1

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------ POS


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


class PtyPosPeer:
    """One pty pair per till (hil.peers.pos); the daemon's `serial` backend, framing escpos."""

    kind: Kind = "pos"
    mode: PeerMode = "peer"

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        from hil.peers.pos import PosPeer

        self.description = "pty pair per till, ESC/POS receipts from python-escpos (hil.peers.pos); backend serial"
        self._sc = scenario
        self._peers = {t: PosPeer(workdir / "pos-links", name=f"usb-HIL_POS_{t}-if00-port0") for t in scenario.tills}
        self._ledger = Ledger(exact=True)
        self._rng = random.Random(0x705)
        self._traffic = TrafficPlayer(scenario, 0x706)
        self._n = 0
        self._lock = asyncio.Lock()

    def unavailable(self) -> str | None:
        return None

    def driver_config(self) -> Any:
        return [{"name": t, "backend": "serial", "port": str(p.path), "framing": "escpos"}
                for t, p in self._peers.items()]  # fmt: skip

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        for p in self._peers.values():
            p.plug()

    async def apply(self, step: Step) -> Outcome:
        if isinstance(step, Traffic):
            tills = self._sc.tills

            def make(rng: random.Random) -> Step:
                return PosReceipt(at=0, do="pos.receipt", till=rng.choice(tills), items=rng.randint(1, 8),
                                  loyalty=rng.random() < 0.4, pan=rng.choice(("cash", "masked", "masked")))  # fmt: skip

            self._traffic.start(step, make, self.apply, lanes=len(tills))
            return Outcome("applied", f"{step.rate:g} receipts/s per till")
        if isinstance(step, PosReceipt):
            data, ids = self._receipt(step)
            if not await self._send(step.till, data):
                return Outcome("unsupported", "the line stayed blocked (nobody reading)")
            self._ledger.emit("pos.receipt", ids)
            return APPLIED
        if isinstance(step, PosGarbage):
            ok = await self._send(step.till, random.Random(step.seed).randbytes(step.size))
            return APPLIED if ok else Outcome("unsupported", "the line stayed blocked (nobody reading)")
        return Outcome("unsupported", f"{step.do} has no POS meaning")

    async def _send(self, till: str, data: bytes) -> bool:
        async with self._lock:  # one writer per line at a time: receipts must not interleave
            try:
                await asyncio.wait_for(self._peers[till].send(data), SEND_TIMEOUT)
            except (TimeoutError, OSError):
                return False
        return True

    def _receipt(self, step: PosReceipt) -> tuple[bytes, list[tuple[IdentClass, str]]]:
        from hil.peers.pos import Item, PosPeer, receipt_job

        rng = self._rng
        self._n += 1
        ids: list[tuple[IdentClass, str]] = []
        items = []
        for _ in range(step.items):
            body = "40" + _digits(rng, 10)
            items.append(Item("RIG ITEM", body + gtin_check_digit(body), 1 if rng.random() < 0.8 else 2,
                              rng.randrange(49, 1999)))  # fmt: skip
        loyalty = None
        if step.loyalty:
            loyalty = "8" + _digits(rng, 11)
            ids.append(("loyalty_id", loyalty))
        if step.pan == "cash":
            payment = "CASH"
        else:
            pan = luhn_complete("4" + _digits(rng, 14))
            payment = f"VISA {pan}" if step.pan == "full" else f"VISA ************{pan[-4:]}"
            if step.pan == "full":
                ids.append(("card_number", pan))
        printer = PosPeer.printer()
        receipt_job(printer, register=step.till, receipt_no=f"0001-{self._n:06d}", items=items, loyalty=loyalty,
                    payment=payment, cut=False)  # fmt: skip
        if step.email:
            email = f"rig.customer{rng.randrange(10**6):06d}@example.com"
            ids.append(("email", email))
            printer.text(f"Receipt sent to {email}\n")
        if step.phone:
            phone = f"+1 555-01{rng.randrange(100):02d} {rng.randrange(10**4):04d}"
            ids.append(("phone", phone))
            printer.text(f"Delivery contact: {phone}\n")
        printer.cut()
        out: bytes = printer.output
        return out, ids

    async def quiesce(self) -> None:
        await self._traffic.stop()

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        return self._ledger

    async def stop(self) -> None:
        await self._traffic.stop()
        for p in self._peers.values():
            with contextlib.suppress(OSError):
                p.close()


# ------------------------------------------------------------------------------------ NFC

LOYALTY_PREFIX = "https://club.hil-rig.example/card/"
TAP_TIMEOUT = 4.0  # nfcpy's udp transport senses about once a second
LIFT_PAUSE = 1.2  # away from the reader before the next tap


class UdpNfcPeer:
    """An emulated Type 3 tag on nfcpy's udp transport (hil.peers.nfctag); backend nfcpy.

    A tap puts a tag image on the reader, waits until the reader has read its NDEF area
    (or `TAP_TIMEOUT`), and lifts it. Taps are played one at a time (there is one reader);
    background traffic faster than a tap takes is played as fast as taps go.
    """

    kind: Kind = "nfc"
    mode: PeerMode = "peer"

    def __init__(self, scenario: Scenario) -> None:
        from hil.peers.nfctag import free_udp_port

        self.description = "emulated Type 3 tag over nfcpy's udp transport (hil.peers.nfctag); backend nfcpy"
        self._port = free_udp_port()
        self._tag: Any = None
        self._ledger = Ledger(exact=True)
        self._rng = random.Random(0x7A9)
        self._cards: dict[str, tuple[bytes, str]] = {}
        self._traffic = TrafficPlayer(scenario, 0x7AA)
        self._lock = asyncio.Lock()
        self.missed = 0
        self._inflight: asyncio.Future[bool] | None = None

    def unavailable(self) -> str | None:
        return None

    def driver_config(self) -> Any:
        return {"enabled": True, "backend": "nfcpy", "device": f"udp:127.0.0.1:{self._port}",
                "poll_interval": "100ms", "debounce": "300ms",
                "rules": [{"name": "gs1", "kind": "product", "gs1_digital_link": True},
                          {"name": "club", "kind": "loyalty", "uri_prefix": LOYALTY_PREFIX}]}  # fmt: skip

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        return None

    async def apply(self, step: Step) -> Outcome:
        if isinstance(step, Traffic):

            def make(rng: random.Random) -> Step:
                if rng.random() < 0.3:
                    return NfcTap(at=0, do="nfc.tap", tag="loyalty", card=f"c{rng.randrange(40)}")
                return NfcTap(at=0, do="nfc.tap", tag="product")

            self._traffic.start(step, make, self._background)
            return Outcome("applied", f"up to {step.rate:g} taps/s (one reader: a tap takes 1-2 s)")
        if not isinstance(step, NfcTap):
            return Outcome("unsupported", f"{step.do} has no NFC meaning")
        from hil.peers import nfctag

        idents: list[tuple[IdentClass, str]] = []
        if step.tag == "product":
            body = "40" + _digits(self._rng, 10)
            image = nfctag.product_tag("0" + body + gtin_check_digit(body), idm=self._idm())
        else:
            label = step.card or f"card{len(self._cards)}"
            if label not in self._cards:
                self._cards[label] = (self._idm(), "7" + _digits(self._rng, 11))
            idm, number = self._cards[label]
            image = nfctag.loyalty_tag(number, prefix=LOYALTY_PREFIX, idm=idm)
            idents = [("nfc_uid", idm.hex()), ("loyalty_id", number)]
        async with self._lock:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._tap, image, idents))
            read = await asyncio.shield(self._inflight)
        if not read:
            self.missed += 1
            return Outcome("unsupported", f"the reader did not activate the tag within {TAP_TIMEOUT:g} s")
        return APPLIED

    async def _background(self, step: Step) -> Outcome:
        """A traffic tap, skipped while the reader is busy: scripted taps go first."""
        if self._lock.locked():
            return Outcome("approximated", "reader busy: skipped")
        return await self.apply(step)

    def _idm(self) -> bytes:
        return bytes([0x03, 0xFE]) + self._rng.randbytes(6)  # not 01FE (NFC-DEP)

    def _tap(self, image: Any, idents: list[tuple[IdentClass, str]]) -> bool:
        """One tap: a fresh tag on the reader until its whole NDEF area was read, then away
        long enough for the reader's presence check to notice (else two taps look like one)."""
        from hil.peers.nfctag import BLOCK, EmulatedTag

        tag = EmulatedTag(image, self._port)
        self._tag = tag
        blocks = len(image.area) // BLOCK - 1  # attribute + data blocks; ndef_area adds a spare one
        tag.place()
        deadline = time.monotonic() + TAP_TIMEOUT
        try:
            while tag.blocks_read < blocks and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)
        finally:
            tag.lift()
            self._tag = None
        # the reader saw a tag: the daemon makes a tap of it (ndef "none" if it was cut short);
        # recorded here, in the thread, so a cancelled caller cannot lose it
        activated = bool(tag.activations > 0)
        if activated:
            self._ledger.emit("nfc.tap", idents)
        time.sleep(LIFT_PAUSE)
        return activated

    async def quiesce(self) -> None:
        await self._traffic.stop()
        if self._inflight is not None:  # a tap on the reader right now: let it finish
            await asyncio.gather(self._inflight, return_exceptions=True)

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        if self.missed:
            self._ledger.notes.append(f"{self.missed} taps not read by the reader (not expected)")
        return self._ledger

    async def stop(self) -> None:
        await self._traffic.stop()
        if self._tag is not None:
            with contextlib.suppress(RuntimeError):
                await asyncio.to_thread(self._tag.lift)


def sim_peer(kind: Kind, scenario: Scenario, workdir: Path) -> StimulusPeer | None:
    """The adapter for `kind`'s simulated peer; None while there is none."""
    if kind == "pos":
        return PtyPosPeer(scenario, workdir)
    if kind == "nfc":
        return UdpNfcPeer(scenario)
    from hil.simble import BluezBlePeer

    return BluezBlePeer(scenario)
