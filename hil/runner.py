"""Run one scenario: the real daemon, a real Mosquitto, the reference receiver, the peers.

    broker up -> keys (`edge keys init`) -> receiver + wire capture -> peers -> `edge run`
    -> timeline (stimuli through the peers, faults from outside) -> peers quiet
    -> SIGTERM (must stop cleanly) -> a drain life (`edge run` without drivers) until the
    buffer is empty -> everything stopped -> analysis (hil.checks) -> RunResult

The drain life is how the rig ends a run without losing what the daemon still holds: the
stand-ins' simulations cannot be told to stop, and the main life's uplink stops before its
last commits. Nothing about the daemon is special-cased: the same state dir, the same keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.config import ReceiverConfig
from cloud.identity import register_key
from cloud.receiver import ReceiverStats
from edge.buffer.stats import count_events
from edge.errors import BufferError_
from hil.adapters import Rig, choose
from hil.daemon import Daemon, DaemonError, Life, run_cli
from hil.faults import Disk, Uplink, corrupt_database
from hil.observe import ReceiverHost, Sample, Sampler, WireCapture
from hil.peer import APPLIED, Outcome, StimulusPeer
from hil.peers.mosquitto import Mosquitto, free_port
from hil.scenario import (
    KINDS,
    DbCorrupt,
    DiskFill,
    DiskFree,
    Kind,
    PowerCut,
    Scenario,
    Step,
    UplinkDown,
    UplinkFlap,
    UplinkUp,
    step_kind,
)

Target = Literal["sim", "hw"]
TENANT, STORE, DEVICE = "hil", "rig-001", "edge-hil"
PREFIX = "edge/v1"
SQUEEZE_BYTES = 1024 * 1024  # buffer.max_bytes when no tmpfs can be mounted
WindowKind = Literal["outage", "power", "disk", "stop"]


@dataclass(slots=True, frozen=True)
class Window:
    """A stretch of the run during which a fault was in force (wall clock ms)."""

    kind: WindowKind
    start_ms: int
    end_ms: int


@dataclass(slots=True, frozen=True)
class StepRecord:
    at: float  # scheduled, seconds from t0
    t: float  # when it ran
    do: str
    kind: str | None
    outcome: Outcome


@dataclass(slots=True)
class RunData:
    """Everything the analysis needs; `hil.checks` turns it into verdicts."""

    scenario: Scenario
    target: Target
    workdir: Path
    t0_ms: int = 0
    peers: dict[str, StimulusPeer] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    lives: list[Life] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    receiver: ReceiverStats = field(default_factory=ReceiverStats)
    wire_batches: int = 0
    final_backlog: int | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the run itself went wrong
    skipped: str | None = None  # the whole scenario could not run here (hardware absent)
    scan_paths: list[Path] = field(default_factory=list)

    @property
    def events_path(self) -> Path:
        return self.workdir / "receiver" / "events.jsonl"


def expand(scenario: Scenario) -> list[Step]:
    """The timeline with `uplink.flap` unrolled into downs and ups, in time order."""
    out: list[Step] = []
    for s in scenario.steps():
        if isinstance(s, UplinkFlap):
            t = s.at
            while t < s.until:
                out.append(UplinkDown(at=t, do="uplink.down", how=s.how))
                out.append(UplinkUp(at=min(t + s.down, s.until), do="uplink.up"))
                t += s.period
        else:
            out.append(s)
    return sorted(out, key=lambda s: s.at)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class Run:
    """One scenario run; use `await Run(...).execute()`."""

    def __init__(
        self, scenario: Scenario, target: Target, workdir: Path, *, rig: Rig | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.sc = scenario
        self.data = RunData(scenario, target, workdir)
        self.rig = rig or Rig()
        self._say = progress or (lambda _msg: None)
        self.dirs = {k: workdir / k for k in ("device", "keys", "receiver", "broker", "wire", "logs", "config")}
        self.daemon = Daemon(self.dirs["logs"])
        self._disk: Disk | None = None
        self._squeezed = False
        self._uplink: Uplink | None = None
        self._down_since: dict[WindowKind, int] = {}
        self._cloud_pub = ""
        self._url = "mqtt://127.0.0.1:1883"
        self._tasks: list[asyncio.Task[None]] = []
        self._receiver: ReceiverHost | None = None
        self._capture: WireCapture | None = None
        self._used: set[Kind] = set()
        self._active: set[Kind] = set()

    # ------------------------------------------------------------------ the run

    async def execute(self) -> RunData:
        d = self.data
        for p in self.dirs.values():
            p.mkdir(parents=True, exist_ok=True)
        missing = self._choose_peers()
        if d.skipped is not None:
            return d
        broker = Mosquitto(self.dirs["broker"])
        stop = asyncio.Event()
        try:
            main_cfg = await self._bring_up(broker, stop, missing)
            await self._timeline(time.monotonic(), missing, main_cfg)
            await self._finish()
        except (DaemonError, OSError, TimeoutError) as exc:
            d.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            await self._tear_down(broker, stop)
        d.scan_paths = [self.dirs[k] for k in ("device", "logs", "receiver", "wire", "broker")]
        return d

    def _choose_peers(self) -> dict[Kind, str]:
        """A peer per kind; the kinds whose peer cannot run here (and the whole run skipped
        on `hw` when none of the needed kinds can)."""
        d = self.data
        for kind in KINDS:
            d.peers[kind] = choose(kind, d.target, self.sc, self.rig, self.dirs["config"])
        self._used = {k for k in KINDS if self.sc.of_kind(k)}
        missing = {k: r for k in sorted(self._used) if (r := d.peers[k].unavailable()) is not None}
        if d.target == "hw" and missing and missing.keys() == self._used:
            d.skipped = "; ".join(f"{k}: {r}" for k, r in sorted(missing.items()))
        d.notes += [f"{k} unavailable: {r}" for k, r in sorted(missing.items())]
        return missing

    async def _bring_up(self, broker: Mosquitto, stop: asyncio.Event, missing: Mapping[Kind, str]) -> Path:
        """Disk, broker, keys, receiver, wire capture, peers, then the daemon's first life."""
        d = self.data
        self._prepare_disk()
        broker.start()
        self._uplink = Uplink(broker)
        self._keys(broker.url)
        self._receiver = receiver = ReceiverHost(self._receiver_config(broker.url))
        receiver.start()
        self._capture = capture = WireCapture(broker.url, PREFIX, self.dirs["wire"])
        self._tasks.append(asyncio.create_task(capture.run(stop), name="hil:capture"))
        await asyncio.wait_for(asyncio.gather(receiver.ready.wait(), capture.ready.wait()), 20)
        for kind in sorted(self._used - missing.keys()):
            await d.peers[kind].start()
            self.daemon.env.update(d.peers[kind].daemon_env())
        self._active = self._used - missing.keys()
        main_cfg = self._write_config("device.yaml", drivers=True)
        self._say("starting the daemon")
        await self.daemon.start(main_cfg)
        d.t0_ms = int(time.time() * 1000)
        sampler = Sampler(self.dirs["device"] / "buffer.db", self.dirs["device"] / "runtime.json",
                          lambda: receiver.events, lambda: self.daemon.running)  # fmt: skip
        d.samples = sampler.samples
        self._tasks.append(asyncio.create_task(sampler.run(stop), name="hil:sampler"))
        return main_cfg

    async def _tear_down(self, broker: Mosquitto, stop: asyncio.Event) -> None:
        d = self.data
        with contextlib.suppress(Exception):
            await self.daemon.kill()
        await asyncio.sleep(0.5)  # the receiver's last acks, the capture's last messages
        stop.set()
        if self._receiver is not None:
            await self._receiver.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for kind in sorted(self._active):
            with contextlib.suppress(Exception):
                await d.peers[kind].stop()
        broker.stop()
        if self._receiver is not None:
            d.receiver = self._receiver.stats()
        if self._capture is not None:
            d.wire_batches = self._capture.batches
        d.lives = list(self.daemon.lives)
        self._release_disk()

    async def _timeline(self, t0: float, missing: Mapping[Kind, str], cfg: Path) -> None:
        """Faults run in line; stimuli run as tasks (a tap takes a second on its reader, a
        line may block): a slow peer never delays the clock of the scenario."""
        d = self.data
        stimuli: list[asyncio.Task[None]] = []
        for step in expand(self.sc):
            await asyncio.sleep(max(0.0, t0 + step.at - time.monotonic()))
            if (died := self.daemon.check_alive()) is not None:
                d.problems.append(died)
                await self.daemon.start(cfg)
            kind = step_kind(step)
            if kind is not None and kind in missing:
                self._record(t0, step, kind, Outcome("unsupported", missing[kind]))
            elif kind is not None:
                stimuli.append(asyncio.create_task(self._stimulus(t0, step, kind), name=f"hil:{step.do}"))
            else:
                self._record(t0, step, None, await self._fault(step, cfg))
        await asyncio.sleep(max(0.0, t0 + self.sc.duration - time.monotonic()))
        late = [t for t in stimuli if not t.done()]
        if late:
            d.notes.append(f"{len(late)} stimuli still playing at the end: cancelled")
        for t in late:
            t.cancel()
        await asyncio.gather(*stimuli, return_exceptions=True)
        if (died := self.daemon.check_alive()) is not None:
            d.problems.append(died)
            await self.daemon.start(cfg)

    async def _stimulus(self, t0: float, step: Step, kind: Kind) -> None:
        try:
            outcome = await self.data.peers[kind].apply(step)
        except asyncio.CancelledError:
            self._record(t0, step, kind, Outcome("unsupported", "still waiting for its peer at the end"))
            raise
        self._record(t0, step, kind, outcome)

    def _record(self, t0: float, step: Step, kind: Kind | None, outcome: Outcome) -> None:
        self.data.steps.append(StepRecord(step.at, round(time.monotonic() - t0, 3), step.do, kind, outcome))
        self._say(f"{time.monotonic() - t0:6.1f}s  {step.do}: {outcome.applied}")

    async def _fault(self, step: Step, cfg: Path) -> Outcome:
        up = self._uplink
        assert up is not None
        if isinstance(step, UplinkDown):
            up.cut(step.how)
            self._open_window("outage")
        elif isinstance(step, UplinkUp):
            up.restore()
            self._close_window("outage")
            if self._receiver is not None:
                await self._receiver.kick()
        elif isinstance(step, PowerCut | DbCorrupt):
            self._open_window("power")
            await self.daemon.kill()
            note = ""
            if isinstance(step, DbCorrupt):
                note = await asyncio.to_thread(
                    corrupt_database, self.dirs["device"] / "buffer.db", step.how, step.pages)
            await asyncio.sleep(step.down_for)
            await self.daemon.start(cfg)
            self._close_window("power")
            return Outcome("applied", note)
        elif isinstance(step, DiskFill):
            if self._disk is None or not self._disk.mounted:
                return Outcome("approximated", f"no tmpfs; buffer.max_bytes squeezed to {SQUEEZE_BYTES} instead")
            size = await asyncio.to_thread(self._disk.fill, step.leave)
            self._open_window("disk")
            return Outcome("applied", f"ballast {size} bytes, {self._disk.free_bytes()} free")
        elif isinstance(step, DiskFree):
            if self._disk is not None and self._disk.mounted:
                self._disk.free()
            self._close_window("disk")
        else:
            return Outcome("unsupported", f"no handler for {step.do}")
        return APPLIED

    async def _finish(self) -> None:
        """Stimuli stop, faults end, SIGTERM, then the drain life until the buffer is empty."""
        d = self.data
        for kind in sorted(self._active):
            await d.peers[kind].quiesce()
        if self._uplink is not None and self._uplink.down:
            self._uplink.restore()
            self._close_window("outage")
            if self._receiver is not None:
                await self._receiver.kick()
            d.notes.append("the uplink was still down at the end: restored before stopping")
        if self._disk is not None and self._disk.mounted:
            self._disk.free()
            self._close_window("disk")
        await asyncio.sleep(1.0)
        self._open_window("stop")
        drain = float(self.sc.device.get("health", {}).get("drain_timeout", 10.0)) if isinstance(
            self.sc.device.get("health"), dict) else 10.0
        self._say("SIGTERM")
        await self.daemon.terminate(drain + 15.0)
        self._say("drain life")
        await self.daemon.start(self._write_config("device-drain.yaml", drivers=False))
        self._close_window("stop")
        deadline = time.monotonic() + self.sc.drain_timeout
        backlog: int | None = None
        while time.monotonic() < deadline:
            backlog = await asyncio.to_thread(self._backlog)
            if backlog == 0:
                break
            await asyncio.sleep(0.25)
        d.final_backlog = backlog
        await self.daemon.terminate(drain + 15.0)

    # ------------------------------------------------------------------ pieces

    def _open_window(self, kind: WindowKind) -> None:
        self._down_since.setdefault(kind, int(time.time() * 1000))

    def _close_window(self, kind: WindowKind) -> None:
        start = self._down_since.pop(kind, None)
        if start is not None:
            self.data.windows.append(Window(kind, start, int(time.time() * 1000)))

    def _backlog(self) -> int | None:
        try:
            return count_events(self.dirs["device"] / "buffer.db")
        except (BufferError_, OSError):
            return None

    def _prepare_disk(self) -> None:
        if self.sc.tmpfs is None:
            return
        self._disk = Disk(self.dirs["device"], self.sc.tmpfs)
        if not self._disk.mount():
            self._squeezed = True
            self.data.notes.append(f"disk: {self._disk.problem}; buffer.max_bytes squeezed to 1MiB instead")
        else:
            self.data.notes.append(f"disk: state dir on a tmpfs of {self.sc.tmpfs} bytes")

    def _release_disk(self) -> None:
        if self._disk is None or not self._disk.mounted:
            return
        keep = self.data.workdir / "device-final"  # the tmpfs goes away: keep what it held
        with contextlib.suppress(OSError):
            shutil.copytree(self.dirs["device"], keep, ignore=shutil.ignore_patterns(".hil-ballast"))
        self._disk.unmount()
        with contextlib.suppress(OSError):
            self.dirs["device"].rmdir()
            keep.rename(self.dirs["device"])

    def _keys(self, url: str) -> None:
        self._url = url
        cloud = Ed25519PrivateKey.generate()
        key_file = self.dirs["receiver"] / "cloud.key"
        key_file.write_text(cloud.private_bytes_raw().hex())
        key_file.chmod(0o600)
        self._cloud_pub = cloud.public_key().public_bytes_raw().hex()
        cfg = self._write_config("device.yaml", drivers=True)
        run_cli("keys", "init", "--config", str(cfg))
        pub = json.loads(run_cli("keys", "show", "--json", "--config", str(cfg)))["public_key"]
        (self.dirs["receiver"] / "keys").mkdir(exist_ok=True)
        register_key(self.dirs["receiver"] / "keys", (TENANT, STORE, DEVICE), pub)

    def _receiver_config(self, url: str) -> ReceiverConfig:
        r = self.dirs["receiver"]
        return ReceiverConfig(broker=url, client_id="hil-receiver", shared_group="hil", keys_dir=r / "keys",
                              db=r / "receiver.db", out=r / "events.jsonl", cloud_key=r / "cloud.key")  # fmt: skip

    def device_config(self, *, drivers: bool) -> dict[str, Any]:
        base: dict[str, Any] = {
            "identity": {"tenant": TENANT, "store": STORE, "device": DEVICE},
            "paths": {"state_dir": str(self.dirs["device"]), "keys_dir": str(self.dirs["keys"])},
            "buffer": {"commit_interval": "20ms"},
            "uplink": {
                "broker": self._url, "prefix": PREFIX,
                "cloud_public_key": self._cloud_pub or None, "window": 8,
                "batch": {"max_events": 200, "linger": "100ms"}, "ack_timeout": "3s",
                "reconnect": {"initial": "200ms", "max": "2s"}, "keepalive": "5s",
            },
            "health": {"listen": f"127.0.0.1:{free_port()}", "drain_timeout": "10s"},
            "logging": {"level": "info", "format": "json"},
        }  # fmt: skip
        if self._squeezed:
            base["buffer"]["max_bytes"] = SQUEEZE_BYTES
        merged = deep_merge(base, self.sc.device)
        off: dict[str, Any] = {"ble": {"enabled": False}, "nfc": {"enabled": False}, "pos": []}
        merged["drivers"] = {k: self.data.peers[k].driver_config() if drivers and k in self._active else off[k]
                             for k in KINDS}  # fmt: skip
        return merged

    def _write_config(self, name: str, *, drivers: bool) -> Path:
        path = self.dirs["config"] / name
        path.write_text(json.dumps(self.device_config(drivers=drivers), indent=2) + "\n")
        return path
