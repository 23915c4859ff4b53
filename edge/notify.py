"""systemd integration without libsystemd: sd_notify over `$NOTIFY_SOCKET`, and the loops
that use it (READY, STATUS, WATCHDOG, STOPPING).

The protocol (sd_notify(3)) is one datagram of newline-separated `KEY=VALUE` lines to the
AF_UNIX socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
Without `NOTIFY_SOCKET` every call is a no-op, so `edge run` behaves the same outside
systemd. Sending never raises and never blocks: a lost notification must not stop the
daemon (systemd then restarts it, which is the point of the watchdog).

The watchdog is a coroutine on the daemon's own event loop (`ServiceLink`): every
WATCHDOG_USEC/2 it asks `Liveness` (edge/health.py) whether the pipeline still makes
progress and only then sends `WATCHDOG=1`. A wedged loop never gets to send; a hung
pipeline is withheld. A timer thread would keep pinging through both, which is why there
is none.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from edge.aio import wait_event
from edge.clock import Clock

if TYPE_CHECKING:
    from edge.health import Liveness
    from edge.supervisor import Runtime

log = structlog.get_logger("edge.notify")

DRIVER_READY_WAIT = 15.0  # seconds READY waits for every enabled driver to open (or degrade)
STATUS_EVERY = 5.0  # seconds between STATUS= updates
STOP_MARGIN = 15.0  # seconds added to health.drain_timeout in EXTEND_TIMEOUT_USEC at stop


class Notifier:
    """Sends sd_notify messages to one address; a no-op when `address` is None."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._failed_logged = False
        self.sent = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (ours unless another pid)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        me = os.getpid() if pid is None else pid
        if raw.isdigit() and (not wd_pid or (wd_pid.isdigit() and int(wd_pid) == me)):
            usec = int(raw)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def _target(self) -> str | bytes:
        addr = self.address or ""
        return b"\0" + addr[1:].encode() if addr.startswith("@") else addr

    def send(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; True when handed to the socket."""
        if self.address is None:
            return False
        msg = "\n".join(ln.replace("\n", " ") for ln in lines).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self._target())
        except OSError as exc:
            if not self._failed_logged:  # once: a missing socket would otherwise flood the log
                log.warning("sd_notify_failed", error=exc.strerror or type(exc).__name__)
                self._failed_logged = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str, extend_s: float | None = None) -> bool:
        lines = ["STOPPING=1", f"STATUS={status}"]
        if extend_s is not None:
            lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_s * 1_000_000)}")
        return self.send(*lines)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(
    notifier: Notifier,
    interval: float,
    check: Callable[[], str | None],
    *,
    on_tick: Callable[[float], None] | None = None,
) -> None:
    """Every `interval` s: `check()` -> None means healthy -> WATCHDOG=1; a reason withholds it.

    `on_tick(lag_s)` gets how late the loop woke up (event-loop lag), for the metrics.
    """
    loop = asyncio.get_running_loop()
    withheld: str | None = None
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        if on_tick is not None:
            on_tick(max(0.0, loop.time() - due))
        reason = check()
        if reason is None:
            notifier.watchdog()
            if withheld is not None:
                log.info("watchdog_resumed", was=withheld)
        elif reason != withheld:
            log.error("watchdog_withheld", reason=reason, hint="systemd restarts the service if this persists")
        withheld = reason


class ServiceLink:
    """Ties one `edge run` to systemd: READY once up, STATUS, WATCHDOG, STOPPING on SIGTERM.

    `ready(rt)` is the supervisor's `on_ready` hook: it waits (at most DRIVER_READY_WAIT s,
    or until a stop is requested) for every enabled driver to leave `starting` (running, or
    degraded with a reason: a missing POS adapter must not keep the box from starting), then
    sends READY=1 and starts the watchdog and status loops, which it owns.
    """

    def __init__(
        self,
        notifier: Notifier,
        clock: Clock,
        liveness: Liveness,
        stop: asyncio.Event,
        *,
        drain_timeout: float,
        describe: Callable[[Runtime], Awaitable[str]] | None = None,
    ) -> None:
        self.notifier = notifier
        self._clock = clock
        self._liveness = liveness
        self._stop = stop
        self._drain_timeout = drain_timeout
        self._describe = describe
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    async def ready(self, rt: Runtime) -> None:
        deadline = self._clock.monotonic() + DRIVER_READY_WAIT
        while (
            any(d.state == "starting" for d in rt.drivers)
            and self._clock.monotonic() < deadline
            and not self._stop.is_set()
        ):
            await wait_event(self._stop, 0.05)
        if self._stop.is_set():
            return
        status = await self._status_text(rt)
        self.notifier.ready(status)
        log.info("ready", status=status, watchdog_s=self.notifier.watchdog_interval)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            self._spawn(
                watchdog_loop(self.notifier, interval, lambda: self._liveness.check(rt),
                              on_tick=self._liveness.note_lag),
                "watchdog",
            )
        if self.notifier.enabled:
            self._spawn(self._status_loop(rt), "sd-status")

    def on_signal(self, signame: str) -> None:
        """SIGTERM/SIGINT: STOPPING=1 at once, pings stop, and the stop timeout is extended."""
        if self.stopping:
            return
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        self.notifier.stopping(
            f"stopping ({signame}): draining into the buffer", extend_s=self._drain_timeout + STOP_MARGIN
        )

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.notifier.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _status_loop(self, rt: Runtime) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.notifier.status(await self._status_text(rt))

    async def _status_text(self, rt: Runtime) -> str:
        if self._describe is None:
            from edge.health import describe

            return await describe(rt)
        return await self._describe(rt)
