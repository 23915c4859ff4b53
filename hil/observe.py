"""What the rig watches while a scenario runs: the wire, and the daemon's state over time.

- `WireCapture`: an MQTT client subscribed to everything under the uplink prefix. Raw
  payloads go to `wire/payloads.bin` and each batch's decompressed body to
  `wire/bodies.bin` (a compressed body would hide a raw identifier from the leak scan).
- `Sampler`: every `interval` seconds, the buffer's backlog (events not yet acked, read-only
  from the database as `edge status` does), the daemon's runtime.json (driver and uplink
  states), and how many events the receiver has: the data of the report's picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiomqtt

from cloud.config import ReceiverConfig
from cloud.receiver import Receiver, ReceiverStats
from edge.buffer.stats import count_events, read_stats
from edge.errors import BufferError_, WireError
from edge.wire.uplink import parse_batch, parse_topic


class WireCapture:
    """Records every message under `prefix` until stopped; survives broker restarts."""

    def __init__(self, broker_url: str, prefix: str, out_dir: Path) -> None:
        u = urlsplit(broker_url)
        self._host, self._port = u.hostname or "127.0.0.1", u.port or 1883
        self._prefix = prefix
        self.dir = out_dir
        self.messages = 0
        self.batches = 0
        self.undecodable = 0
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "payloads.bin").open("ab") as raw, (self.dir / "bodies.bin").open("ab") as bodies:
            while not stop.is_set():
                try:
                    async with aiomqtt.Client(self._host, self._port, identifier="hil-wire-capture") as client:
                        await client.subscribe(f"{self._prefix}/#", qos=1)
                        self.ready.set()
                        await self._pump(client, stop, raw, bodies)
                except aiomqtt.MqttError:
                    self.ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.3)

    async def _pump(self, client: aiomqtt.Client, stop: asyncio.Event, raw: IO[bytes], bodies: IO[bytes]) -> None:
        stopped = asyncio.create_task(stop.wait())
        try:
            messages = client.messages
            while True:
                nxt = asyncio.create_task(anext(messages))
                done, _ = await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                msg = nxt.result()
                payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
                self.messages += 1
                raw.write(msg.topic.value.encode() + b"\n" + payload + b"\n")
                raw.flush()
                self._body(msg.topic.value, payload, bodies)
        finally:
            stopped.cancel()

    def _body(self, topic: str, payload: bytes, bodies: IO[bytes]) -> None:
        try:
            if parse_topic(topic, self._prefix)[3] != "batch":
                return
            batch = parse_batch(payload)
            body = zlib.decompress(batch.b) if batch.z == "zlib" else batch.b
        except (WireError, zlib.error):
            self.undecodable += 1
            return
        self.batches += 1
        bodies.write(body + b"\n")
        bodies.flush()


@dataclass(slots=True)
class Sample:
    t_ms: int  # wall clock
    backlog: int | None  # events stored and not yet acked (None: database unreadable)
    next_event_id: int | None
    uplink: str | None
    drivers: dict[str, str] = field(default_factory=dict)  # name -> state
    received: int = 0
    daemon_up: bool = False


class Sampler:
    def __init__(
        self, db: Path, runtime: Path, received: Callable[[], int], daemon_up: Callable[[], bool],
        interval: float = 0.5,
    ) -> None:  # fmt: skip
        self._db, self._runtime = db, runtime
        self._received, self._daemon_up = received, daemon_up
        self._interval = interval
        self.samples: list[Sample] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(await self.sample())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def sample(self) -> Sample:
        backlog, next_id = await asyncio.to_thread(self._buffer)
        rt = self._read_runtime()
        drivers = {str(d.get("name")): str(d.get("state")) for d in rt.get("drivers", []) if isinstance(d, dict)}
        uplink = (rt.get("components") or {}).get("uplink", {}).get("state") if rt else None
        up = self._daemon_up()
        return Sample(int(time.time() * 1000), backlog, next_id, uplink if up else "down", drivers,
                      self._received(), up)  # fmt: skip

    def _buffer(self) -> tuple[int | None, int | None]:
        if not self._db.exists():
            return None, None
        try:
            return count_events(self._db), read_stats(self._db).next_event_id
        except (BufferError_, OSError):
            return None, None

    def _read_runtime(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._runtime.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}


class ReceiverHost:
    """The reference receiver, restartable. The cloud does not share the store's outage, but
    our receiver talks to the same broker; after a long cut its reconnect backoff (up to
    30 s) would be measured as the daemon's recovery. `kick()` starts it afresh at once."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self._cfg = cfg
        self._past = ReceiverStats()
        self._current: Receiver | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def ready(self) -> asyncio.Event:
        assert self._current is not None
        return self._current.ready

    @property
    def events(self) -> int:
        return self._past.events + (self._current.stats.events if self._current else 0)

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._current = Receiver(self._cfg)
        self._task = asyncio.create_task(self._current.run(self._stop), name="hil:receiver")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._current is not None:
            _add(self._past, self._current.stats)
        self._current, self._task = None, None

    async def kick(self) -> None:
        """Restart now unless it is connected."""
        if self._current is not None and self._current.ready.is_set():
            return
        await self.stop()
        self.start()

    def stats(self) -> ReceiverStats:
        total = ReceiverStats()
        _add(total, self._past)
        if self._current is not None:
            _add(total, self._current.stats)
        return total


def _add(into: ReceiverStats, s: ReceiverStats) -> None:
    for name in ("accepted", "duplicates", "gaps", "resets", "events", "unacked", "errors"):
        setattr(into, name, getattr(into, name) + getattr(s, name))
    for reason, n in s.rejected.items():
        into.rejected[reason] = into.rejected.get(reason, 0) + n
