"""The uplink: sealed batches out over MQTT (QoS 1), acks in, nothing deleted without an ack.

- Connects with client id `<tenant>/<store>/<device>/<random suffix>` (edge/uplink/clientid.py),
  a retained `online` status, `offline` as last will and again on a clean stop (uplink-v1).
- MQTT 5 where the broker speaks it (`uplink.protocol: auto` falls back to 3.1.1 when refused):
  CONNECT carries Maximum Packet Size `MAX_INBOUND_PACKET`, so the broker never sends us more than
  a few KiB (an ack is under 200 bytes). Under 3.1.1 only the broker can enforce a limit
  (Mosquitto `max_packet_size`, NATS `max_payload`: docs/security.md), so the edge enforces the
  same cap itself (edge/uplink/inbound.py: a longer packet drops the connection unread), drops
  anything above `MAX_ACK` before parsing and keeps at most `INBOUND_QUEUE` messages queued.
  With the downlink on (its default) the session's cap is its MAX_PACKET (4 MiB + 64 KiB), acks
  still parsed within MAX_ACK, and the client queue is bounded by bytes too (`INBOUND_QUEUE_BYTES`).
- Keeps up to `uplink.window` batches in flight; a batch not acked within `ack_timeout`
  is published again (the stored bytes: byte-identical).
- Trust (docs/security.md): an ack or rejection changes anything only when its signature by a
  trusted cloud key verifies: `cloud_public_key` and the keys `edge enroll` pinned in the state
  folder's cloud_keys.json, minus retired ones (edge/downlink/trust.py); or, lab only,
  `insecure_unsigned_acks: true` and no key at all. Unsigned
  and wrongly signed ones are counted and change nothing. A trusted ok=true whose seq AND hh match
  a batch it holds deletes that batch; a trusted `chain-broken` quarantines it (kept aside,
  reported, not resent); any other trusted rejection means "resend later": the batch stays in
  flight and goes again after a capped, jittered backoff (`uplink.reconnect`), counted per reason.
  A broker's PUBACK never deletes anything.
- Reconnects with capped, jittered exponential backoff; the cause of a failure is named
  (refused, untrusted CA, client certificate rejected, ...), not a bare timeout.
- Optional bandwidth cap (bytes/s) for metered links.
- The daemon's one MQTT session: another component (the downlink, edge/downlink/component.py)
  registers topic filters with `add_inbound` and gets their messages through a callback that
  must not block; they are subscribed (QoS 1) on every connect, and `publish` sends on the
  session. Its `max_packet` raises the inbound cap above (MQTT 5 Maximum Packet Size, the 3.1.1
  cap) for the whole session: acks are still dropped above `MAX_ACK` before parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.aio import wait_event
from edge.buffer import SealedBatch
from edge.downlink.trust import FileTrustedKeys, TrustedKeys
from edge.errors import EdgeError, WireError
from edge.supervisor import Runtime
from edge.uplink.batcher import Batcher
from edge.uplink.clientid import client_id
from edge.uplink.connect import ConnectParams, connect_params, diagnose_connect_error, explain_connect_error
from edge.uplink.inbound import InboundBytes, cap_inbound
from edge.uplink.wire import MAX_ACK, REASONS, Ack, ack_topic, batch_topic, parse_ack, status_topic, verify_ack

log = structlog.get_logger("edge.uplink")

UplinkState = Literal["starting", "connecting", "online", "backoff", "stopped"]

# MQTT 5 Maximum Packet Size we announce: an ack (<= MAX_ACK) plus its topic and MQTT framing
MAX_INBOUND_PACKET = 8192
INBOUND_QUEUE = 256  # acks queued between the MQTT client and us; beyond, aiomqtt drops (logged)
# with other subscriptions (the downlink's 256 retained consent shards arrive at once on subscribe)
INBOUND_QUEUE_SHARED = 1024
# and by bytes: 1024 x the downlink's 4 MiB packets would be 4 GiB (edge/uplink/inbound.py InboundBytes)
INBOUND_QUEUE_BYTES = 40 * 1024 * 1024
# CONNACK codes meaning "this broker does not speak MQTT 5" (3.1.1 code 1, MQTT 5 code 132)
_NO_V5 = frozenset({1, 132})
RESUBSCRIBE_INITIAL = 2.0  # s before a refused downlink filter is tried again (doubling, jittered)
RESUBSCRIBE_MAX = 60.0


class UplinkTrustError(EdgeError):
    """The uplink would trust acks it cannot authenticate (see `edge.config.Uplink.trust_problems`)."""


class UplinkOffline(EdgeError):
    """An action needs the broker session, and there is none."""


@dataclass(slots=True, frozen=True)
class Inbound:
    """Topic filters another component receives on the uplink's session (see `Uplink.add_inbound`)."""

    filters: tuple[str, ...]
    handler: Callable[[str, bytes], None]
    max_packet: int
    on_connect: Callable[[], None] | None = None


class TokenBucket:
    """Bandwidth cap: `rate` bytes/s with one second of burst."""

    def __init__(self, rate: int, monotonic: Any) -> None:
        self._rate = float(rate)
        self._tokens = float(rate)
        self._mono = monotonic
        self._at = monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = self._mono()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= min(n, self._rate):
                self._tokens -= n
                return
            await asyncio.sleep((min(n, self._rate) - self._tokens) / self._rate)


class Uplink:
    name = "uplink"

    def __init__(self, rt: Runtime, *, rng: random.Random | None = None, trust: TrustedKeys | None = None) -> None:
        self._rt = rt
        self._cfg = rt.cfg
        self._ucfg = rt.cfg.uplink
        ident = rt.cfg.identity
        self._ids = (ident.tenant, ident.store, ident.device)
        p = self._ucfg.prefix
        self._batch_topic = batch_topic(p, *self._ids)
        self._ack_topic = ack_topic(p, *self._ids)
        self._status_topic = status_topic(p, *self._ids)
        provisioned = [bytes.fromhex(self._ucfg.cloud_public_key)] if self._ucfg.cloud_public_key else []
        # acks verify with any trusted cloud key: the provisioned one plus those pinned by `edge
        # enroll` or added by `cloud-key.add`, minus the retired (asked per ack: changes apply live)
        self._trust: TrustedKeys = trust if trust is not None else FileTrustedKeys(rt.cfg.paths.state_dir, provisioned)
        self._last_kid: str | None = None  # the key that verified the last ack (tried first)
        self._batcher = Batcher(rt.cfg, rt.buffer, rt.keys, rt.clock)
        self._rng = rng or random.Random()
        self._bucket = TokenBucket(self._ucfg.bandwidth, rt.clock.monotonic) if self._ucfg.bandwidth else None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._inflight: dict[int, SealedBatch] = {}
        self._sent_at: dict[int, float] = {}
        self._retry_at: dict[int, float] = {}  # seq -> monotonic time of its resend after a rejection
        self._attempts: dict[int, int] = {}  # seq -> rejections so far (backoff exponent)
        self._v5 = self._ucfg.protocol != "3.1.1"
        self._client_id: str | None = None
        self._wake = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()
        self.state: UplinkState = "starting"
        self.broker: str | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {
            "published": 0, "resent": 0, "acked": 0, "events_acked": 0, "rejected": 0, "deferred": 0,
            "acks_forged": 0, "acks_unsigned": 0, "acks_unknown": 0, "acks_malformed": 0, "connects": 0,
            "inbound_refused": 0, "subscribe_refused": 0,
        }
        self.rejections: dict[str, int] = {}  # trusted rejections by reason (chain-broken included)
        self.unsigned_acks_trusted = not self._trust.keys()
        self.last_ack_ms: int | None = None
        self._params: ConnectParams | None = None
        self._warned: set[str] = set()  # configuration warnings already logged (once, not per reconnect)
        self._connected = False  # a session is established (until it ends)
        self._inbound: list[Inbound] = []
        self._client: aiomqtt.Client | None = None  # the session's, while online
        self._retries: set[asyncio.Task[None]] = set()  # refused downlink filters, tried again
        self._inbound_bytes = InboundBytes(INBOUND_QUEUE_BYTES)

    def add_inbound(self, filters: list[str], handler: Callable[[str, bytes], None], *, max_packet: int,
                    on_connect: Callable[[], None] | None = None) -> None:
        """Receive messages on `filters` (QoS 1, subscribed on every connect): `handler(topic,
        payload)` is called on the event loop and must not block (queue and return). `max_packet`:
        the largest inbound packet the session accepts for them. `on_connect` runs once the
        session is online (after the subscriptions). Register before the uplink connects; a
        late registration subscribes on the live session, its cap applies from the next one."""
        sub = Inbound(tuple(filters), handler, max_packet, on_connect)
        self._inbound.append(sub)
        client = self._client
        if client is not None:
            if max_packet > self._inbound_cap():
                log.warning("uplink_inbound_cap_until_reconnect", max_packet=max_packet)
            task = asyncio.create_task(self._subscribe(client, [sub]), name="uplink:subscribe")
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    def _check_granted(self, client: aiomqtt.Client, topic_filter: str, granted: object) -> None:
        """A refused downlink filter is counted, logged and tried again on this session with a
        jittered backoff (NATS refuses a subscription whose consumer it could not create in time,
        as in a 500-store reconnect storm); the session stays up, since acks still flow."""
        if _granted(granted):
            return
        self.counters["subscribe_refused"] += 1
        log.warning("uplink_subscription_refused", filter=topic_filter[:200], retry="on this session, with backoff",
                    hint="if it persists: the broker's ACL must let this device read its downlink topics "
                         "(docs/security.md)")  # fmt: skip
        task = asyncio.create_task(self._subscribe_again(client, topic_filter), name="uplink:resubscribe")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _subscribe_again(self, client: aiomqtt.Client, topic_filter: str) -> None:
        delay = RESUBSCRIBE_INITIAL
        while True:
            await asyncio.sleep(self._rng.uniform(delay / 2, delay))
            if self._client is not client or self._stopping.is_set():
                return  # that session is gone: the next one subscribes everything anew
            try:
                granted = await client.subscribe(topic_filter, qos=1)
            except aiomqtt.MqttError:
                return
            if _granted(granted):
                log.info("uplink_subscribed", filter=topic_filter[:200], after="refusal")
                return
            self.counters["subscribe_refused"] += 1
            delay = min(delay * 2, RESUBSCRIBE_MAX)

    def _inbound_cap(self) -> int:
        return max([MAX_INBOUND_PACKET, *(s.max_packet for s in self._inbound)])

    async def _subscribe(self, client: aiomqtt.Client, subs: list[Inbound]) -> None:
        for sub in subs:
            for f in sub.filters:
                self._check_granted(client, f, await client.subscribe(f, qos=1))
        for sub in subs:
            if sub.on_connect is not None:
                sub.on_connect()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish on the session; UplinkOffline when there is none (nothing is queued)."""
        client = self._client
        if client is None or self.state != "online":
            raise UplinkOffline("the uplink is not connected")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=self._ucfg.ack_timeout)
        except aiomqtt.MqttError as exc:
            raise UplinkOffline(f"publish failed: {exc}") from exc

    # -- component protocol ---------------------------------------------------------
    async def start(self) -> None:
        problems = self._ucfg.trust_problems(pinned=bool(self._trust.keys()))
        if problems:
            raise UplinkTrustError("; ".join(f"{key} {msg}" for key, msg in problems))
        if self.unsigned_acks_trusted:
            log.warning("uplink_acks_unsigned", hint="uplink.insecure_unsigned_acks is true: anyone who can "
                        "publish on the broker can make this box delete its data; set uplink.cloud_public_key")
        elif self._ucfg.insecure_unsigned_acks:
            log.warning("uplink_insecure_flag_ignored", reason="uplink.cloud_public_key is set: acks must be signed")
        self._client_id = client_id(*self._ids, self._cfg.paths.state_dir, self._ucfg.client_id)
        self._task = asyncio.create_task(self._run(), name="uplink")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None and not self._connected:
            # nothing to flush while not connected; a connect attempt would otherwise hold the stop
            # for up to its timeout (10 s, e.g. a broker refusing our certificate under TLS 1.3).
            # Once connected, the session leaves by itself and publishes `offline` first.
            self._task.cancel()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=5.0)
            if not done:
                log.warning("uplink_stop_forced")
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=5.0)
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "broker": self.broker,
            "protocol": "5" if self._v5 else "3.1.1",
            "client_id": self._client_id,
            "inflight": len(self._inflight),
            "waiting_to_resend": len(self._retry_at),
            "last_error": self.last_error,
            "last_ack_ms": self.last_ack_ms,
            "unsigned_acks_trusted": self.unsigned_acks_trusted,
            "rejections": dict(self.rejections),
            **self.counters,
            "inbound_dropped": self._inbound_bytes.dropped,
        }

    async def resend_now(self) -> int:
        """The `uplink.resend` command: every held unacked batch is published again now, those
        waiting after a rejection too; returns how many. UplinkOffline when not connected (on
        connecting, everything held goes anyway)."""
        if not self._connected or self.state != "online":
            raise UplinkOffline("the uplink is not connected; every held batch is resent when it connects")
        for b in await self._rt.buffer.pending_batches():
            self._inflight.setdefault(b.seq, b)
        self._sent_at.clear()
        self._retry_at.clear()
        self._wake.set()
        log.info("uplink_resend_requested", batches=len(self._inflight))
        return len(self._inflight)

    def notify(self) -> None:
        """New events were committed: wake the sender (cheap, callable per commit)."""
        self._wake.set()

    # -- connection loop --------------------------------------------------------------
    async def _run(self) -> None:
        delay = self._ucfg.reconnect.initial
        while not self._stopping.is_set():
            self.state = "connecting"
            try:
                url = await self._broker_url()
                self.broker = url
                try:
                    await self._session(url)
                finally:
                    self._connected = False
                delay = self._ucfg.reconnect.initial
            except MqttConnectError as exc:
                if self._v5 and self._ucfg.protocol == "auto" and _rc(exc) in _NO_V5:
                    log.info("uplink_mqtt5_refused", broker=self.broker, fallback="3.1.1",
                             note="inbound packet size now bounded by the broker only (docs/security.md)")
                    self._v5 = False
                    continue
                msg = await self._explain(exc)
                if msg != self.last_error:
                    log.warning("uplink_down", cause=msg, retry_in_s=round(delay, 2))
                self.last_error = msg
            except (aiomqtt.MqttError, OSError, EdgeError, ExceptionGroup) as exc:
                # a drop mid-session surfaces as an ExceptionGroup from the session's TaskGroup
                msg = await self._explain(_first_leaf(exc))
                if msg != self.last_error:
                    log.warning("uplink_down", cause=msg, retry_in_s=round(delay, 2))
                self.last_error = msg
            if self._stopping.is_set():
                break
            self.state = "backoff"
            await wait_event(self._stopping, self._rng.uniform(delay / 2, delay))
            delay = min(self._ucfg.reconnect.max, delay * 2)

    async def _explain(self, exc: BaseException) -> str:
        """Name the cause (TLS 1.3 client-cert rejections surface as bare timeouts otherwise)."""
        if self._params is not None and self.state != "online":
            with contextlib.suppress(Exception):
                return str(await diagnose_connect_error(exc, self._params))
        return explain_connect_error(exc, url=self.broker or self._ucfg.broker)

    async def _broker_url(self) -> str:
        if self._ucfg.broker != "auto":
            return self._ucfg.broker
        from edge.uplink.discovery import discover_broker

        d = self._ucfg.discovery
        return await discover_broker(d.interfaces, d.timeout, allow_plain=d.allow_plain)

    async def _session(self, url: str) -> None:
        params = connect_params(self._ucfg, url=url, warned=self._warned)
        self._params = params
        offline = json.dumps({"state": "offline", "device": self._ids[2]}).encode()
        props: Properties | None = None
        cap = self._inbound_cap()
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
            props.MaximumPacketSize = cap
        client = params.client(
            identifier=self._client_id or "/".join(self._ids),
            will=aiomqtt.Will(self._status_topic, offline, qos=1, retain=True),
            clean_session=None if self._v5 else True,
            max_inflight_messages=max(20, self._ucfg.window * 2),
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            properties=props,
            max_queued_incoming_messages=INBOUND_QUEUE_SHARED if self._inbound else INBOUND_QUEUE,
        )
        if not self._v5:  # MQTT 5 announces the cap in CONNECT; 3.1.1 needs it enforced here
            cap_inbound(client, cap, self._inbound_refused)
        self._inbound_bytes.install(client)
        async with client:
            self._connected = True
            self.counters["connects"] += 1
            online = {"state": "online", "device": self._ids[2], "kid": self._rt.keys.kid()}
            await client.publish(self._status_topic, json.dumps(online).encode(), qos=1, retain=True)
            if not _granted(await client.subscribe(self._ack_topic, qos=1)):
                # without it no ack ever arrives, and every batch would be resent forever on a
                # session that looks fine (seen with NATS under a 500-device reconnect storm)
                self.counters["subscribe_refused"] += 1
                raise SubscriptionRefused(f"the broker refused the subscription to {self._ack_topic}; reconnecting")
            subs = list(self._inbound)
            self._client = client  # a registration from now on subscribes itself
            for sub in subs:
                for f in sub.filters:
                    self._check_granted(client, f, await client.subscribe(f, qos=1))
            self.state = "online"
            if self.last_error is not None:
                log.info("uplink_up", broker=url)
            self.last_error = None
            # everything sealed but unacked (from before a restart or a disconnect) goes again;
            # batches the cloud asked us to resend later keep their backoff
            self._inflight = {b.seq: b for b in await self._rt.buffer.pending_batches()}
            self._sent_at = {}
            self._retry_at = {s: t for s, t in self._retry_at.items() if s in self._inflight}
            for sub in subs:
                if sub.on_connect is not None:
                    sub.on_connect()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._acks(client), name="uplink:acks")
                    tg.create_task(self._send(client), name="uplink:send")
                    tg.create_task(self._until_stop(), name="uplink:stop")
            except* _Stop:
                pass
            finally:
                self._client = None
                for t in [*self._publishing, *self._retries]:
                    t.cancel()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self._status_topic, offline, qos=1, retain=True, timeout=2.0)

    def _inbound_refused(self, size: int) -> None:
        self.counters["inbound_refused"] += 1
        log.warning("ack_rejected", reason="oversize-packet", size=size, max_bytes=self._inbound_cap(),
                    action="connection dropped before reading it")

    async def _until_stop(self) -> None:
        await self._stopping.wait()
        raise _Stop

    # -- sending ------------------------------------------------------------------------
    async def _send(self, client: aiomqtt.Client) -> None:
        clock = self._rt.clock
        timeout = self._ucfg.ack_timeout
        while True:
            now = clock.monotonic()
            due = [b for s, b in sorted(self._inflight.items()) if self._due(s, now, timeout)]
            for b in due:
                resend = b.seq in self._sent_at
                self._retry_at.pop(b.seq, None)
                await self._publish(client, b)
                self.counters["resent" if resend else "published"] += 1
            while len(self._inflight) < self._ucfg.window:
                batch = await self._batcher.seal_next()
                if batch is None:
                    break
                self._inflight[batch.seq] = batch
                await self._publish(client, batch)
                self.counters["published"] += 1
            self._wake.clear()
            wait = min(timeout, self._batcher.linger_left() or timeout) if self._inflight else \
                self._batcher.linger_left()
            if self._retry_at:
                wait = min(wait, min(self._retry_at.values()) - clock.monotonic())
            await wait_event(self._wake, max(0.005, wait))

    def _due(self, seq: int, now: float, timeout: float) -> bool:
        retry = self._retry_at.get(seq)
        if retry is not None:
            return now >= retry
        return now - self._sent_at.get(seq, -1e18) >= timeout

    async def _publish(self, client: aiomqtt.Client, b: SealedBatch) -> None:
        if self._bucket is not None:
            await self._bucket.take(len(b.payload))
        self._sent_at[b.seq] = self._rt.clock.monotonic()
        # QoS 1, but not awaited for its PUBACK here: a PUBACK deletes nothing (only the ack
        # does), and awaiting each one would serialize the window on round trips
        task = asyncio.create_task(self._publish_one(client, b))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish_one(self, client: aiomqtt.Client, b: SealedBatch) -> None:
        try:
            await client.publish(self._batch_topic, b.payload, qos=1, timeout=self._ucfg.ack_timeout)
        except aiomqtt.MqttError as exc:
            # the batch stays in flight and is resent after ack_timeout (or on reconnect)
            log.debug("publish_failed", seq=b.seq, error=str(exc))

    # -- acks -----------------------------------------------------------------------------
    async def _acks(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            self._inbound_bytes.taken(len(payload))
            if msg.topic.value != self._ack_topic and self._route(msg.topic, payload):
                continue
            await self._handle_ack(payload)

    def _route(self, topic: aiomqtt.Topic, payload: bytes) -> bool:
        """Hand a message on a registered filter to its component; False: not theirs."""
        for sub in self._inbound:
            if any(topic.matches(f) for f in sub.filters):
                try:
                    sub.handler(topic.value, payload)
                except Exception as exc:  # a component's bug must not end the uplink's session
                    log.error("uplink_inbound_handler_failed", error=type(exc).__name__)
                return True
        return False

    async def _handle_ack(self, payload: bytes) -> None:
        if len(payload) > MAX_ACK:  # refused before any decoding (parse_ack checks it too)
            self.counters["acks_malformed"] += 1
            log.warning("ack_rejected", reason="oversize", size=len(payload), max_bytes=MAX_ACK)
            return
        try:
            ack = parse_ack(payload)
        except WireError:
            self.counters["acks_malformed"] += 1
            log.warning("ack_rejected", reason="malformed")
            return
        batch = self._inflight.get(ack.seq)
        if batch is None or batch.hh != ack.hh:
            # not a batch we hold in flight (late duplicate ack, or forged): check the store
            held = {b.seq: b for b in await self._rt.buffer.pending_batches()}
            batch = held.get(ack.seq)
            if batch is None or batch.hh != ack.hh:
                self.counters["acks_unknown"] += 1
                return
        if not self.unsigned_acks_trusted and not self._signed(ack):
            # changes nothing: a deletion, a quarantine or a resend delay needs the cloud's signature
            reason = "unsigned" if ack.s is None else "bad-signature"
            self.counters["acks_unsigned" if ack.s is None else "acks_forged"] += 1
            log.warning("ack_rejected", reason=reason, seq=ack.seq, ok=ack.ok)
            return
        if ack.ok:
            # shielded: a stop or disconnect cancels this task, and a cancel landing on the
            # buffer's COMMIT would delete the batch without counting it (seen end to end)
            await asyncio.shield(self._delete_acked(ack.seq, ack.hh, batch.n))
            self._forget(ack.seq)
            return
        reason = ack.err or "unspecified"
        key = reason if reason in _KNOWN_REASONS else "other"  # an unknown reason must not grow the dict
        self.rejections[key] = self.rejections.get(key, 0) + 1
        if reason == "chain-broken":
            await self._rt.buffer.quarantine(ack.seq, ack.hh, reason)
            self.counters["rejected"] += 1
            log.error("batch_rejected", seq=ack.seq, err=reason, hint="kept aside in the buffer; see edge status")
            self._forget(ack.seq)
            return
        # any other rejection: the cloud could not take it now (e.g. our key is not registered yet)
        attempts = self._attempts.get(ack.seq, 0) + 1
        self._attempts[ack.seq] = attempts
        cap = self._ucfg.reconnect.max
        delay = min(cap, self._ucfg.reconnect.initial * 2 ** min(attempts - 1, 30))
        delay = self._rng.uniform(delay / 2, delay)
        self._retry_at[ack.seq] = self._rt.clock.monotonic() + delay
        self.counters["deferred"] += 1
        log.warning("batch_refused_resend_later", seq=ack.seq, err=key, attempt=attempts,
                    retry_in_s=round(delay, 2))
        self._wake.set()

    def _signed(self, ack: Ack) -> bool:
        """The ack's signature verifies with one of the trusted cloud keys."""
        keys = self._trust.keys()
        order = sorted(keys, key=lambda kid: kid != self._last_kid)  # the last good key first
        for kid in order:
            if verify_ack(ack, tenant=self._ids[0], store=self._ids[1], device=self._ids[2], cloud_key=keys[kid]):
                self._last_kid = kid
                return True
        return False

    def _forget(self, seq: int) -> None:
        self._inflight.pop(seq, None)
        self._sent_at.pop(seq, None)
        self._retry_at.pop(seq, None)
        self._attempts.pop(seq, None)
        self._wake.set()

    async def _delete_acked(self, seq: int, hh: bytes, n: int) -> None:
        """Delete an acked batch and count it, as one step."""
        if await self._rt.buffer.ack(seq, hh):
            self.counters["acked"] += 1
            self.counters["events_acked"] += n
            self.last_ack_ms = self._rt.clock.wall_ms()


_KNOWN_REASONS = frozenset(REASONS)


def _rc(exc: MqttConnectError) -> int:
    rc = exc.rc
    return rc if isinstance(rc, int) else int(getattr(rc, "value", -1))


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Stop(Exception):
    """Raised inside the session's task group to leave it on a clean stop."""


def uplink_component(rt: Runtime) -> Uplink:
    up = Uplink(rt)
    rt.buffer.add_commit_listener(lambda _last: up.notify())
    return up


class SubscriptionRefused(EdgeError):
    """The broker answered a SUBSCRIBE with a failure code (0x80 or above)."""


def _granted(result: object) -> bool:
    """Whether every code of a SUBACK is a granted QoS (3.1.1: ints, 0x80 is failure; 5: reason
    codes, 0x80 and above are failures)."""
    codes = result if isinstance(result, (list, tuple)) else [result]
    for code in codes:
        value = getattr(code, "value", code)
        if not isinstance(value, int) or value >= 0x80:
            return False
    return True
