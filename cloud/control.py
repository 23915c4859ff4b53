"""The control loop: the edges' small documents from EDGE_CONTROL, dispatched by kind.

Design. One more consumer loop of the ingest worker's NATS connection (cloud/commands/ingest.py
`loops`), bound to the shared durable pull consumer `control` (cloud/cluster/jetstream.py), so
any number of workers share the work. The kind is the subject's last token; `handlers` maps a
kind to an async handler returning a `Verdict`: `enroll` decides enrollment requests
(cloud/enroll.py, answered on `enrolled`); `status`, `reported` and `cmd-result` are stored for
the fleet view (cloud/fleet/handlers.py, `DeviceStateHandlers`).

Bounds and failures. A payload above `MAX_CONTROL` (4 MiB) is acked unread and counted; an
unknown kind is acked and counted `other`; a handler that raises is logged, counted `error` and
nak'ed (JetStream redelivers it, at most `max_deliver` times), so no input stops the loop. A
handler that cannot decide now (PostgreSQL down) returns `retry`: the message is nak'ed with a
delay, the other messages of that kind in the same fetch are nak'ed unread, and the loop backs
off (jittered, doubling) before its next fetch, so an outage costs one attempt every few seconds
and loses nothing. Every message is counted as
`edge_cloud_control_messages_total{kind, result}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from nats.js.errors import APIError

from cloud.cluster.jetstream import CONTROL_CONSUMER, CONTROL_STREAM
from cloud.cluster.js_transport import Backoff, subject_to_topic, topic_to_subject
from cloud.enroll import Enroller, EnrollUnavailable
from cloud.metrics import IngestMetrics

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud.db.tokens import TokenKey
    from cloud.ingest_config import IngestConfig
    from edge.clock import Clock

log = structlog.get_logger("cloud.control")

MAX_CONTROL = 4 * 1024 * 1024  # payloads above are acked unread (counted too-large)
NAK_DELAY = 5.0  # s before a message that could not be decided is offered again
FETCH = 32  # messages per fetch


@dataclass(slots=True, frozen=True)
class ControlMessage:
    """One message of EDGE_CONTROL: its MQTT topic, its kind (the topic's last level), its bytes."""

    topic: str
    kind: str
    payload: bytes


@dataclass(slots=True, frozen=True)
class Verdict:
    """`result` is the metric label; `retry` leaves the message for later (nak with delay)."""

    result: str
    retry: bool = False


Handler = Callable[[ControlMessage], Awaitable[Verdict]]
DeviceStateStore = Callable[["psycopg.AsyncConnection[Any]", tuple[str, str, str], bytes], Awaitable[None]]


async def count_only(msg: ControlMessage) -> Verdict:
    """Kinds nobody acts on yet: acked and counted."""
    return Verdict("counted")


async def no_token_key(msg: ControlMessage) -> Verdict:
    """A worker without `token_key` leaves enrollment requests to one that has it."""
    return Verdict("no-token-key", retry=True)


class EnrollHandler:
    """`enroll` -> cloud/enroll.py in a thread; the answer is published (and flushed) before the
    request is acked, so a lost answer means a redelivered request, answered as a repeat."""

    def __init__(self, nc: NATS, enroller: Enroller) -> None:
        self._nc = nc
        self._enroller = enroller

    async def __call__(self, msg: ControlMessage) -> Verdict:
        try:
            answer = await asyncio.to_thread(self._enroller.answer, msg.topic, msg.payload)
        except (psycopg.Error, OSError, EnrollUnavailable) as exc:
            log.warning("enroll_deferred", error=str(exc)[:200], retry_in=NAK_DELAY)
            return Verdict("unavailable", retry=True)
        if answer.topic is not None and answer.payload is not None:
            try:
                await self._nc.publish(topic_to_subject(answer.topic), answer.payload)
                await self._nc.flush(timeout=5)
            except (NatsError, TimeoutError) as exc:  # decided and committed: the redelivery is a repeat
                log.warning("enroll_answer_not_flushed", error=str(exc)[:200])
                return Verdict("answer-failed", retry=True)
        return Verdict(answer.result)

    def close(self) -> None:
        self._enroller.close()


class DeviceStateHandlers:
    """`status`, `reported`, `cmd-result` -> cloud/fleet/handlers.py, on one async PostgreSQL
    connection opened on first use (and again after it broke). A payload the handler refuses is
    acked and counted by its reason; PostgreSQL unreachable leaves the message for later."""

    def __init__(self, dsn: str, prefix: str) -> None:
        self._dsn = dsn
        self._prefix = prefix
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def handler(self, store: DeviceStateStore) -> Handler:
        async def handle(msg: ControlMessage) -> Verdict:
            return await self._one(store, msg)

        return handle

    async def _one(self, store: DeviceStateStore, msg: ControlMessage) -> Verdict:
        from cloud.fleet.handlers import ControlMessageError

        head = self._prefix + "/"
        parts = msg.topic[len(head):].split("/") if msg.topic.startswith(head) else []
        if len(parts) != 4:
            return Verdict("bad-topic")
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, connect_timeout=10)
            await store(self._conn, (parts[0], parts[1], parts[2]), msg.payload)
        except ControlMessageError as exc:
            return Verdict(exc.reason)
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            log.warning("device_state_deferred", kind=msg.kind, error=str(exc)[:200], retry_in=NAK_DELAY)
            await self.close()
            return Verdict("unavailable", retry=True)
        return Verdict("stored")

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None


class ControlLoop:
    """Consumes EDGE_CONTROL's durable consumer until `stop` (see the module doc)."""

    def __init__(self, nc: NATS, handlers: Mapping[str, Handler], metrics: IngestMetrics, *,
                 backoff: Backoff | None = None, fetch_wait: float = 1.0, stream: str = CONTROL_STREAM,
                 consumer: str = CONTROL_CONSUMER, close: Callable[[], None] | None = None,
                 aclose: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self._nc = nc
        self._close = close
        self._aclose = aclose
        self._handlers = dict(handlers)
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._fetch_wait = fetch_wait
        self._stream = stream
        self._consumer = consumer

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            if self._aclose is not None:
                await self._aclose()
            if self._close is not None:
                await asyncio.to_thread(self._close)

    async def _run(self, stop: asyncio.Event) -> None:
        bind = Backoff(self._backoff.initial, self._backoff.max)
        while not stop.is_set():
            try:
                sub = await self._nc.jetstream().pull_subscribe_bind(self._consumer, stream=self._stream)
            except (NatsError, TimeoutError) as exc:  # consumer missing, a node restarting
                delay = bind.delay()
                log.warning("consumer_unavailable", stream=self._stream, consumer=self._consumer,
                            retry_in=round(delay, 2), error=str(exc)[:200])  # fmt: skip
                await _sleep_unless(stop, delay)
                continue
            bind.reset()
            log.info("control_consuming", stream=self._stream, consumer=self._consumer, kinds=sorted(self._handlers))
            try:
                await self._consume(sub, stop)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _consume(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(FETCH, timeout=self._fetch_wait)
            except (TimeoutError, NatsTimeout):
                continue
            except (APIError, NatsError) as exc:
                log.warning("jetstream_fetch_failed", stream=self._stream, error=str(exc)[:200])
                await _sleep_unless(stop, 0.5)
                continue
            deferred: set[str] = set()
            for m in msgs:
                if await self._one(m, deferred):
                    deferred.add(self._kind(m.subject))
            if deferred:
                await _sleep_unless(stop, self._backoff.delay())
            else:
                self._backoff.reset()

    def _kind(self, subject: str) -> str:
        kind = subject.rpartition(".")[2]
        return kind if kind in self._handlers else "other"

    async def _one(self, m: Msg, deferred: set[str]) -> bool:
        """Handle and settle one message; True when it was left for a retry."""
        kind = self._kind(m.subject)
        if kind in deferred:  # its handler just could not decide: do not try again in this fetch
            await _settle(m, retry=True)
            self._count(kind, "deferred")
            return True
        handler = self._handlers.get(kind)
        if len(m.data) > MAX_CONTROL:
            verdict = Verdict("too-large")
        elif handler is None:
            verdict = Verdict("ignored")
        else:
            try:
                verdict = await handler(ControlMessage(subject_to_topic(m.subject), kind, m.data))
            except Exception as exc:  # a bug on some input must not stop the loop
                log.exception("control_handler_failed", kind=kind, error=repr(exc)[:200])
                verdict = Verdict("error", retry=True)
        await _settle(m, retry=verdict.retry)
        self._count(kind, verdict.result)
        return verdict.retry and verdict.result != "error"

    def _count(self, kind: str, result: str) -> None:
        self._metrics.control.labels(kind=kind, result=result[:32]).inc()


async def _settle(m: Msg, *, retry: bool) -> None:
    with contextlib.suppress(Exception):  # a lost ack is a redelivery, answered again
        if retry:
            await m.nak(delay=NAK_DELAY)
        else:
            await m.ack()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def control_loop(cfg: IngestConfig, nc: NATS, metrics: IngestMetrics, *, dsn: str, cloud_key: Ed25519PrivateKey,
                 token_key: TokenKey | None, clock: Clock) -> ControlLoop:  # fmt: skip
    """The worker's control loop: enrollment with `token_key`; `status`, `reported` and
    `cmd-result` stored for `edge-cloud fleet status` and `cmd send --wait`."""
    from cloud.fleet.handlers import handle_cmd_result, handle_reported, handle_status

    state = DeviceStateHandlers(dsn, cfg.prefix)
    handlers: dict[str, Handler] = {"status": state.handler(handle_status), "reported": state.handler(handle_reported),
                                    "cmd-result": state.handler(handle_cmd_result)}  # fmt: skip
    close: Callable[[], None] | None = None
    if token_key is None:
        log.warning("enroll_disabled", reason="no token_key in the config",
                    hint="enrollment requests are left to workers that have it (edge-cloud up makes DIR/token.key)")
        handlers["enroll"] = no_token_key
    else:
        enroll = EnrollHandler(nc, Enroller(dsn, token_key=token_key, cloud_key=cloud_key, prefix=cfg.prefix,
                                            clock=clock))  # fmt: skip
        handlers["enroll"] = enroll
        close = enroll.close
    return ControlLoop(nc, handlers, metrics, backoff=Backoff(cfg.backoff.initial, cfg.backoff.max),
                       fetch_wait=cfg.fetch_wait, close=close, aclose=state.close)  # fmt: skip
