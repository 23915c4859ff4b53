"""One supervisor owns every task of the daemon.

Start order: keys -> buffer -> pipeline -> drivers (-> uplink, health when configured).
Stop order is the reverse. On SIGTERM/SIGINT the components stop, then the drivers, then
every reading already in the pipeline is drained into the buffer and committed; all of
that shares one budget of `health.drain_timeout` (systemd's TimeoutStopSec is longer). A
required component that cannot start makes `run()` raise `StartupError`, which the CLI
turns into a clear message and a non-zero exit.

Each driver's pump counts readings into and out of `pipeline.submit` (`Runtime.pumps`), so
the watchdog (edge/notify.py, edge/health.py) can tell a hung pipeline from an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from drivers.base import Driver
from drivers.pos.receipt import receipt_parsers
from edge.aio import bounded, wait_event
from edge.analytics.engine import StoreAnalytics
from edge.analytics.sink import AnalyticsSink, run_ticker
from edge.analytics.wiring import build_analytics, driver_config
from edge.buffer import Buffer
from edge.clock import Clock
from edge.config import Config
from edge.errors import EdgeError, StartupError
from edge.pipeline import Pipeline, Sink, build_pipeline
from edge.privacy.consent import ConsentList
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.privacy.stage import PrivacyStage

if TYPE_CHECKING:  # imported when used: it pulls edge.wire and so cryptography (~6 MiB of RSS)
    from edge.downlink.consent import ConsentSync

log = structlog.get_logger("edge.supervisor")

RUNTIME_FILE = "runtime.json"
# exit status of `edge run` after a requested restart (EX_TEMPFAIL); systemd/edge.service restarts
# on it (RestartForceExitStatus) without counting it as a failure (SuccessExitStatus)
RESTART_EXIT = 75


class Component(Protocol):
    """Something the supervisor starts after the pipeline and stops before it (uplink, health)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


ComponentFactory = Callable[["Runtime"], Component]


@dataclass(slots=True)
class PumpProgress:
    """How many readings of one driver entered `pipeline.submit` and how many came out."""

    entered: int = 0
    left: int = 0


class Runtime:
    """What a running daemon is made of; handed to components that need the core."""

    def __init__(self, cfg: Config, clock: Clock, keys: KeyStore, buffer: Buffer, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.clock = clock
        self.keys = keys
        self.buffer = buffer
        self.pipeline = pipeline
        self.drivers: list[Driver] = []
        self.components: list[Component] = []
        self.pumps: dict[str, PumpProgress] = {}
        # store analytics (edge/analytics/): `snapshot()` for the web page; None when disabled
        self.analytics: StoreAnalytics | None = None
        # consent from the cloud (downlink-v1 §Consent) when `cloud_consent`; the downlink applies shards to it
        self.consent_sync: ConsentSync | None = None
        # `restart` command: drain and stop, then exit with RESTART_EXIT for the service manager
        self.request_restart: Callable[[], None] = lambda: None
        # a config change to drivers only (edge/downlink/desired.py): restart just those drivers
        self.reconfigure_drivers: Callable[[Config, Collection[str]], Awaitable[None]] | None = None


def open_keys(cfg: Config, clock: Clock, config_path: str | None = None) -> KeyStore:
    keys = KeyStore(cfg.paths.keys_dir, clock)
    if not keys.exists():
        where = f" --config {config_path}" if config_path else ""
        raise StartupError(
            "keys",
            f"no device keys in {cfg.paths.keys_dir}",
            hint=f"create them once with: edge keys init{where}",
        )
    return keys


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        clock: Clock,
        *,
        drivers: Callable[[Config, Clock], Sequence[Driver]] | None = None,
        components: Sequence[ComponentFactory] = (),
        config_path: str | None = None,
        on_ready: Callable[[Runtime], Awaitable[None] | None] | None = None,
        cloud_consent: bool = False,
    ) -> None:
        """`cloud_consent`: stable pseudonyms are consented by the cloud's consent shards
        (edge/downlink/consent.py, `Runtime.consent_sync`) instead of `privacy.consent_file`."""
        self.cfg = cfg
        self.clock = clock
        self._driver_factory = drivers
        self._component_factories = tuple(components)
        self._config_path = config_path
        self._on_ready = on_ready
        self.runtime: Runtime | None = None
        self._driver_tasks: list[asyncio.Task[None]] = []
        self._ticker: asyncio.Task[None] | None = None
        self._cloud_consent = cloud_consent
        self._stop: asyncio.Event | None = None
        self.restart_requested = False

    def request_restart(self) -> None:
        """Stop as on SIGTERM (drain included); `run()` returns with `restart_requested` set."""
        self.restart_requested = True
        log.info("restart_requested")
        if self._stop is not None:
            self._stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; then drain and stop everything in reverse order."""
        cfg, clock = self.cfg, self.clock
        self._stop = stop
        keys = open_keys(cfg, clock, self._config_path)
        consent, consent_sync = self._consent()
        try:
            pz = Pseudonymizer(cfg.privacy, keys, consent)
        except EdgeError as exc:
            raise StartupError("privacy", str(exc)) from exc
        try:
            buffer = await Buffer.open(cfg, clock)
        except (EdgeError, OSError) as exc:
            raise StartupError(
                "buffer", f"{cfg.buffer_path}: {exc}", hint="check that the state dir exists and is writable"
            ) from exc
        privacy = PrivacyStage(pz)
        analytics = build_analytics(cfg, clock)
        sink: Sink = buffer
        if analytics is not None or cfg.privacy.mode == "aggregate":
            sink = AnalyticsSink(buffer, analytics, cfg.privacy.mode)
        pipeline, _cards = build_pipeline(clock, privacy, sink, receipt_parsers=receipt_parsers(cfg.drivers.pos))
        rt = Runtime(cfg, clock, keys, buffer, pipeline)
        await self._attach(rt, analytics, consent_sync)
        if analytics is not None:
            self._ticker = asyncio.create_task(run_ticker(analytics, buffer), name="analytics")
        dcfg = driver_config(cfg)
        driver_tasks = self._driver_tasks
        started: list[Component] = []
        try:
            if self._driver_factory is not None:
                rt.drivers = list(self._driver_factory(dcfg, clock))
            else:
                from drivers.registry import build_drivers

                rt.drivers = list(build_drivers(dcfg, clock))
            for d in rt.drivers:
                progress = rt.pumps.setdefault(d.name, PumpProgress())
                driver_tasks.append(asyncio.create_task(_pump(d, pipeline, progress), name=f"driver:{d.name}"))
            for factory in self._component_factories:
                comp = factory(rt)
                try:
                    await comp.start()
                except (EdgeError, OSError) as exc:
                    raise StartupError(comp.name, str(exc)) from exc
                started.append(comp)
                rt.components.append(comp)
            log.info(
                "started",
                device=cfg.identity.device,
                drivers=[d.name for d in rt.drivers],
                components=[c.name for c in started],
                next_event_id=buffer.last_committed_id + 1,
            )
            if self._on_ready is not None:
                res = self._on_ready(rt)
                if asyncio.iscoroutine(res):
                    await res
            await self._wait(stop, rt)
        finally:
            await self._shutdown(rt, driver_tasks, started)

    def _consent(self) -> tuple[Container[str] | None, ConsentSync | None]:
        """The consent list the privacy layer consults: the cloud's shards, the file, or none."""
        if self._cloud_consent:
            from edge.downlink.consent import ConsentSync

            try:
                sync = ConsentSync(self.cfg.paths.state_dir)
            except (sqlite3.Error, OSError) as exc:
                raise StartupError("consent", f"{self.cfg.paths.state_dir}/consent.db: {exc}",
                                   hint="check that the state dir is writable") from exc
            return sync, sync
        if self.cfg.privacy.consent_file:
            return ConsentList(self.cfg.privacy.consent_file, self.clock), None
        return None, None

    async def _attach(self, rt: Runtime, analytics: StoreAnalytics | None, sync: ConsentSync | None) -> None:
        rt.analytics = analytics
        rt.request_restart = self.request_restart
        rt.reconfigure_drivers = self.reconfigure_drivers
        if sync is not None:
            sync.bind(rt.buffer)
            rt.consent_sync = sync
            try:
                await sync.resume()  # a purge a crash interrupted
            except Exception as exc:  # the purge stays pending for the next start; ingest must start
                log.error("consent_resume_failed", error=type(exc).__name__)
        self.runtime = rt

    async def reconfigure_drivers(self, cfg: Config, names: Collection[str]) -> None:
        """Run with `cfg` (changed in `drivers` only): the drivers named in `names` are stopped
        (what they had in the pipeline is lost uncommitted, as on a stop; nothing committed is
        touched) and those of them `cfg` still has start again with it; the rest keep running.
        POS receipt rules follow `cfg` from the next reading on."""
        rt = self.runtime
        if rt is None:
            raise RuntimeError("reconfigure_drivers() before run() started")
        wanted = set(names)
        old = [d for d in rt.drivers if d.name in wanted]
        tasks = [t for t in self._driver_tasks if t.get_name() in {f"driver:{d.name}" for d in old}]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for d in old:
            with contextlib.suppress(Exception):
                await bounded(d.aclose(), 2.0)
            rt.pumps.pop(d.name, None)
        self._driver_tasks[:] = [t for t in self._driver_tasks if t not in tasks]  # run() holds this list
        rt.drivers = [d for d in rt.drivers if d.name not in wanted]
        rt.pipeline.set_receipt_parsers(receipt_parsers(cfg.drivers.pos))
        rt.cfg = self.cfg = cfg
        dcfg = driver_config(cfg)
        if self._driver_factory is not None:
            fresh = list(self._driver_factory(dcfg, self.clock))
        else:
            from drivers.registry import build_drivers

            fresh = list(build_drivers(dcfg, self.clock))
        for d in fresh:
            if d.name in wanted:  # the others were built only to pick these out (not opened)
                rt.drivers.append(d)
                progress = rt.pumps[d.name] = PumpProgress()
                task = asyncio.create_task(_pump(d, rt.pipeline, progress), name=f"driver:{d.name}")
                self._driver_tasks.append(task)
        log.info("drivers_reconfigured", drivers=sorted(wanted))

    async def stop_drivers(self) -> int:
        """Stop reading from devices and commit what is in flight; the rest keeps running.

        Returns the last committed event id. Used by the demo to let the uplink drain.
        """
        for t in self._driver_tasks:
            t.cancel()
        await asyncio.gather(*self._driver_tasks, return_exceptions=True)
        if self.runtime is None:
            raise RuntimeError("stop_drivers() before run() started")
        return await self.runtime.buffer.flush()

    async def _wait(self, stop: asyncio.Event, rt: Runtime) -> None:
        """Wait for stop, writing the runtime status file for `edge status` every 2 s."""
        while not stop.is_set():
            write_runtime_status(rt)
            await wait_event(stop, 2.0)

    async def _shutdown(
        self, rt: Runtime, driver_tasks: list[asyncio.Task[None]], started: list[Component]
    ) -> None:
        timeout = self.cfg.health.drain_timeout
        log.info("stopping", drain_timeout_s=timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # one budget for the whole stop, so it stays under TimeoutStopSec
        # components (uplink, health, advertise) may not eat the flush's share of the budget
        components_deadline = deadline - min(5.0, timeout / 2)
        for comp in reversed(started):
            try:
                await bounded(comp.stop(), max(0.1, components_deadline - loop.time()))
            except Exception as exc:
                log.error("component_stop_failed", component=comp.name, error=str(exc) or type(exc).__name__)
        for t in driver_tasks:
            t.cancel()
        if driver_tasks:  # a backend that ignores cancellation must not hold the stop past its budget
            _, stuck = await asyncio.wait(driver_tasks, timeout=max(0.5, deadline - loop.time()))
            for t in stuck:
                log.error("driver_stop_timeout", driver=t.get_name())
        for d in rt.drivers:
            with contextlib.suppress(Exception):
                await bounded(d.aclose(), max(0.1, deadline - loop.time()))
        await self._stop_analytics(rt)
        try:
            last = await bounded(rt.buffer.flush(), max(0.5, deadline - loop.time()))
            log.info("drained", last_committed_id=last)
        except TimeoutError:
            log.error("drain_timeout", timeout_s=timeout)
        finally:
            await rt.buffer.close()
            if rt.consent_sync is not None:
                rt.consent_sync.close()
            write_runtime_status(rt, state="stopped")


    async def _stop_analytics(self, rt: Runtime) -> None:
        """Stop the ticker; the open intervals go to the buffer as partial ones."""
        if self._ticker is not None:
            t = self._ticker
            if t.done() and not t.cancelled() and t.exception() is not None:  # run_ticker retries Exceptions
                log.error("analytics_ticker_died", error=type(t.exception()).__name__)
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ticker
        if rt.analytics is not None:
            for p in rt.analytics.flush():
                if not rt.buffer.put_nowait(p):
                    with contextlib.suppress(Exception):
                        await bounded(rt.buffer.put(p), 1.0)


async def _pump(driver: Driver, pipeline: Pipeline, progress: PumpProgress | None = None) -> None:
    if progress is None:
        progress = PumpProgress()
    async for reading in driver.readings():
        progress.entered += 1
        await pipeline.submit(reading)
        progress.left += 1


def write_runtime_status(rt: Runtime, state: str = "running") -> None:
    """Atomically write what only the running daemon knows (driver and uplink state)."""
    doc = {
        "state": state,
        "pid": os.getpid(),
        "updated_ms": rt.clock.wall_ms(),
        "clock_synchronized": rt.clock.synchronized(),
        "pipeline": rt.pipeline.status(),
        "drivers": [d.status() for d in rt.drivers],
        "components": {c.name: c.status() for c in rt.components},
        "buffer_degraded": rt.buffer.degraded,
        "analytics": rt.analytics.status() if rt.analytics is not None else None,
    }
    path = Path(rt.cfg.paths.state_dir) / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(doc, default=str))
        tmp.replace(path)
    except OSError as exc:  # a full disk must not stop the daemon over a status file
        log.warning("runtime_status_write_failed", error=str(exc))


def install_signal_handlers(stop: asyncio.Event, on_signal: Callable[[str], None] | None = None) -> None:
    """SIGTERM/SIGINT set `stop`; `on_signal(name)` runs first (e.g. to tell systemd STOPPING=1)."""
    loop = asyncio.get_running_loop()

    def handler(sig: signal.Signals) -> None:
        if on_signal is not None:
            try:
                on_signal(sig.name)
            except Exception as exc:  # the stop itself must happen whatever the hook does
                log.error("signal_hook_failed", error=type(exc).__name__)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
