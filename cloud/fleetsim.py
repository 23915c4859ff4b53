"""The fleet simulator: N store devices in one process, each running the project's real uplink.

Design. A simulated device is a real edge core minus its drivers: its own `KeyStore` (Ed25519
device key, created on first use), its own SQLite `Buffer` (so its own event ids, seq and chain,
kept across runs in `state/<store>/`), a `Pipeline` into that buffer, and the real `Uplink`
component (edge/uplink/service.py) with its own MQTT client: it seals, signs, publishes with QoS 1,
accepts only acks signed by the cloud key, deletes on `ok`, resends on reconnect. Nothing of the
client is re-implemented here, so load and fault tests exercise the code devices run.

What the simulator adds is only what drivers would do: a generator per device that submits
synthetic readings (`edge.sim`, no identifiers) at `rate` events/s, or all at once. Each device's
public key is written in the receiver's layout (`keys_dir/<tenant>/<store>/<device>.pub`); the
receiver reloads its folder on an unknown key, so it can already be running. Against the chain's
cloud (NATS + PostgreSQL) the keys are registered in the PostgreSQL device registry instead
(`registry_dsn`, as `edge-cloud devices add` does) and each device logs in with its store's MQTT
credentials (`credentials`: store -> user name and password file, the config's `uplink.auth`).

A run ends when every device has generated its events and its buffer is empty (all acked), or at
`timeout`; then every uplink stops cleanly (`offline` status) and every buffer closes.

Downlink (`downlink=True`). Each device also runs the REAL downlink component
(edge/downlink/component.py) on its uplink's MQTT session: its three desired layers, its tenant's
consent shards and its command topic; documents verified with the spec's cloud key (the one the
uplink trusts for acks); consent shards applied by the real `ConsentSync` (`consent.db`, purge of
its buffer in one transaction); commands by the real `CommandRunner`; `reported` published
retained. Desired layers go the real `DesiredState` way: the device's configuration is a YAML file
(`<store>/<device>/edge.yaml`) and the layers over it are merged and validated as `edge
check-config` does, persisted in `desired.json`, watched for `health.apply_grace` (a simulated
device has no drivers: its buffer is what is watched) and reported `applied`. What a simulated
device does NOT do: it has no drivers to reconfigure (a drivers-only change is applied "live" to
none), and where a daemon restarts for a change (anything beyond `drivers`) the simulated one
restarts in-process (`SimDownlink`): the desired state is taken again through `boot_config` (the
code `edge run` starts with, which takes the persisted trial) and the retained layers it held back
meanwhile are offered again, but its buffer and MQTT session are not reopened, so settings read
at open (buffer bounds and retention, uplink window) keep their values until the fleet's next run,
which opens every device with `boot_config`'s effective configuration.

Memory. Per device: one aiosqlite thread and connection (cache capped at 512 KiB by the buffer,
touched far less), one MQTT client, a few tasks; with the downlink two more small SQLite
connections (`consent.db`, `commands.db`) and its (empty, bounded) queue. Figures:
docs/benchmarks.md, "Fleet simulator" and "Fleet downlink (500 devices)".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml

from cloud.identity import register_key
from edge.buffer import Buffer
from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.downlink.component import Downlink
from edge.downlink.consent import ConsentSync
from edge.downlink.desired import Boot, DesiredState, Watch, boot_config
from edge.events import Pending, Reading
from edge.pipeline import Pipeline
from edge.privacy.keys import KeyStore
from edge.supervisor import Runtime
from edge.uplink.service import Uplink, uplink_component

log = structlog.get_logger("cloud.fleetsim")

OPEN_CONCURRENCY = 16  # devices opening their buffer at once (each open is a few blocking SQLite steps)
TICK_S = 0.1  # generator pacing step with a rate
DONE_POLL_S = 0.2


@dataclass(slots=True, frozen=True)
class FleetSpec:
    """What to simulate. `rate` is events/s per device (None: all events at once). `offline_first`:
    every device buffers all its events before any uplink starts (a reconnect storm)."""

    devices: int
    events: int
    broker: str
    state: Path
    keys_dir: Path
    cloud_public_key: str
    prefix: str = "edge/v1"
    tenant: str = "sim"
    rate: float | None = None
    offline_first: bool = False
    timeout: float = 600.0
    synchronous: Literal["full", "normal"] = "normal"
    window: int = 8
    ack_timeout: float = 15.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 5.0
    registry_dsn: str | None = None  # register keys in PostgreSQL's registry, not in keys_dir
    credentials: Mapping[str, tuple[str, Path]] | None = None  # store -> (MQTT user, password file)
    downlink: bool = False  # each device also runs the real downlink component (see the module doc)

    def ids(self, i: int) -> tuple[str, str, str]:
        """(tenant, store, device) of device number `i` (from 1): one device per store."""
        return self.tenant, f"store-{i:04d}", f"edge-{i:04d}"


@dataclass(slots=True, frozen=True)
class DeviceReport:
    store: str
    device: str
    generated: int
    events_acked: int
    backlog_events: int  # unsealed events left in its buffer
    batches_pending: int  # sealed, not acked
    published: int
    resent: int
    acks_forged: int
    connects: int


@dataclass(slots=True, frozen=True)
class FleetReport:
    devices: list[DeviceReport]
    seconds: float
    complete: bool  # every device generated everything and its buffer is empty
    rss_start_kib: int  # before any device was opened
    rss_peak_kib: int

    @property
    def generated(self) -> int:
        return sum(d.generated for d in self.devices)

    @property
    def acked(self) -> int:
        return sum(d.events_acked for d in self.devices)

    @property
    def backlog_events(self) -> int:
        return sum(d.backlog_events for d in self.devices)

    @property
    def batches_pending(self) -> int:
        return sum(d.batches_pending for d in self.devices)

    def as_dict(self) -> dict[str, Any]:
        n = max(1, len(self.devices))
        return {
            "devices": len(self.devices), "generated": self.generated, "acked": self.acked,
            "seconds": round(self.seconds, 3), "complete": self.complete,
            "events_per_s": round(self.acked / self.seconds, 1) if self.seconds > 0 else None,
            "rss_start_kib": self.rss_start_kib, "rss_peak_kib": self.rss_peak_kib,
            "rss_per_device_kib": round((self.rss_peak_kib - self.rss_start_kib) / n, 1),
            "backlog": {f"{d.store}/{d.device}": {"events": d.backlog_events, "batches": d.batches_pending}
                        for d in self.devices if d.backlog_events or d.batches_pending},
            "resent": sum(d.resent for d in self.devices),
            "acks_forged": sum(d.acks_forged for d in self.devices),
            "connects": sum(d.connects for d in self.devices),
        }  # fmt: skip


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB, from /proc/self/status (0 elsewhere)."""
    now = peak = 0
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
    except OSError:
        pass
    return now, peak


def _passthrough(r: Reading) -> Pending:
    """The simulator's privacy stage: its readings carry no identifiers or text, and must not."""
    if r.ids or r.text:
        raise ValueError("simulated readings carry no identifiers or free text")
    return Pending(r.ts, r.src, r.type, r.data)


def device_home(spec: FleetSpec, i: int) -> Path:
    """Device `i`'s folder: `state/`, `keys/` and (with the downlink) its config file `edge.yaml`."""
    _, store, device = spec.ids(i)
    return spec.state / store / device


def device_config(spec: FleetSpec, i: int) -> Config:
    """The edge config of device `i`: its identity, state and keys under `spec.state`, the uplink."""
    return Config.model_validate(device_config_data(spec, i))


def device_config_data(spec: FleetSpec, i: int) -> dict[str, Any]:
    """`device_config` as the YAML data of the device's config file."""
    tenant, store, device = spec.ids(i)
    home = spec.state / store / device
    auth: dict[str, str] = {}
    if spec.credentials is not None:
        user, password_file = spec.credentials[store]
        auth = {"username": user, "password_file": str(password_file)}
    return {
        "identity": {"tenant": tenant, "store": store, "device": device},
        "paths": {"state_dir": str(home / "state"), "keys_dir": str(home / "keys")},
        "buffer": {"synchronous": spec.synchronous},
        "uplink": {
            "broker": spec.broker, "prefix": spec.prefix, "cloud_public_key": spec.cloud_public_key,
            "window": spec.window, "ack_timeout": spec.ack_timeout,
            "reconnect": {"initial": spec.reconnect_initial, "max": spec.reconnect_max},
            **({"auth": auth} if auth else {}),
        },
        "downlink": {"enabled": spec.downlink},
    }  # fmt: skip


def write_device_config(spec: FleetSpec, i: int) -> Path:
    """Device `i`'s config file (rewritten each run, so a changed spec applies): its local layer."""
    path = device_home(spec, i) / "edge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(device_config_data(spec, i), sort_keys=False))
    return path


async def _no_drivers(_cfg: Config, _names: Collection[str]) -> None:
    """`Runtime.reconfigure_drivers` of a device without drivers: nothing to stop or start."""


class SimDownlink(Downlink):
    """The real downlink component of a simulated device; only a requested restart differs (no
    service manager restarts the process): `_restart` takes the desired state again through
    `boot_config`, as `edge run` does after exit 75, and offers the retained layers it ignored
    meanwhile again, as a reconnect would. `restarts` counts them."""

    def __init__(self, rt: Runtime, uplink: Uplink, config_path: str, boot: Boot, local: Config) -> None:
        self._local = local
        self._retained: dict[str, bytes] = {}  # desired topic -> its last payload (3 topics, small documents)
        self.restarts = 0
        rt.request_restart = self._restart
        rt.reconfigure_drivers = _no_drivers
        super().__init__(rt, uplink, config_path, boot)

    def _offer(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/desired") and len(payload) <= 256 * 1024:
            self._retained[topic] = payload
        super()._offer(topic, payload)

    def _restart(self) -> None:
        self._tasks.append(asyncio.create_task(self._restarted(), name="fleetsim:restart"))

    async def _restarted(self) -> None:
        rt = self._rt
        await self.desired.close()
        boot = await asyncio.to_thread(boot_config, self._config_path, self._local)
        for event, fields in boot.notes:
            log.warning(event, device=rt.cfg.identity.device, **fields)
        rt.cfg = boot.effective.cfg
        watch = Watch(self._unhealthy, rt.cfg.health.apply_grace, rt.clock.monotonic)
        self.desired = DesiredState(config_path=self._config_path, boot=boot, state_dir=rt.cfg.paths.state_dir,
                                    restart=self._restart, changed=self._report_now.set, watch=watch,
                                    live=rt.reconfigure_drivers)  # fmt: skip
        self.restarts += 1
        self._report_now.set()  # a restarted daemon reports on connect
        for topic, payload in list(self._retained.items()):  # what came while it was "down"
            super()._offer(topic, payload)
        await self.desired.watch_trial()


@dataclass(slots=True)
class SimDevice:
    """One simulated device: the real buffer, keys and uplink of an edge (see the module doc)."""

    cfg: Config
    rt: Runtime
    uplink: Uplink
    downlink: SimDownlink | None = None
    generated: int = 0
    target: int = 0  # events_acked at which its buffer should be empty
    generating: asyncio.Task[None] | None = field(default=None)

    @classmethod
    async def open(cls, cfg: Config, clock: Clock, keys_out: Path | None,
                   config_path: Path | None = None) -> SimDevice:  # fmt: skip
        """Open its keys (created on first use) and buffer; `keys_out`: register the key there too.
        `config_path` (the file `cfg` was written to): run the downlink too, with the persisted
        desired layers over that file (`boot_config`, as `edge run` does)."""
        keys = KeyStore(cfg.paths.keys_dir, clock)
        if not keys.exists():
            await asyncio.to_thread(keys.init)
        ident = cfg.identity
        if keys_out is not None:
            register_key(keys_out, (ident.tenant, ident.store, ident.device), keys.public_key().hex())
        local, boot = cfg, None
        if config_path is not None:
            boot = await asyncio.to_thread(boot_config, str(config_path), cfg)
            cfg = boot.effective.cfg
        buffer = await Buffer.open(cfg, clock, retention_every=3600.0)
        rt = Runtime(cfg, clock, keys, buffer, Pipeline((), _passthrough, buffer))
        dev = cls(cfg, rt, uplink_component(rt))
        rt.components.append(dev.uplink)  # `reported` shows its state
        try:
            if config_path is not None and boot is not None:
                sync = await asyncio.to_thread(ConsentSync, cfg.paths.state_dir, buffer)
                rt.consent_sync = sync
                await sync.resume()  # a purge an earlier run left pending
                # registered before the uplink's session starts, as the daemon's factory order does
                dev.downlink = SimDownlink(rt, dev.uplink, str(config_path), boot, local)
                rt.components.append(dev.downlink)
            stats = await buffer.stats()
        except BaseException:
            await dev.close()
            raise
        # what an earlier run left unacked goes out too
        dev.target = sum(b.events for b in stats.backlog.values()) + sum(b.n for b in await buffer.pending_batches())
        return dev

    async def start(self) -> None:
        """Start its uplink, then its downlink (if any): the daemon's component order."""
        await self.uplink.start()
        if self.downlink is not None:
            await self.downlink.start()

    @property
    def public_key(self) -> bytes:
        return self.rt.keys.public_key()

    @property
    def name(self) -> str:
        return f"{self.cfg.identity.store}/{self.cfg.identity.device}"

    async def generate(self, n: int, rate: float | None, clock: Clock) -> None:
        """Submit `n` synthetic readings through the pipeline, paced at `rate` events/s."""
        pipeline = self.rt.pipeline
        self.target += n
        step = n if rate is None else max(1, round(rate * TICK_S))
        start = clock.monotonic()
        i = 0
        while i < n:
            for _ in range(min(step, n - i)):
                await pipeline.submit(Reading("edge", "edge.sim", clock.wall_ms(), {"i": i}))
                i += 1
                self.generated += 1
            if rate is not None and i < n:
                due = start + i / rate
                await asyncio.sleep(max(0.0, due - clock.monotonic()))
        await self.rt.buffer.flush()

    async def drained(self) -> bool:
        """Generation finished and nothing left in the buffer (checked in SQLite)."""
        if self.generating is None or not self.generating.done():
            return False
        if self.uplink.counters["events_acked"] < self.target:
            return False
        s = await self.rt.buffer.stats()
        return s.batches_pending == 0 and all(b.events == 0 for b in s.backlog.values())

    async def report(self) -> DeviceReport:
        s = await self.rt.buffer.stats()
        c = self.uplink.counters
        return DeviceReport(
            store=self.cfg.identity.store, device=self.cfg.identity.device, generated=self.generated,
            events_acked=c["events_acked"], backlog_events=sum(b.events for b in s.backlog.values()),
            batches_pending=s.batches_pending, published=c["published"], resent=c["resent"],
            acks_forged=c["acks_forged"], connects=c["connects"],
        )  # fmt: skip

    async def close(self) -> None:
        if self.generating is not None and not self.generating.done():
            self.generating.cancel()
            await asyncio.gather(self.generating, return_exceptions=True)
        if self.downlink is not None:
            await self.downlink.stop()
        await self.uplink.stop()
        await self.rt.buffer.close()
        if self.rt.consent_sync is not None:
            self.rt.consent_sync.close()


class Fleet:
    """Runs a `FleetSpec` (see the module doc). `run()` returns the report; `devices` for tests."""

    def __init__(self, spec: FleetSpec, *, clock: Clock | None = None,
                 on_progress: Callable[[Fleet], None] | None = None) -> None:  # fmt: skip
        self.spec = spec
        self._clock = clock or SystemClock()
        self._on_progress = on_progress
        self.devices: list[SimDevice] = []

    def acked(self) -> int:
        return sum(d.uplink.counters["events_acked"] for d in self.devices)

    async def open(self) -> None:
        """Open every device and register its key (created on first use). `run()` does it if needed;
        call it first to register a new fleet's keys before the receiver starts."""
        if self.devices:
            return
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        keys_out = None if self.spec.registry_dsn is not None else self.spec.keys_dir
        if keys_out is not None:
            keys_out.mkdir(parents=True, exist_ok=True)

        async def one(i: int) -> SimDevice:
            async with gate:
                path = await asyncio.to_thread(write_device_config, self.spec, i) if self.spec.downlink else None
                return await SimDevice.open(device_config(self.spec, i), self._clock, keys_out, path)

        results = await asyncio.gather(*(one(i) for i in range(1, self.spec.devices + 1)),
                                       return_exceptions=True)  # fmt: skip
        self.devices = [r for r in results if isinstance(r, SimDevice)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed and self.spec.registry_dsn is not None:
            try:
                await asyncio.to_thread(self._register, self.spec.registry_dsn)
            except Exception as exc:
                failed.append(exc)
        if failed:
            await self.close()
            raise failed[0]

    def _register(self, dsn: str) -> None:
        """Every device's key in PostgreSQL's registry, on one connection (idempotent)."""
        import psycopg

        from cloud.db.registry import add_device

        with psycopg.connect(dsn) as conn:
            for d in self.devices:
                ident = d.cfg.identity
                add_device(conn, tenant=ident.tenant, store=ident.store, device=ident.device,
                           public_key=d.public_key)  # fmt: skip

    async def start(self) -> None:
        """Open (if not yet) and start every device's uplink (and downlink) without generating
        anything: a fleet that stays online until `close()` (e.g. for downlink benchmarks)."""
        await self.open()
        for d in self.devices:
            await d.start()

    def online(self) -> int:
        """Devices whose uplink session is up."""
        return sum(1 for d in self.devices if d.uplink.state == "online")

    async def close(self) -> None:
        """Stop every uplink and generator, close every buffer (what `run()` does at its end)."""
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)

    async def run(self, stop: asyncio.Event | None = None) -> FleetReport:
        """Open every device, start its uplink and generator, wait until drained (or timeout, or `stop`)."""
        spec = self.spec
        stop = stop or asyncio.Event()
        rss_start = rss_kib()[0]  # a fleet opened beforehand counts its buffers and keys in the start
        t0 = time.perf_counter()
        complete = False
        try:
            await self.open()
            log.info("fleet_opened", devices=len(self.devices), seconds=round(time.perf_counter() - t0, 2))
            for d in self.devices:
                d.generating = asyncio.create_task(d.generate(spec.events, spec.rate, self._clock),
                                                   name=f"fleetsim:{d.name}")  # fmt: skip
            if spec.offline_first:
                await asyncio.gather(*(d.generating for d in self.devices if d.generating is not None))
                log.info("fleet_buffered", events=sum(d.generated for d in self.devices))
            for d in self.devices:
                await d.start()
            deadline = time.perf_counter() + spec.timeout
            pending = list(self.devices)
            while pending and not stop.is_set() and time.perf_counter() < deadline:
                failed = [d for d in pending if d.generating is not None and d.generating.done()
                          and d.generating.exception() is not None]  # fmt: skip
                if failed and failed[0].generating is not None:
                    raise failed[0].generating.exception() or RuntimeError("generator failed")
                pending = [d for d in pending if not await d.drained()]
                if self._on_progress is not None:
                    self._on_progress(self)
                if pending:
                    await asyncio.sleep(DONE_POLL_S)
            complete = not pending
            seconds = time.perf_counter() - t0
            reports = [await d.report() for d in self.devices]
        finally:
            await self.close()
        return FleetReport(reports, seconds, complete, rss_start, rss_kib()[1])


def format_report(r: FleetReport) -> str:
    """The human summary `edge-cloud fleet-sim` prints."""
    d = r.as_dict()
    lines = [
        f"devices      {d['devices']}",
        f"generated    {d['generated']} events",
        f"acked        {d['acked']} events ({d['events_per_s']} events/s)",
        f"time         {d['seconds']} s",
        f"backlog      {r.backlog_events} events unsealed, {r.batches_pending} batches unacked, "
        f"on {len(d['backlog'])} device(s)",
        f"resent       {d['resent']} batches, {d['connects']} connects, {d['acks_forged']} forged acks refused",
        f"rss          {d['rss_start_kib']} KiB at start, {d['rss_peak_kib']} KiB peak "
        f"({d['rss_per_device_kib']} KiB per device)",
    ]
    for name, left in list(d["backlog"].items())[:20]:
        lines.append(f"  {name}: {left['events']} events unsealed, {left['batches']} batches unacked")
    lines.append("complete" if r.complete else "INCOMPLETE: not every event was acked in time")
    return "\n".join(lines)
