"""The reference receiver: verifies uplink-v1 batches, stores their events, acks them.

For every batch: parse -> verify (keys reloaded from `keys_dir` when a kid is unknown, at
most once a second) -> chain check -> dedupe -> append events to the JSON-lines file ->
ack on `{prefix}/{tenant}/{store}/{device}/ack`. Messages are handled in groups (whatever
arrived together, at most `max_group`): one fsync of the JSON lines and one SQLite commit
per group, and only then the acks, because an `ok: true` ack promises the data is stored.

Resets. A device that lost its state starts over at seq 1 with a new chain. Dedupe is on
(tenant, store, device, seq) as the spec says, but within a chain *epoch*: the store keys
batches by (tenant, store, device, seq, epoch), and a seq 1 arriving when the current epoch
already holds a different seq 1 or higher seqs opens a new epoch (reported as a reset). An
exact resend (same seq, same hh) of a batch from any epoch is a duplicate, acked `ok: true`.
A *different* batch for a seq the current epoch already holds (other than seq 1) is refused
with `chain-broken`: the device promised never to reuse a seq, so two signed batches for one
position fork the chain, and acking it `ok: true` would claim we stored data we did not.

Crash safety: events are appended and fsynced before the SQLite commit, so a crash between
the two can leave a batch's events in the file without its row; the device resends (no ack
was sent) and the events are appended again. The file is at-least-once, the store exact.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.aio import wait_event
from edge.clock import Clock, SystemClock
from edge.errors import ConfigError, EdgeError, KeyError_, StartupError, WireError
from edge.uplink.connect import NO_DELAY
from edge.uplink.jsonlines import json_line_encoder
from edge.uplink.receiver_config import ReceiverConfig, load_receiver_config
from edge.uplink.verify import load_public_keys
from edge.uplink.wire import (
    Batch,
    ack_topic,
    batch_filter,
    make_ack,
    parse_batch,
    parse_topic,
    salvage_ack_ids,
    verify_batch,
)

log = structlog.get_logger()

_EXTRA_KEYS = frozenset({"tenant", "store", "device", "seq", "received_ms"})  # added to each event
KEY_RELOAD_INTERVAL = 1.0  # seconds between key folder reloads triggered by unknown kids

Verdict = Literal["accepted", "duplicate", "chain-broken"]
EventSink = Callable[[Mapping[str, Any]], None]
Outgoing = list[tuple[str, bytes]]  # (topic, payload) of acks to publish


@dataclass(slots=True)
class ReceiverStats:
    accepted: int = 0  # batches stored
    duplicates: int = 0  # batches already stored (acked ok again, not rewritten)
    rejected: dict[str, int] = field(default_factory=dict)  # by spec reason
    gaps: int = 0  # times a device's seq jumped by more than 1
    resets: int = 0  # times a device started over at seq 1
    events: int = 0  # events written
    unacked: int = 0  # rejected without an ack (no seq/hh recoverable, or topic unusable)
    errors: int = 0  # messages or groups that failed inside the receiver (logged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    tenant TEXT NOT NULL, store TEXT NOT NULL, device TEXT NOT NULL,
    seq INTEGER NOT NULL, epoch INTEGER NOT NULL,
    hh BLOB NOT NULL, prev BLOB NOT NULL,
    n INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    sealed_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, store, device, seq, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL, store TEXT NOT NULL, device TEXT NOT NULL,
    epoch INTEGER NOT NULL, highest INTEGER NOT NULL,
    PRIMARY KEY (tenant, store, device)
) WITHOUT ROWID;
"""

Ids = tuple[str, str, str]


class _Store:
    """Dedupe and chain state. Used from one thread at a time (the group worker)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an ack promises the batch is stored
        self._db.execute("PRAGMA busy_timeout=5000")  # receivers may share one store
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def execute(self, sql: str) -> None:
        self._db.execute(sql)

    def device(self, ids: Ids) -> tuple[int, int] | None:
        row = self._db.execute(
            "SELECT epoch, highest FROM devices WHERE tenant=? AND store=? AND device=?", ids
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def at_seq(self, ids: Ids, seq: int) -> list[tuple[int, bytes, bytes]]:
        """(epoch, hh, prev) of every stored batch with this seq."""
        return self._db.execute(
            "SELECT epoch, hh, prev FROM batches WHERE tenant=? AND store=? AND device=? AND seq=?",
            (*ids, seq),
        ).fetchall()

    def add(self, b: Batch, epoch: int, highest: int, received_ms: int) -> None:
        self._db.execute(
            "INSERT INTO batches VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (*b.ids, b.seq, epoch, b.hh, b.prev, b.n, b.first, b.last, b.t, received_ms),
        )
        self._db.execute(
            "INSERT INTO devices VALUES (?,?,?,?,?) ON CONFLICT (tenant, store, device)"
            " DO UPDATE SET epoch=excluded.epoch, highest=excluded.highest",
            (*b.ids, epoch, highest),
        )


def load_cloud_key(path: Path) -> Ed25519PrivateKey:
    """The cloud's Ed25519 private key: 32 raw bytes, or 64 hex characters."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyError_(f"cannot read the cloud key {path}: {exc.strerror or exc}") from None
    raw = data
    if len(data) != 32:
        try:
            raw = bytes.fromhex(data.decode("ascii").strip())
        except ValueError:
            raw = b""
    if len(raw) != 32:
        raise KeyError_(
            f"cloud key {path} is not an Ed25519 private key",
            hint="expected 32 raw bytes or 64 hex characters",
        )
    if mode & 0o077:
        log.warning("cloud_key_permissions", path=str(path), mode=oct(mode & 0o777), hint="chmod 600")
    return Ed25519PrivateKey.from_private_bytes(raw)


@dataclass(slots=True)
class _Group:
    """What one group of messages produced; applied to stats/logs only once committed."""

    acks: list[tuple[str, bytes, Verdict | str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class Receiver:
    """Subscribes to every device's batches and stores what verifies; see the module doc."""

    def __init__(self, cfg: ReceiverConfig, *, on_event: EventSink | None = None, clock: Clock | None = None):
        self._cfg = cfg
        self._on_event = on_event
        self._clock = clock or SystemClock()
        self._encode = json_line_encoder()
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._keys_loaded_at = -1e18
        self._cloud_key: Ed25519PrivateKey | None = None
        self._store: _Store | None = None
        self._out: IO[bytes] | None = None
        self.stats = ReceiverStats()
        self.ready = asyncio.Event()  # set while subscribed

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        cfg = self._cfg
        try:
            self._reload_keys()
            if cfg.cloud_key is not None:
                self._cloud_key = load_cloud_key(cfg.cloud_key)
            self._store = _Store(cfg.db)
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
            existed = cfg.out.exists()
            self._out = cfg.out.open("ab")
            if not existed:  # make the new file's directory entry durable too
                fd = os.open(cfg.out.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except KeyError_ as exc:
            self._close()
            raise StartupError("receiver", str(exc), hint=exc.hint) from exc
        except (OSError, sqlite3.Error) as exc:
            self._close()
            raise StartupError("receiver", f"cannot open {cfg.db} or {cfg.out}: {exc}") from exc

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _client(self) -> aiomqtt.Client:
        cfg = self._cfg
        tls = None
        if cfg.use_tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            )
        proto = aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311
        return aiomqtt.Client(
            cfg.host, cfg.port, identifier=cfg.client_id, protocol=proto, tls_params=tls,
            keepalive=cfg.keepalive, socket_options=NO_DELAY,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until `stop` is set; reconnects with jittered, escalating backoff."""
        self._open()
        cfg = self._cfg
        topic_filter = batch_filter(cfg.prefix, cfg.shared_group)
        delay = 1.0
        try:
            while not stop.is_set():
                try:
                    async with self._client() as client:
                        client.pending_calls_threshold = 4 * cfg.max_group  # acks go out in bursts
                        await client.subscribe(topic_filter, qos=1)
                        log.info("receiver_subscribed", broker=f"{cfg.host}:{cfg.port}", topic=topic_filter)
                        self.ready.set()
                        delay = 1.0
                        await self._pump(client, stop)
                except aiomqtt.MqttError as exc:
                    self.ready.clear()
                    wait = delay * random.uniform(0.5, 1.0)
                    log.warning("receiver_disconnected", error=str(exc), retry_in=round(wait, 2))
                    await wait_event(stop, wait)
                    delay = min(delay * 2, 30.0)
        finally:
            self.ready.clear()
            self._close()
            log.info("receiver_stopped", **self.stats.as_dict())

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        messages = client.messages
        stopped = asyncio.create_task(stop.wait(), name="receiver-stop")
        try:
            while True:
                nxt = asyncio.create_task(anext(messages), name="receiver-next")
                done, _ = await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                group = [nxt.result()]
                while len(messages) and len(group) < self._cfg.max_group:
                    group.append(await anext(messages))
                items = [(m.topic.value, m.payload) for m in group]
                work = asyncio.ensure_future(asyncio.to_thread(self._process_group, items))
                try:
                    acks, records = await asyncio.shield(work)
                except asyncio.CancelledError:
                    await asyncio.wait({work})  # the worker uses the store run() is about to close
                    raise
                if self._on_event is not None:
                    for rec in records:
                        self._on_event(rec)
                await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in acks))
        finally:
            stopped.cancel()

    # ------------------------------------------------------------------ one group (worker thread)

    def _process_group(self, items: Sequence[tuple[str, object]]) -> tuple[Outgoing, list[dict[str, Any]]]:
        store, out = self._store, self._out
        if store is None or out is None:
            raise RuntimeError("the receiver is not running")
        now = self._clock.wall_ms()
        g = _Group()
        store.execute("BEGIN IMMEDIATE")
        try:
            for topic, payload in items:
                data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                store.execute("SAVEPOINT msg")
                try:
                    self._handle(store, topic, data, now, g)
                except Exception:  # a bug must not stall every batch behind this one
                    store.execute("ROLLBACK TO msg")
                    g.counts["errors"] += 1
                    log.exception("receiver_message_failed", topic=topic)
                store.execute("RELEASE msg")
            pos = out.tell()
            try:
                if g.lines:
                    out.write("".join(g.lines).encode("utf-8"))
                    out.flush()
                    os.fsync(out.fileno())
                store.execute("COMMIT")
            except (OSError, sqlite3.Error):
                out.truncate(pos)
                raise
        except (OSError, sqlite3.Error) as exc:
            with suppress(sqlite3.Error):
                store.execute("ROLLBACK")
            self.stats.errors += 1
            log.exception("receiver_store_failed", error=str(exc), batches=len(items), hint="disk full?")
            # nothing new was stored: only acks that do not claim new data go out
            return [(t, p) for t, p, v in g.acks if v != "accepted"], []
        self._apply(g)
        return [(t, p) for t, p, _ in g.acks], g.records

    def _apply(self, g: _Group) -> None:
        s = self.stats
        s.accepted += g.counts["accepted"]
        s.duplicates += g.counts["duplicate"]
        s.events += g.counts["events"]
        s.gaps += g.counts["gaps"]
        s.resets += g.counts["resets"]
        s.unacked += g.counts["unacked"]
        s.errors += g.counts["errors"]
        for reason, n in g.rejected.items():
            s.rejected[reason] = s.rejected.get(reason, 0) + n
        for name, kv in g.notes:
            log.warning(name, **kv)

    def _ack(self, g: _Group, ids: Ids, seq: int, hh: bytes, verdict: Verdict | str) -> None:
        ok = verdict in ("accepted", "duplicate")
        payload = make_ack(
            tenant=ids[0], store=ids[1], device=ids[2], seq=seq, hh=hh, ok=ok,
            err=None if ok else verdict, key=self._cloud_key,
        )  # fmt: skip
        g.acks.append((ack_topic(self._cfg.prefix, *ids), payload, verdict))

    def _reject(self, g: _Group, ids: Ids, reason: str, *, detail: str, at: tuple[int, bytes] | None) -> None:
        """Count and log a rejection; ack it when the batch's (seq, hh) is known."""
        g.rejected[reason] += 1
        seq = at[0] if at is not None else None
        log.warning("batch_rejected", tenant=ids[0], store=ids[1], device=ids[2], seq=seq, reason=reason,
                    detail=detail)  # fmt: skip
        if at is None:
            g.counts["unacked"] += 1
            return
        self._ack(g, ids, at[0], at[1], reason)

    def _handle(self, store: _Store, topic: str, payload: bytes, now: int, g: _Group) -> None:
        cfg = self._cfg
        try:
            tenant, st, device, kind = parse_topic(topic, cfg.prefix)
        except WireError as exc:
            g.rejected["malformed"] += 1
            g.counts["unacked"] += 1
            log.warning("batch_rejected", reason="malformed", detail=f"unusable topic: {exc}")
            return
        if kind != "batch":
            return
        ids = (tenant, st, device)
        try:
            batch = parse_batch(payload, max_size=cfg.max_payload)
        except WireError as exc:
            at = salvage_ack_ids(payload, max_size=cfg.max_payload)
            self._reject(g, ids, exc.reason, detail=str(exc), at=at)
            return
        try:
            events = self._verify(batch, ids)
        except WireError as exc:
            self._reject(g, ids, exc.reason, detail=str(exc), at=(batch.seq, batch.hh))
            return
        verdict = self._admit(store, batch, now, g)
        if verdict == "chain-broken":
            detail = "the batch contradicts the stored chain (prev, or another batch with this seq)"
            self._reject(g, ids, verdict, detail=detail, at=(batch.seq, batch.hh))
            return
        g.counts[verdict] += 1
        if verdict == "accepted":
            self._write(batch, events, now, g)
        self._ack(g, ids, batch.seq, batch.hh, verdict)

    def _verify(self, batch: Batch, ids: Ids) -> list[dict[str, Any]]:
        try:
            return verify_batch(batch, keys=self._keys, topic_ids=ids, max_body=self._cfg.max_body)
        except WireError as exc:
            if exc.reason != "unknown-key" or not self._maybe_reload_keys():
                raise
        return verify_batch(batch, keys=self._keys, topic_ids=ids, max_body=self._cfg.max_body)

    def _maybe_reload_keys(self) -> bool:
        if self._clock.monotonic() - self._keys_loaded_at < KEY_RELOAD_INTERVAL:
            return False
        try:
            self._reload_keys()
        except KeyError_ as exc:
            log.warning("keys_reload_failed", error=str(exc))
            return False
        return True

    def _reload_keys(self) -> None:
        self._keys_loaded_at = self._clock.monotonic()
        keys, problems = load_public_keys(self._cfg.keys_dir)
        for p in problems:
            log.warning("device_key_ignored", problem=p)
        self._keys = keys
        log.info("keys_loaded", keys=len(keys), folder=str(self._cfg.keys_dir))

    def _admit(self, store: _Store, b: Batch, now: int, g: _Group) -> Verdict:
        """Dedupe, reset detection, chain check and gap report; stores the batch if accepted."""
        ids = b.ids
        epoch, highest = store.device(ids) or (1, 0)
        rows = store.at_seq(ids, b.seq)
        if any(hh == b.hh for _, hh, _ in rows):
            return "duplicate"
        current = next((hh for e, hh, _ in rows if e == epoch), None)
        reset = False
        if b.seq == 1 and (current is not None or highest > 1):
            # the genuine first batch arriving late is proven by a held seq 2 that links to it
            late_first = current is None and any(e == epoch and p == b.hh for e, _, p in store.at_seq(ids, 2))
            reset = not late_first
        elif current is not None:
            return "chain-broken"  # a different batch for a seq this chain already holds
        who = {"tenant": ids[0], "store": ids[1], "device": ids[2]}
        if reset:
            epoch, highest = epoch + 1, 0
            g.counts["resets"] += 1
            g.notes.append(("uplink_reset", {**who, "epoch": epoch}))
        else:
            before = [hh for e, hh, _ in store.at_seq(ids, b.seq - 1) if e == epoch]
            if before and before[0] != b.prev:
                return "chain-broken"
            if highest and b.seq > highest + 1:
                g.counts["gaps"] += 1
                g.notes.append(("uplink_gap", {**who, "missing_from": highest + 1, "missing_to": b.seq - 1}))
        store.add(b, epoch, max(highest, b.seq), now)
        return "accepted"

    def _write(self, b: Batch, events: list[dict[str, Any]], now: int, g: _Group) -> None:
        extra = {"tenant": b.tenant, "store": b.store, "device": b.device, "seq": b.seq, "received_ms": now}
        encode = self._encode
        if self._on_event is None:
            # fast path: splice the pre-encoded extra fields into each event's object
            tail = "," + encode(extra)[1:] + "\n"
            for ev in events:
                if _EXTRA_KEYS.isdisjoint(ev):
                    g.lines.append(encode(ev)[:-1] + tail)
                else:  # an unknown event key named like ours: ours win, as in the slow path
                    g.lines.append(encode({**ev, **extra}) + "\n")
        else:
            for ev in events:
                rec = {**ev, **extra}
                g.lines.append(encode(rec) + "\n")
                g.records.append(rec)
        g.counts["events"] += len(events)


async def receive_main(config_path: str) -> int:
    """`edge receive --config FILE`: run until SIGINT/SIGTERM. 0 on a clean stop, 2 on bad config."""
    try:
        cfg = load_receiver_config(config_path)
    except ConfigError as exc:
        print(f"edge receive: {exc.path}: configuration problem(s):")
        for p in exc.problems:
            print(f"  - {p}")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Receiver(cfg).run(stop)
    except EdgeError as exc:
        print(f"edge receive: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
