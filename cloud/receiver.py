"""The receiver: the ingest core (cloud/core.py) behind a transport, over a store, with stats.

`Receiver(cfg)` wires the defaults: MQTT (cloud/mqtt.py), SQLite + JSON lines
(cloud/sqlite_store.py), the keys folder (cloud/identity.py); each can be passed in instead
(a NATS JetStream transport, a PostgreSQL store, a registry of record). The cloud key is
required: the receiver refuses to start without it, every ack is signed. Groups run in a
worker thread (blocking store calls); acks leave only after the commit (the transport
publishes what the handler returns).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from cloud.ack import AckSigner, DuplicateAcks
from cloud.chain import Deferrals
from cloud.config import ReceiverConfig, load_receiver_config
from cloud.core import GroupResult, IngestCore
from cloud.identity import DeviceKeys, KeysDir
from cloud.keys import load_cloud_key
from cloud.sqlite_store import SqliteStore
from cloud.store import Store
from cloud.transport import Inbound, Settlement, Transport
from edge.clock import Clock, SystemClock
from edge.errors import ConfigError, EdgeError, KeyError_, StartupError
from edge.logs import configure_logging

log = structlog.get_logger()

EventSink = Callable[[Mapping[str, Any]], None]


@dataclass(slots=True)
class ReceiverStats:
    accepted: int = 0  # batches stored
    duplicates: int = 0  # batches already stored (acked ok again, not rewritten)
    duplicate_acks_suppressed: int = 0  # of those, not answered: acked within duplicate_ack_interval
    rejected: dict[str, int] = field(default_factory=dict)  # by spec reason (answered or not)
    gaps: int = 0  # times a device's seq jumped by more than 1
    resets: int = 0  # times a device started over at seq 1
    events: int = 0  # events written
    unacked: int = 0  # refused without an ack (unauthenticated, or topic unusable)
    unauthenticated: int = 0  # unparseable, unknown key, bad signature or body hash: never answered
    deferred: int = 0  # ambiguous against an unlinked held batch: not answered yet (cloud/chain.py)
    settled: int = 0  # deferred batches accepted after defer_max_resends / defer_max_age (cloud/chain.py)
    detached: int = 0  # held batches moved out of a chain by a batch that links (or is settled)
    errors: int = 0  # messages or groups that failed inside the receiver (logged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, r: GroupResult) -> None:
        c = r.counts
        self.accepted += c["accepted"]
        self.duplicates += c["duplicate"]
        self.duplicate_acks_suppressed += c["duplicate_acks_suppressed"]
        self.events += c["events"]
        self.gaps += c["gaps"]
        self.resets += c["resets"]
        self.unacked += c["unacked"]
        self.unauthenticated += c["unauthenticated"]
        self.deferred += c["deferred"]
        self.settled += c["settled"]
        self.detached += c["detached"]
        self.errors += c["errors"]
        for reason, n in r.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n


class Receiver:
    """Receives, verifies, stores and acks batches until stopped; see the module doc."""

    def __init__(self, cfg: ReceiverConfig, *, on_event: EventSink | None = None, clock: Clock | None = None,
                 transport: Transport | None = None, store: Store | None = None,
                 keys: DeviceKeys | None = None) -> None:  # fmt: skip
        self._cfg = cfg
        self._on_event = on_event
        self._clock = clock or SystemClock()
        if transport is None:
            from cloud.mqtt import MqttTransport

            transport = MqttTransport(cfg)
        self._transport = transport
        self._store: Store = store or SqliteStore(cfg.db, cfg.out)
        self._keys_dir = KeysDir(cfg.keys_dir, self._clock) if keys is None else None
        self._keys: DeviceKeys = keys or self._keys_dir  # type: ignore[assignment]  # one of them is set
        self._core: IngestCore | None = None
        self.stats = ReceiverStats()

    @property
    def ready(self) -> asyncio.Event:
        return self._transport.ready

    def open(self) -> IngestCore:
        """Load the cloud key and the device keys, open the store; StartupError when any fails."""
        cfg = self._cfg
        try:
            cloud_key = load_cloud_key(cfg.cloud_key)
            if self._keys_dir is not None:
                self._keys_dir.load()
            self._store.open()
        except KeyError_ as exc:
            raise StartupError("receiver", str(exc), hint=exc.hint) from exc
        except (OSError, sqlite3.Error) as exc:
            raise StartupError("receiver", f"cannot open the store ({cfg.db}, {cfg.out}): {exc}") from exc
        self._core = IngestCore(store=self._store, keys=self._keys, signer=AckSigner(cloud_key, cfg.prefix),
                                limits=cfg.limits, prefix=cfg.prefix, clock=self._clock,
                                duplicate_acks=DuplicateAcks(cfg.duplicate_ack_interval),
                                deferrals=Deferrals(cfg.defer_max_resends, cfg.defer_max_age))  # fmt: skip
        return self._core

    def close(self) -> None:
        self._store.close()
        self._core = None

    def process(self, items: Sequence[Inbound]) -> GroupResult:
        """One group through the core (blocking), stats and logs applied; after `open()`."""
        if self._core is None:
            raise RuntimeError("the receiver is not open")
        result = self._core.process(items)
        self.stats.apply(result)
        for name, kv in result.notes:
            log.warning(name, **kv)
        return result

    async def _handle(self, items: Sequence[Inbound]) -> Settlement:
        result = await asyncio.to_thread(self.process, items)
        if self._on_event is not None:
            for acc in result.accepted:
                b = acc.batch
                extra = {"tenant": b.tenant, "store": b.store, "device": b.device, "seq": b.seq,
                         "received_ms": acc.received_ms}  # fmt: skip
                for ev in acc.events:
                    self._on_event({**ev, **extra})
        return Settlement(acks=result.acks, committed=result.committed)

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until `stop` is set."""
        self.open()
        try:
            await self._transport.run(stop, self._handle)
        finally:
            self.close()
            log.info("receiver_stopped", **self.stats.as_dict())


async def receive_main(config_path: str, *, prog: str = "edge-cloud receive") -> int:
    """Run until SIGINT/SIGTERM. 0 on a clean stop, 2 on a bad config or missing keys, 1 otherwise."""
    try:
        cfg = load_receiver_config(config_path)
    except ConfigError as exc:
        for p in exc.problems:
            print(p)
            if "'cloud_key' is missing" in p:
                print("  hint: make the cloud key with: edge-cloud keys create --out FILE, and set cloud_key: FILE")
        print(f"{prog}: {len(exc.problems)} problem(s) in {exc.path}")
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Receiver(cfg).run(stop)
    except StartupError as exc:
        print(f"{prog}: {exc}")
        return 2
    except EdgeError as exc:
        print(f"{prog}: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
