"""A POS (or its receipt printer line) on a pty pair: the far end of a POS serial link.

The driver opens `PosPeer.path`, a symlink to the pty's slave side, the way a real box
opens a `/dev/serial/by-id/...` link; the peer writes what a till would send on the
master side and reads what the driver answers (ACK/NAK). `unplug()` closes the pty and
removes the link (the driver sees end-of-file, as after a USB unplug); `replug()` makes a
new pty and points the link at it, so the driver must find the device again by path.

ESC/POS streams come from python-escpos's own printer classes: `printer()` hands out an
`escpos.printer.Dummy` (it records the bytes it would send to a printer) and
`print_job()` sends them down the line. `receipt_job()` prints a typical till receipt:
text, an EAN-13 barcode, a CODE128 receipt barcode, a QR code and the paper cut.

Used by tests/test_pos_*.py and by the HIL rig's `--target sim`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tty
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from escpos.printer import Dummy

STX, ETX = b"\x02", b"\x03"
DEFAULT_NAME = "usb-StoreEdge_POS_Tap_SIM0001-if00-port0"


def lrc(message: bytes) -> int:
    """XOR of the message bytes and ETX (the check byte after ETX)."""
    value = 0x03
    for b in message:
        value ^= b
    return value


def stx_frame(message: bytes, *, bad_lrc: bool = False) -> bytes:
    """STX message ETX LRC; with `bad_lrc` the check byte is wrong."""
    check = lrc(message) ^ (0x5A if bad_lrc else 0)
    return STX + message + ETX + bytes([check])


@dataclass(slots=True, frozen=True)
class Item:
    name: str
    code: str  # GTIN or "SKU nnnn"
    qty: int
    price_cents: int


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class PosPeer:
    """The POS end of one link (see the module docstring). Use as a context manager or
    call `plug()` / `close()`."""

    def __init__(self, link_dir: Path, name: str = DEFAULT_NAME) -> None:
        self.path = Path(link_dir) / name
        self._master = -1
        self._slave = -1
        self.plugs = 0

    def __enter__(self) -> PosPeer:
        self.plug()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def plugged(self) -> bool:
        return self._master >= 0

    def plug(self) -> Path:
        """A new pty pair in raw mode, with `path` pointing at its slave; returns `path`."""
        if self.plugged:
            return self.path
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.path)  # atomic, like udev replacing a by-id link
        self.plugs += 1
        return self.path

    def unplug(self) -> None:
        """Remove the link and close the pty: the driver's next read sees end-of-file."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def replug(self) -> Path:
        """`unplug()` (if plugged) then `plug()`: a new device node behind the same path."""
        self.unplug()
        return self.plug()

    def close(self) -> None:
        self.unplug()

    # -- talking on the line --------------------------------------------------------------

    async def send(self, data: bytes, *, chunk: int = 0, pause: float = 0.0) -> None:
        """Write `data` on the line, waiting while the pty buffer is full (the driver reads
        on the same loop). `chunk` > 0 writes it in pieces of that size, `pause` seconds
        apart, like a slow line."""
        if not self.plugged:
            raise OSError("the POS peer is unplugged")
        view = memoryview(data)
        step = chunk if chunk > 0 else len(data) or 1
        for start in range(0, len(data), step):
            await self._write_all(view[start : start + step])
            if pause:
                await asyncio.sleep(pause)

    async def _write_all(self, data: memoryview) -> None:
        loop = asyncio.get_running_loop()
        while data:
            try:
                n = os.write(self._master, data)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self._master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(self._master)
                continue
            data = data[n:]

    async def read(self, size: int, wait_s: float) -> bytes:
        """Up to `size` bytes the driver wrote back (ACK/NAK); fewer after `wait_s` seconds."""
        loop = asyncio.get_running_loop()
        out = bytearray()
        deadline = loop.time() + wait_s
        while len(out) < size:
            try:
                got = os.read(self._master, size - len(out))
            except BlockingIOError:
                got = b""
            if got:
                out += got
                continue
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        return bytes(out)

    # -- ESC/POS ---------------------------------------------------------------------------

    @staticmethod
    def printer(profile: str = "TM-T88V") -> Dummy:
        """A python-escpos printer that records its output (see `print_job`)."""
        return Dummy(profile=profile)

    async def print_job(self, printer: Dummy, *, chunk: int = 0, pause: float = 0.0) -> bytes:
        """Send what `printer` recorded (see `send`), then clear it; returns the bytes sent."""
        data: bytes = printer.output
        printer.clear()
        await self.send(data, chunk=chunk, pause=pause)
        return data


def receipt_job(
    printer: Dummy,
    *,
    register: str,
    receipt_no: str,
    items: Sequence[Item],
    loyalty: str | None = None,
    payment: str = "VISA ************1234",
    currency: str = "EUR",
    cut: bool = True,
) -> int:
    """Print one till receipt on `printer` (text, barcodes, QR, cut); returns the total."""
    width = 42
    total = sum(it.qty * it.price_cents for it in items)
    p = printer
    p.hw("INIT")
    p.set(align="center", bold=True, double_height=True, double_width=True)
    p.text("FRESHMART\n")
    p.set(align="center", normal_textsize=True)
    p.text("12 Market Street, Springfield\n")
    p.set(align="left")
    p.text(f"Register: {register}\n")
    p.text(f"Receipt: {receipt_no}\n")
    p.text("-" * width + "\n")
    for it in items:
        p.text(f"{it.name}\n")
        line = f"  {it.code:<14}{it.qty:>5} x {_money(it.price_cents):>7}"
        p.text(f"{line:<{width - 9}}{_money(it.qty * it.price_cents):>9}\n")
    p.text("-" * width + "\n")
    p.set(bold=True)
    p.text(f"{'TOTAL ' + currency:<{width - 10}}{_money(total):>10}\n")
    p.set(bold=False)
    if loyalty is not None:
        p.text(f"Loyalty: {loyalty}\n")
    p.text(f"{payment}\n")
    with contextlib.redirect_stdout(io.StringIO()):  # python-escpos prints a notice per barcode
        if items and items[0].code.isdigit() and len(items[0].code) == 13:
            p.barcode(items[0].code, "EAN13")
        p.barcode("{B" + receipt_no, "CODE128", function_type="B")
    p.qr(f"https://receipts.example/{receipt_no}", native=True)
    p.set(align="center")
    p.text("Thank you for shopping with us!\n")
    if cut:
        p.cut()
    return total
