"""The real POS backend: one serial port opened with pyserial, read on the event loop.

pyserial opens and configures the port (baud, data bits, parity, stop bits, flow control,
an exclusive lock) and puts the file descriptor in non-blocking mode; reading is then
`loop.add_reader` on that descriptor, not pyserial's blocking `read()` in a thread:

- no thread per link, so many links cost one selector entry each (a Pi has two cores);
- every byte is framed on the loop as it arrives, by a pure framer with bounded buffers
  (`drivers.pos.framing`); the reader callback never awaits and never blocks;
- backpressure is exact: when `HIGH_WATER` frames wait for the consumer, the reader is
  removed, so bytes stay in the kernel's tty buffer and hardware flow control (when
  configured) holds the sender; it is added back at `LOW_WATER`;
- cancellation and close are synchronous (`remove_reader`, `close`): nothing to join.
The cost is POSIX only (a selector event loop, as on the Linux box); ports are device
paths (`/dev/ttyUSB0`, `/dev/serial/by-id/...`), not pyserial URLs.

Failures: a port that cannot be opened, an end-of-file or I/O error while reading (the
adapter was unplugged, the far end of a pty hung up) raise `DriverError` with a reason
(`port_missing`, `port_permission`, `port_busy`, `port_open_failed`, `port_gone`,
`port_read_failed`); the facade degrades and reopens with backoff, so a replugged device
(its `/dev/serial/by-id/...` link back) is picked up again. Bad input (undecodable bytes,
oversize frames, LRC failures, noise, unknown commands) is counted per reason in
`problems` and logged as `pos_bad_input`, at most once per reason per `LOG_EVERY_S`,
without any content; the link stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import serial
import structlog

from drivers.pos.config import PosLink
from drivers.pos.framing import JsonFrame, TextFrame
from drivers.pos.link import LOG_EVERY_S, LinkDecoder, make_framer
from edge.clock import Clock
from edge.errors import DriverError
from edge.events import Reading

HIGH_WATER = 64  # frames waiting for the consumer before reading pauses
LOW_WATER = 16  # ... and resumes
READ_SIZE = 4096
__all__ = ["HIGH_WATER", "LOG_EVERY_S", "LOW_WATER", "READ_SIZE", "PosSerial", "make_framer", "open_serial"]

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
_STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}
_GONE_ERRNOS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF}


def open_serial(link: PosLink) -> serial.Serial:
    """Open and configure `link.port` (non-blocking, exclusive); pyserial's errors as is."""
    port = serial.Serial()
    port.port = link.port
    port.baudrate = link.baudrate
    port.bytesize = link.bytesize
    port.parity = _PARITY[link.parity]
    port.stopbits = _STOPBITS[link.stopbits]
    port.rtscts = link.flow_control == "rtscts"
    port.dsrdtr = link.flow_control == "dsrdtr"
    port.xonxoff = link.flow_control == "xonxoff"
    port.timeout = 0
    port.exclusive = True
    port.open()
    try:
        # pyserial leaves VMIN=0, where an empty non-blocking read returns b"" like a hangup;
        # with VMIN=1 it raises EAGAIN, so b"" (or EIO) means the device is really gone
        attrs = termios.tcgetattr(port.fileno())
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(port.fileno(), termios.TCSANOW, attrs)
    except BaseException:
        port.close()
        raise
    return port


def _open_error(link: PosLink, exc: OSError) -> DriverError:
    code = exc.errno
    text = str(exc)
    if code == errno.ENOENT or "No such file" in text:
        return DriverError(
            f"pos link {link.name}: serial port not found",
            reason="port_missing",
            hint="is the adapter plugged in? check the port path (prefer /dev/serial/by-id/...)",
        )
    if code in (errno.EACCES, errno.EPERM):
        return DriverError(
            f"pos link {link.name}: no permission to open the serial port",
            reason="port_permission",
            hint="add the service user to the dialout group",
        )
    if code == errno.EBUSY or "exclusively lock" in text:
        return DriverError(
            f"pos link {link.name}: serial port in use",
            reason="port_busy",
            hint="another process holds the port (ModemManager, a getty, a second edge instance?)",
        )
    return DriverError(
        f"pos link {link.name}: cannot open the serial port ({errno.errorcode.get(code or 0, 'unknown')})",
        reason="port_open_failed",
        hint="check the port path and the line settings (baudrate, bytesize, parity, stopbits)",
    )


class PosSerial:
    """Real POS backend for one link (see the module docstring).

    `open_port`: opens the link's port (default `open_serial`); a test may pass its own.
    `problems`: bad-input counts by reason, kept across reconnects.
    """

    name = "serial"

    def __init__(
        self,
        link: PosLink,
        clock: Clock,
        *,
        open_port: Callable[[PosLink], serial.Serial] = open_serial,
    ) -> None:
        self._link = link
        self._clock = clock
        self._open_port = open_port
        self._port: serial.Serial | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link_decoder = LinkDecoder(link, clock, self._reply)
        self._frames: deque[TextFrame | JsonFrame] = self._link_decoder.frames
        self._failure: Exception | None = None
        self._wake = asyncio.Event()
        self._reading = False
        self._last_rx = 0.0
        self._gap = link.gap_s
        self.problems: Counter[str] = self._link_decoder.problems
        self._log = structlog.get_logger("drivers.pos")

    async def open(self) -> None:
        """Open the port (idempotent). Raises DriverError when it cannot be opened."""
        if self._port is not None:
            return
        try:
            port = self._open_port(self._link)
        except OSError as exc:  # serial.SerialException is an OSError
            raise _open_error(self._link, exc) from exc
        self._port = port
        self._fd = port.fileno()
        self._link_decoder.restart()
        self._failure = None
        self._log.info("pos_port_open", link=self._link.name, framing=self._link.framing)

    async def aclose(self) -> None:
        """Stop reading and close the port. Safe to call more than once."""
        self._pause()
        port, self._port, self._fd = self._port, None, -1
        self._link_decoder.reset()
        if port is not None:
            with contextlib.suppress(OSError, termios.error):
                # drop unsent output (an ACK to a POS holding CTS low): otherwise close() waits
                # for the tty to drain, up to the driver's closing_wait (30 s), on the event loop
                termios.tcflush(port.fileno(), termios.TCOFLUSH)
            with contextlib.suppress(OSError):  # closing an unplugged device may fail: it is gone anyway
                port.close()

    async def readings(self) -> AsyncIterator[Reading]:
        await self.open()
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self._resume()
        gap = self._gap
        idled_at = -1.0
        try:
            while True:
                if self._frames:
                    frame = self._frames.popleft()
                    if len(self._frames) <= LOW_WATER:
                        self._resume()
                    reading = self._link_decoder.reading(frame)
                    if reading is not None:
                        yield reading
                    continue
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                self._wake.clear()
                timeout = None
                if gap > 0 and self._link_decoder.framer.buffered and self._last_rx != idled_at:
                    timeout = max(0.0, self._last_rx + gap - self._loop.time())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    if self._loop.time() - self._last_rx >= gap:
                        idled_at = self._last_rx  # one idle() per silence, even if bytes stay held
                        self._link_decoder.idle()
                        self._frames_ready()
        finally:
            self._pause()

    # -- the reader callback and what it feeds --------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._fail(None)
            return
        self._last_rx = asyncio.get_running_loop().time()
        self._link_decoder.feed(data)
        self._frames_ready()
        if self._gap > 0:  # the consumer (re)arms its silence timer from _last_rx
            self._wake.set()

    def _frames_ready(self) -> None:
        if self._frames:
            self._wake.set()
            if len(self._frames) >= HIGH_WATER:
                self._pause()

    def _reply(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, data)
        except BlockingIOError:  # output buffer full (flow control holds us): the sender will retry
            self.problems["reply_dropped"] += 1
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError | None) -> None:
        self._pause()
        if exc is None or exc.errno in _GONE_ERRNOS:
            err = DriverError(
                f"pos link {self._link.name}: serial device disconnected",
                reason="port_gone",
                hint="the adapter was unplugged or the far end hung up; reconnecting with backoff",
            )
        else:
            err = DriverError(
                f"pos link {self._link.name}: read failed ({errno.errorcode.get(exc.errno or 0, 'unknown')})",
                reason="port_read_failed",
                hint="check the cable and the adapter; reconnecting with backoff",
            )
        if exc is not None:
            err.__cause__ = exc
        self._failure = err
        self._wake.set()

    def _pause(self) -> None:
        if self._reading and self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _resume(self) -> None:
        if not self._reading and self._loop is not None and self._fd >= 0 and self._failure is None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def status(self) -> dict[str, Any]:
        """Bad-input counts by reason (no content), whether the port is open, and what is
        held in memory: bytes/characters of unfinished messages and frames waiting."""
        return {
            "problems": dict(self.problems),
            "port_open": self._port is not None,
            "buffered": self._link_decoder.framer.buffered,
            "queued": len(self._frames),
        }
