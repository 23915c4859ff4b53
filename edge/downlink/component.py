"""The downlink component (downlink-v1 on the device): one per daemon, owned by the supervisor.

It shares the uplink's MQTT session (`Uplink.add_inbound`): its three desired layers, its
tenant's 256 consent shards (one wildcard filter) and its command topic, QoS 1, subscribed again
on every reconnect. The MQTT callback only queues (bounded by count, `downlink.queue_max`, and by
bytes, MAX_QUEUED_BYTES; beyond: dropped, counted `queue-full`), so ingest and acks never wait
for it; one task then takes each message:

1. a payload above 4 MiB is dropped unread (`too-large`);
2. `verify_document` with the trusted cloud keys (edge/downlink/trust.py) before anything else
   is looked at; a failure is dropped, counted by its reason and logged (reason, topic, size);
3. the document must name this device's tenant, store and device (or `_all`) (`topic-mismatch`);
4. cmd -> CommandRunner (one `cmd-result` each), consent -> ConsentSync (when the device takes
   consent from the cloud, else `no-cloud-consent`), desired -> DesiredState (apply, rollback).

`reported` (retained, edge/downlink/reported.py) goes out on every connect, after every apply
decision and every `downlink.report_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

import structlog

from edge.aio import wait_event
from edge.downlink.commands import CommandRunner
from edge.downlink.desired import Boot, DesiredState, Watch
from edge.downlink.loglevel import TemporaryLogLevel
from edge.downlink.reported import build_reported
from edge.downlink.wiring import command_deps, status_of
from edge.errors import EdgeError
from edge.supervisor import ComponentFactory, Runtime
from edge.uplink.service import Uplink, UplinkOffline
from edge.wire.downlink import (
    ALL,
    MAX_DOCUMENT,
    Document,
    DocumentError,
    device_filters,
    reported_topic,
    verify_document,
)

log = structlog.get_logger("edge.downlink")

MAX_QUEUED_BYTES = 32 * 1024 * 1024  # payloads waiting, in all (eight of the largest documents)
MAX_PACKET = MAX_DOCUMENT + 64 * 1024  # the largest document plus its topic and MQTT framing
OFFLOAD = 64 * 1024  # payloads above this are decoded and verified off the event loop


class Downlink:
    name = "downlink"

    def __init__(self, rt: Runtime, uplink: Uplink, config_path: str, boot: Boot) -> None:
        self._rt = rt
        self._uplink = uplink
        self._config_path = config_path
        self._boot = boot
        ident = rt.cfg.identity
        self._ids = (ident.tenant, ident.store, ident.device)
        self._prefix = rt.cfg.uplink.prefix
        self._trusted = boot.trusted
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(rt.cfg.downlink.queue_max)
        self._queued_bytes = 0
        self.received = 0
        self.accepted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.reported = 0
        self._report_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log_level = TemporaryLogLevel()
        self._commands: CommandRunner | None = None
        watch = Watch(self._unhealthy, rt.cfg.health.apply_grace, rt.clock.monotonic)
        self.desired = DesiredState(config_path=config_path, boot=boot, state_dir=rt.cfg.paths.state_dir,
                                    restart=rt.request_restart, changed=self._report_now.set, watch=watch,
                                    live=rt.reconfigure_drivers)
        filters = device_filters(self._prefix, *self._ids)
        if rt.consent_sync is None:  # this store keeps privacy.consent_file: the shards are not for it
            filters = [f for f in filters if "/consent/" not in f]
        # registered now, before the uplink's session task first runs: the cap and filters apply to it
        uplink.add_inbound(filters, self._offer, max_packet=MAX_PACKET, on_connect=self._report_now.set)

    # -- component protocol -------------------------------------------------------------
    async def start(self) -> None:
        rt = self._rt
        deps = command_deps(rt, status=status_of(self._config_path), trust=self._trusted, log_level=self._log_level)
        self._commands = CommandRunner(state_dir=rt.cfg.paths.state_dir, clock=rt.clock, prefix=self._prefix,
                                       identity=self._ids, publish=self._publish, deps=deps)
        self._tasks.append(asyncio.create_task(self._consume(), name="downlink:consume"))
        self._tasks.append(asyncio.create_task(self._reporter(), name="downlink:reported"))
        if self.desired.in_trial:
            self._tasks.append(asyncio.create_task(self._trial(), name="downlink:trial"))
        for event, fields in self._boot.notes:
            log.warning(event, **fields)

    async def stop(self) -> None:
        await self.desired.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._log_level.close()
        if self._commands is not None:
            self._commands.close()

    def status(self) -> dict[str, Any]:
        return {
            "state": "running" if self._tasks else "stopped",
            "received": self.received,
            "accepted": dict(self.accepted),
            "dropped": dict(self.dropped),
            "queued": self._queue.qsize(),
            "reported": self.reported,
            "desired": self.desired.status(),
            "commands": self._commands.status() if self._commands is not None else None,
            "cloud_kids": sorted(self._trusted.keys()),
        }

    # -- intake -------------------------------------------------------------------------
    def _drop(self, reason: str, topic: str, size: int) -> None:
        self.dropped[reason] += 1
        n = self.dropped[reason]
        if n <= 10 or n % 1000 == 0:  # a flood of forgeries must not flood the journal too
            log.warning("downlink_dropped", reason=reason, topic=topic[:200], size=size, count=n)

    def _offer(self, topic: str, payload: bytes) -> None:
        """The MQTT callback: queue and return (never blocks the session)."""
        self.received += 1
        if len(payload) > MAX_DOCUMENT:
            self._drop("too-large", topic, len(payload))  # unread
            return
        if self._queue.full() or self._queued_bytes + len(payload) > MAX_QUEUED_BYTES:
            self._drop("queue-full", topic, len(payload))
            return
        self._queued_bytes += len(payload)
        self._queue.put_nowait((topic, payload))

    async def _consume(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            self._queued_bytes -= len(payload)
            try:
                await self._handle(topic, payload)
            except Exception as exc:  # a bug in one handler must not stop the downlink
                self.dropped["internal-error"] += 1
                log.exception("downlink_handler_failed", error=type(exc).__name__, topic=topic[:200])

    def _verify(self, topic: str, payload: bytes) -> Document:
        doc = verify_document(payload, topic=topic, prefix=self._prefix, trusted=self._trusted.keys())
        tenant, store, device = self._ids
        if doc.tenant != tenant or doc.store not in (store, ALL) or doc.device not in (device, ALL):
            raise DocumentError("topic-mismatch", "a document for another device")
        return doc

    async def _handle(self, topic: str, payload: bytes) -> None:
        try:
            if len(payload) > OFFLOAD:
                doc = await asyncio.to_thread(self._verify, topic, payload)
            else:
                doc = self._verify(topic, payload)
        except DocumentError as exc:
            self._drop(exc.reason, topic, len(payload))
            return
        self.accepted[doc.kind] += 1
        if doc.kind == "cmd":
            if self._commands is not None:  # made in start(), before the first message is taken
                await self._commands.handle(doc)
                self._report_now.set()  # cloud-key.add/retire change cloud_kids
        elif doc.kind == "consent":
            sync = self._rt.consent_sync
            if sync is None:  # this store keeps privacy.consent_file
                self._drop("no-cloud-consent", topic, len(payload))
                return
            await sync.apply(doc)
            self._report_now.set()
        elif doc.kind == "desired":
            await self.desired.handle(doc)

    # -- out ------------------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await self._uplink.publish(topic, payload, qos=qos)

    async def _reporter(self) -> None:
        interval = self._rt.cfg.downlink.report_interval
        topic = reported_topic(self._prefix, *self._ids)
        while True:
            await wait_event(self._report_now, interval)
            self._report_now.clear()
            if self.desired.in_trial or self.desired.restarting:
                continue  # reported once decided
            try:
                payload = await build_reported(self._rt, self.desired, self._trusted)
                await self._uplink.publish(topic, payload, qos=1, retain=True)
                self.reported += 1
            except UplinkOffline:
                pass  # sent on the next connect
            except Exception as exc:
                log.error("reported_failed", error=type(exc).__name__)

    async def _trial(self) -> None:
        await self.desired.watch_trial()

    def _unhealthy(self, what: Mapping[str, Any]) -> str | None:
        """Why a component the change touched is not healthy, or None."""
        rt = self._rt
        names = set(what.get("drivers") or ())
        for d in rt.drivers:
            if d.name in names and d.state != "running":
                why = f": {d.degraded_reason}" if d.degraded_reason else ""
                return f"driver {d.name} is {d.state}{why}"[:300]
        if rt.buffer.degraded is not None:
            return f"buffer degraded: {rt.buffer.degraded}"[:300]
        return None


def downlink_component(config_path: str, boot: Boot) -> ComponentFactory:
    """The factory; it goes right after the uplink's (it registers on the uplink's session)."""

    def factory(rt: Runtime) -> Downlink:
        uplink = next((c for c in rt.components if isinstance(c, Uplink)), None)
        if uplink is None:
            raise EdgeError("the downlink needs the uplink (uplink.enabled: true) and starts after it")
        return Downlink(rt, uplink, config_path, boot)

    return factory
