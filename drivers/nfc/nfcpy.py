"""The real NFC backend: nfcpy's `ContactlessFrontend` in a worker thread, bridged to asyncio.

nfcpy is blocking. `open()` opens the reader in a thread; `readings()` starts one worker
thread ("nfc-reader") that runs `clf.connect(rdwr=...)` in a loop and hands what it sees
to the event loop with `call_soon_threadsafe` into a bounded queue (a full queue drops the
newest tap and counts it; a failure is never dropped). The event loop never blocks.

- A tag: `on-connect` reads its type, UID and NDEF message (in the worker), then returns
  True, so nfcpy waits until the tag is gone: a tag resting on the reader is one tap.
  `on-release` reports it gone; the `Debouncer` turns a quick return into the same tap.
- Stop: nfcpy's `terminate` callback waits `poll_interval` on a threading.Event, so
  setting it ends `connect` at the next poll (USB readers: milliseconds; nfcpy's udp
  transport waits up to 1 s per sense). The worker is joined for at most `join_timeout`
  seconds without blocking the loop; a worker stuck in nfcpy is abandoned (daemon thread).
- Failures: opening fails with the reader absent (ENODEV), inaccessible, busy or libusb
  missing -> `DriverError` with a reason and hint. While running, nfcpy turns an I/O
  error of the device into `connect() -> False`: `DriverError(reason="reader_lost")`.
  nfcpy silent for `stall_timeout` (no poll, no presence check): `reader_stalled`. The
  facade degrades, backs off and reopens the reader: it recovers when the reader returns.

The device is opened through `frontend(path)` (default: `nfc.ContactlessFrontend`), the
seam a test uses to pull the plug on a real nfcpy frontend.

Privacy: nfcpy's DEBUG log lines print tag IDs and memory in plain hex, so opening the
reader raises the `nfc` logger to INFO at least. Our own messages carry reasons,
counts and sizes, never UIDs or tag content.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from drivers.nfc.config import Nfc
from drivers.nfc.tap import TagRead, TapSession
from edge.clock import Clock
from edge.errors import DriverError
from edge.events import Reading

log = structlog.get_logger("drivers.nfc")

_UNPLUGGED_HINT = (
    "check the reader is plugged in (`lsusb`), not claimed by pcscd or a kernel driver"
    " (blacklist pn533_usb), and that the service user may open it"
)


class Frontend(Protocol):
    """The part of `nfc.ContactlessFrontend` this backend uses."""

    def connect(self, **options: Any) -> Any: ...

    def close(self) -> None: ...


FrontendFactory = Callable[[str], Frontend]


def nfcpy_frontend(path: str) -> Frontend:
    """Open the reader at `path` with nfcpy (raises OSError when it is not there)."""
    import nfc

    nfc_log = logging.getLogger("nfc")
    if nfc_log.getEffectiveLevel() < logging.INFO:
        nfc_log.setLevel(logging.INFO)  # its DEBUG lines carry raw tag IDs (see module docstring)
    frontend: Frontend = nfc.ContactlessFrontend(path)
    return frontend


@dataclass(slots=True, frozen=True)
class _Arrived:
    read: TagRead
    ts: int
    at: float  # clock.monotonic() when it was read

    def __repr__(self) -> str:
        return "_Arrived(<redacted>)"


@dataclass(slots=True, frozen=True)
class _Left:
    uid: bytes
    at: float

    def __repr__(self) -> str:
        return "_Left(<redacted>)"


@dataclass(slots=True, frozen=True)
class _Failed:
    error: DriverError


_Msg = _Arrived | _Left | _Failed


class _Inbox:
    """Worker thread -> event loop. Bounded for taps; failures always get in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._max = maxsize
        self._items: deque[_Msg] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def post(self, msg: _Msg) -> None:
        """Called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._offer, msg)

    def _offer(self, msg: _Msg) -> None:
        if isinstance(msg, _Arrived) and len(self._items) >= self._max:
            self.dropped += 1
            log.warning("nfc_tap_dropped", reason="queue_full", dropped=self.dropped)
            return
        self._items.append(msg)
        self._ready.set()

    async def get(self, wait_s: float) -> _Msg | None:
        """The next message, or None after `wait_s` seconds without one."""
        if not self._items:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), wait_s)
            except TimeoutError:
                return None
        return self._items.popleft()


class _ReaderLoop:
    """Runs in the worker thread: nfcpy's connect loop, reporting into the inbox."""

    def __init__(self, clf: Frontend, cfg: Nfc, clock: Clock, inbox: _Inbox, stop: threading.Event) -> None:
        self._clf = clf
        self._cfg = cfg
        self._clock = clock
        self._inbox = inbox
        self._stop = stop
        self.beat = clock.monotonic()  # last sign of life from nfcpy (read by the event loop)

    def run(self) -> None:
        rdwr = {
            "targets": list(self._cfg.targets),
            "on-connect": self._on_connect,
            "on-release": self._on_release,
            "iterations": 1,  # one sense per connect round; the pause is in `_terminate`
            "interval": 0.0,
            "beep-on-connect": self._cfg.beep,
        }
        try:
            while not self._stop.is_set():
                result = self._clf.connect(rdwr=rdwr, terminate=self._terminate)
                if self._stop.is_set():
                    return
                if result is False:  # nfcpy caught an IOError from the device and gave up
                    self._fail(
                        DriverError("the NFC reader stopped answering", reason="reader_lost", hint=_UNPLUGGED_HINT)
                    )
                    return
        except OSError as exc:
            code = errno_mod.errorcode.get(exc.errno or 0, "EIO")
            self._fail(DriverError(f"the NFC reader failed ({code})", reason="reader_lost", hint=_UNPLUGGED_HINT))
        except Exception as exc:  # nfcpy raised what it does not catch itself: garbage from the device
            self._fail(
                DriverError(
                    f"nfcpy failed with {type(exc).__name__}",
                    reason="reader_error",
                    hint="the reader returned a frame nfcpy could not handle; it is reopened",
                )
            )

    def _terminate(self) -> bool:
        self.beat = self._clock.monotonic()
        return self._stop.wait(self._cfg.poll_interval)

    def _on_connect(self, tag: Any) -> bool:
        self.beat = self._clock.monotonic()
        self._inbox.post(_Arrived(read_tag(tag), self._clock.wall_ms(), self._clock.monotonic()))
        return True  # wait until the tag is gone (presence check), then on-release

    def _on_release(self, tag: Any) -> bool:
        self._inbox.post(_Left(_uid(tag), self._clock.monotonic()))
        return True

    def _fail(self, error: DriverError) -> None:
        self._inbox.post(_Failed(error))


def _uid(tag: Any) -> bytes:
    try:
        return bytes(tag.identifier or b"")[:16]
    except Exception:  # a tag object that cannot even say its UID is a tag without one
        return b""


def read_tag(tag: Any) -> TagRead:
    """Type, UID and NDEF message of an activated nfcpy tag (blocking I/O; worker thread).
    Never raises: an NDEF area that cannot be read is `ndef_failed`."""
    try:
        tag_type = str(tag.type)[:16]
    except Exception:  # see _uid
        tag_type = "Unknown"
    uid = _uid(tag)
    try:
        ndef = tag.ndef
        return TagRead(tag_type, uid, None if ndef is None else bytes(ndef.octets))
    except Exception:  # tag moved away mid-read, or answered garbage
        return TagRead(tag_type, uid, None, ndef_failed=True)


def open_error(path: str, exc: BaseException) -> DriverError:
    """What went wrong opening the reader, with a hint an operator can act on."""
    if isinstance(exc, DriverError):
        return exc
    if isinstance(exc, socket.gaierror):
        return DriverError(
            f"cannot resolve the host in NFC device {path!r}", reason="reader_absent", hint="check drivers.nfc.device"
        )
    if isinstance(exc, OSError):
        text = exc.strerror or (str(exc.args[-1]) if exc.args else type(exc).__name__)
        if "libusb" in text:
            return DriverError(
                f"cannot open NFC device {path!r}: {text}",
                reason="libusb_missing",
                hint="install libusb (apt-get install libusb-1.0-0)",
            )
        reasons = {
            errno_mod.ENODEV: ("reader_absent", _UNPLUGGED_HINT),
            errno_mod.ENOENT: ("reader_absent", _UNPLUGGED_HINT),
            errno_mod.EACCES: ("reader_access", "let the service user open the reader (udev rule, group plugdev)"),
            errno_mod.EPERM: ("reader_access", "let the service user open the reader (udev rule, group plugdev)"),
            errno_mod.EBUSY: ("reader_busy", "stop pcscd or unload pn533_usb: another owner holds the reader"),
        }
        reason, hint = reasons.get(exc.errno or 0, ("reader_error", _UNPLUGGED_HINT))
        return DriverError(f"cannot open NFC device {path!r}: {text}", reason=reason, hint=hint)
    if isinstance(exc, (ValueError, TypeError)):
        return DriverError(
            f"nfcpy rejected NFC device path {path!r}",
            reason="bad_device_path",
            hint="use usb[:vendor:product], tty:<port>:<driver> or udp:<host>:<port>",
        )
    return DriverError(
        f"cannot open NFC device {path!r}: {type(exc).__name__}", reason="reader_error", hint=_UNPLUGGED_HINT
    )


class NfcpyBackend:
    """Real NFC readers through nfcpy (see the module docstring).

    `frontend`: opens the reader for a device path (default `nfcpy_frontend`).
    `join_timeout`: longest wait for the worker thread on stop.
    """

    name = "nfcpy"

    def __init__(
        self,
        cfg: Nfc,
        clock: Clock,
        *,
        frontend: FrontendFactory | None = None,
        queue_max: int = 64,
        join_timeout: float = 3.0,
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._frontend = frontend if frontend is not None else nfcpy_frontend
        self._queue_max = queue_max
        self._join_timeout = join_timeout
        self._taps = TapSession(cfg)
        self._clf: Frontend | None = None
        self._worker: threading.Thread | None = None
        self._dropped = 0  # by inboxes of earlier runs
        self._inbox: _Inbox | None = None

    def stats(self) -> dict[str, int]:
        """For `status()`: tags resting on the reader now, taps, debounced, dropped, rejections."""
        out = self._taps.stats()
        out["dropped"] = self._dropped + (self._inbox.dropped if self._inbox is not None else 0)
        return out

    async def open(self) -> None:
        """Open the reader (in a thread). Raises `DriverError` when it cannot be opened."""
        if self._clf is not None:
            return
        path = self._cfg.device
        try:
            self._clf = await asyncio.to_thread(self._frontend, path)
        except Exception as exc:  # every way of failing to open becomes a DriverError with a hint
            raise open_error(path, exc) from exc
        log.info("nfc_reader_open", device=path)

    async def readings(self) -> AsyncIterator[Reading]:
        await self.open()
        clf = self._clf
        if clf is None:  # open() sets it or raises; aclose() from another task may have run since
            raise DriverError("the NFC reader was closed", reason="reader_closed")
        inbox = self._inbox = _Inbox(asyncio.get_running_loop(), self._queue_max)
        stop = threading.Event()
        reader = _ReaderLoop(clf, self._cfg, self._clock, inbox, stop)
        worker = threading.Thread(target=reader.run, name="nfc-reader", daemon=True)
        self._worker = worker
        worker.start()
        check = min(5.0, self._cfg.stall_timeout / 4)
        try:
            while True:
                msg = await inbox.get(check)
                if msg is None:
                    silent = self._clock.monotonic() - reader.beat
                    if silent > self._cfg.stall_timeout:
                        raise DriverError(
                            f"nfcpy has not polled the reader for {silent:.0f} s",
                            reason="reader_stalled",
                            hint="the reader is wedged; it is reopened (replug it if this repeats)",
                        )
                    continue
                if isinstance(msg, _Failed):
                    raise msg.error
                if isinstance(msg, _Left):
                    self._taps.left(msg.uid, msg.at)
                    continue
                reading = self._taps.arrived(msg.read, msg.ts, msg.at)
                if reading is not None:
                    yield reading
        finally:
            stop.set()
            self._dropped += inbox.dropped
            self._inbox = None
            self._taps.restarted(self._clock.monotonic())
            await self._join(worker)

    async def aclose(self) -> None:
        """Release the reader. Safe to call more than once."""
        clf, self._clf = self._clf, None
        if clf is None:
            return
        worker = self._worker
        if worker is not None and worker.is_alive():
            # still inside nfcpy, holding its lock: close whenever it lets go, without waiting
            threading.Thread(target=_close_quietly, args=(clf,), name="nfc-close", daemon=True).start()
            return
        await asyncio.to_thread(_close_quietly, clf)

    async def _join(self, worker: threading.Thread) -> None:
        await asyncio.to_thread(worker.join, self._join_timeout)
        if worker.is_alive():
            log.warning("nfc_reader_slow_stop", waited_s=self._join_timeout)


def _close_quietly(clf: Frontend) -> None:
    try:
        clf.close()
    except Exception as exc:  # a reader that is gone may fail to close; it is released anyway
        log.warning("nfc_reader_close_failed", error=type(exc).__name__)
