"""The driver seam: facades supervise their backend (degrade, back off, recover, never
crash), take a backend instance or class, choose and import backends lazily, and the
registry builds one driver per enabled device / POS link."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import Backoff, Driver, SimOptions
from drivers.ble import BleDriver
from drivers.nfc import NfcDriver
from drivers.nfc.config import NfcRule
from drivers.pos import PosDriver
from drivers.registry import build_drivers
from edge.clock import Clock, FakeClock
from edge.config import Ble, Config, Drivers, Identity, Nfc, PosLink
from edge.errors import DriverError
from edge.events import Ident, Reading

REPO = Path(__file__).resolve().parents[1]


class FakeSleep:
    """Advances the FakeClock instead of sleeping; records each delay and the driver state."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []
        self.driver: Driver | None = None
        self.states: list[str] = []
        self.block_after: int | None = None
        self.blocked = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.driver is not None:
            self.states.append(self.driver.state)
        self.clock.advance(seconds)
        if self.block_after is not None and len(self.delays) >= self.block_after:
            self.blocked.set()
            await asyncio.Event().wait()  # park here until the test cancels
        await asyncio.sleep(0)


def reading(n: int) -> Reading:
    return Reading(src="ble", type="ble.adv", ts=1_767_225_600_000 + n, data={"kind": "phone", "rssi": -60})


class FlakyBackend:
    """Fails `failures` times with the given exception, then yields `n` readings and ends."""

    name = "flaky"

    def __init__(self, failures: int, n: int = 3, exc: Exception | None = None) -> None:
        self.failures_left = failures
        self.n = n
        self.exc = exc or DriverError("adapter vanished", reason="adapter_gone", hint="replug the dongle")
        self.calls = 0
        self.closed = 0

    async def readings(self) -> AsyncIterator[Reading]:
        self.calls += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise self.exc
        for i in range(self.n):
            yield reading(i)

    async def aclose(self) -> None:
        self.closed += 1


async def test_driver_recovers_from_a_backend_that_fails_twice() -> None:
    """Two DriverErrors: degraded during backoff (~1 s, then ~2 s, injected sleep), then
    running again; errors and restarts counted, reason and hint logged, nothing lost after."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    backend = FlakyBackend(failures=2)
    driver = BleDriver(Ble(), clock, backend=backend, sleep=sleep, rng=random.Random(1))
    sleep.driver = driver
    assert driver.status()["state"] == "starting"
    got: list[Reading] = []
    states_while_reading: list[str] = []
    with capture_logs() as logs:
        async for r in driver.readings():
            got.append(r)
            states_while_reading.append(driver.status()["state"])
    assert [r.ts for r in got] == [reading(i).ts for i in range(3)]
    assert sleep.states == ["degraded", "degraded"]
    assert states_while_reading == ["running"] * 3
    assert 0.8 <= sleep.delays[0] <= 1.2
    assert 1.6 <= sleep.delays[1] <= 2.4
    st = driver.status()
    assert st["state"] == "stopped"  # the backend ended (a simulation's limit)
    assert (st["errors"], st["restarts"], st["readings"]) == (2, 2, 3)
    assert st["degraded_reason"] is None
    assert backend.calls == 3
    degraded = [e for e in logs if e["event"] == "driver_degraded"]
    assert len(degraded) == 2
    assert degraded[0]["reason"] == "adapter_gone"
    assert degraded[0]["hint"] == "replug the dongle"
    assert degraded[0]["driver"] == "ble"
    assert degraded[0]["retry_in_s"] == pytest.approx(sleep.delays[0], abs=0.001)
    assert any(e["event"] == "driver_recovered" for e in logs)


async def test_backoff_grows_exponentially_and_is_capped_at_30_s() -> None:
    """A device that never comes back: delays double from ~1 s, jittered, never above 30 s;
    the daemon keeps trying; cancelling stops the driver and releases the backend."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    sleep.block_after = 12
    backend = FlakyBackend(failures=10**9)
    driver = NfcDriver(Nfc(), clock, backend=backend, sleep=sleep, rng=random.Random(2))

    async def consume() -> None:
        async for _ in driver.readings():
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(sleep.blocked.wait(), 10)
    assert driver.state == "degraded"
    assert driver.degraded_reason == "adapter_gone"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    d = sleep.delays
    assert all(0 < x <= 30.0 for x in d)
    for i, x in enumerate(d[:5]):
        assert 0.8 * 2**i <= x <= 1.2 * 2**i
    assert all(x >= 24.0 for x in d[6:])
    assert driver.status()["state"] == "stopped"
    assert driver.counters.errors == 12
    assert backend.closed >= 12


async def test_backoff_starts_over_after_a_long_healthy_run() -> None:
    """A failure after the backend ran for longer than the cap retries after ~1 s again,
    while a device that flaps right after each restart keeps backing off."""
    clock = FakeClock()
    sleep = FakeSleep(clock)

    class Flapping:
        name = "flapping"

        def __init__(self) -> None:
            self.calls = 0

        async def readings(self) -> AsyncIterator[Reading]:
            self.calls += 1
            if self.calls in (1, 2, 4):
                raise OSError(19, "No such device")
            if self.calls == 3:
                yield reading(0)
                clock.advance(45.0)  # a long healthy run
                yield reading(1)
                raise OSError(19, "No such device")

        async def aclose(self) -> None:
            return None

    driver = PosDriver(PosLink(name="till-1"), clock, backend=Flapping(), sleep=sleep, rng=random.Random(3))
    with capture_logs() as logs:
        got = [r async for r in driver.readings()]
    assert len(got) == 2
    assert [round(x) for x in sleep.delays] == [1, 2, 1, 2]
    degraded = [e for e in logs if e["event"] == "driver_degraded"]
    assert {e["reason"] for e in degraded} == {"os_error"}
    assert degraded[0]["errno"] == "ENODEV"
    assert "dialout" in degraded[0]["hint"]
    assert driver.name == "pos:till-1"


async def test_unexpected_backend_exception_degrades_without_logging_its_message() -> None:
    """A backend bug (any exception) does not kill the daemon, and its message (which may
    quote a raw identifier) never reaches the logs: only the exception type does."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    raw_mac = "C3:5A:19:7E:42:D1"
    backend = FlakyBackend(failures=1, n=1, exc=ValueError(f"bad advertisement from {raw_mac}"))
    driver = BleDriver(Ble(), clock, backend=backend, sleep=sleep, rng=random.Random(4))
    with capture_logs() as logs:
        got = [r async for r in driver.readings()]
    assert len(got) == 1
    degraded = [e for e in logs if e["event"] == "driver_degraded"]
    assert degraded[0]["reason"] == "backend_bug"
    assert degraded[0]["error"] == "ValueError"
    assert raw_mac not in repr(logs)
    assert raw_mac.replace(":", "").lower() not in repr(logs).lower()


async def test_backend_with_open_reports_running_before_any_reading() -> None:
    """An opened backend is `running` even while nobody taps (no reading yet)."""
    clock = FakeClock()
    opened = asyncio.Event()

    class Quiet:
        name = "quiet"

        async def open(self) -> None:
            opened.set()

        async def readings(self) -> AsyncIterator[Reading]:
            await asyncio.Event().wait()
            yield reading(0)  # never reached

        async def aclose(self) -> None:
            return None

    driver = NfcDriver(Nfc(), clock, backend=Quiet())

    async def consume() -> None:
        async for _ in driver.readings():
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(opened.wait(), 5)
    await asyncio.sleep(0)
    assert driver.status()["state"] == "running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert driver.status()["state"] == "stopped"


async def test_facade_accepts_a_backend_class_and_calls_it_with_cfg_and_clock() -> None:
    """bleak-style: hand the facade a class; it is constructed as cls(cfg, clock)."""
    seen: list[tuple[Any, Any]] = []

    class Recording:
        name = "recording"

        def __init__(self, cfg: Ble, clock: Clock) -> None:
            seen.append((cfg, clock))

        async def readings(self) -> AsyncIterator[Reading]:
            yield reading(0)

        async def aclose(self) -> None:
            return None

    cfg, clock = Ble(adapter="hci1"), FakeClock()
    driver = BleDriver(cfg, clock, backend=Recording)
    assert seen == [(cfg, clock)]
    assert driver.status()["backend"] == "recording"
    assert [r.type async for r in driver.readings()] == ["ble.adv"]


def test_status_has_the_fields_edge_status_shows() -> None:
    """status() is a plain dict with name, kind, backend, state, reason and counters."""
    driver = BleDriver(Ble(), FakeClock(), backend=FlakyBackend(0))
    assert driver.status() == {
        "name": "ble",
        "kind": "ble",
        "backend": "flaky",
        "state": "starting",
        "degraded_reason": None,
        "last_reading_ts": None,
        "readings": 0,
        "errors": 0,
        "restarts": 0,
    }


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda c: BleDriver(Ble(backend="bleak"), c), "ble"),
        (lambda c: NfcDriver(Nfc(backend="nfcpy"), c), "nfc"),
        (lambda c: PosDriver(PosLink(name="till-1", backend="serial", port="/dev/ttyUSB0"), c), "pos"),
    ],
)
def test_choosing_a_real_backend_touches_no_device_until_the_driver_starts(make: Any, kind: str) -> None:
    """A real backend is built from config alone (no adapter, reader or port exists here)."""
    driver = make(FakeClock())
    status = driver.status()
    assert status["kind"] == kind
    assert status["state"] == "starting"
    assert status["backend"] != "sim"


def test_backoff_delay_without_jitter_is_exactly_exponential_and_capped() -> None:
    b = Backoff(jitter=0.0)
    rng = random.Random(0)
    assert [b.delay(i, rng) for i in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def first_reading(driver: Driver) -> Reading:
    async with contextlib.aclosing(driver.readings()) as it:
        async for r in it:
            return r
    raise AssertionError("no reading")


def _config(**drivers: Any) -> Config:
    return Config(
        identity=Identity(tenant="acme", store="s-001", device="edge-01"), drivers=Drivers(**drivers)
    )


def test_registry_builds_enabled_drivers_and_one_per_pos_link() -> None:
    clock = FakeClock()
    cfg = _config(pos=[PosLink(name="till-1"), PosLink(name="till-2")])
    assert [d.name for d in build_drivers(cfg, clock)] == ["ble", "nfc", "pos:till-1", "pos:till-2"]
    cfg = _config(ble=Ble(enabled=False), nfc=Nfc(enabled=False))
    assert build_drivers(cfg, clock) == []


async def test_registry_passes_injected_identifiers_to_every_simulation() -> None:
    """The leak test's entry point: build_drivers(..., sim=SimOptions(inject=...)) makes the
    first readings of each simulated device carry the injected raw identifiers."""
    clock = FakeClock()
    inject = (
        "C6:0F:3B:5E:12:A9",
        "04C0FFEE123456",
        "987654321098",
        "4000056655665556",
        "leak.probe@example.org",
        "+44 7700 900461",
    )
    club = NfcRule(name="club", kind="loyalty", uri_prefix="https://club.example/card/")
    cfg = _config(nfc=Nfc(rules=[club]), pos=[PosLink(name="till-7")])
    drivers = build_drivers(cfg, clock, sim=SimOptions(inject=inject, limit=1, sleep=FakeSleep(clock)))
    first = {d.name: await first_reading(d) for d in drivers}
    assert first["ble"].ids["device"] == Ident("ble_address", "C6:0F:3B:5E:12:A9")
    assert first["nfc"].ids["card"] == Ident("nfc_uid", "04C0FFEE123456")
    assert first["nfc"].ids["loyalty"] == Ident("loyalty_id", "987654321098")
    receipt = first["pos:till-7"].text["receipt"]
    for raw in inject[2:]:
        assert raw in receipt


def test_backends_are_imported_only_when_chosen() -> None:
    """Building sim drivers loads no device library (bleak, nfcpy, pyserial), and a facade
    handed a backend does not even import its simulation module."""
    script = """
import json, sys
from drivers.registry import build_drivers
from drivers.nfc import NfcDriver
from edge.clock import Clock, FakeClock
from edge.config import Config, Identity, Drivers, Nfc, PosLink
cfg = Config(identity=Identity(tenant="t", store="s", device="d"),
             drivers=Drivers(nfc=Nfc(enabled=False), pos=[PosLink(name="till-1")]))

class B:
    name = "handed"
    async def readings(self):
        yield None
    async def aclose(self):
        pass

NfcDriver(Nfc(), FakeClock(), backend=B())
before = {m: m in sys.modules for m in ("drivers.nfc.sim", "drivers.ble.sim", "drivers.pos.sim")}
build_drivers(cfg, FakeClock())
after = {m: m in sys.modules for m in ("drivers.nfc.sim", "drivers.ble.sim", "drivers.pos.sim",
                                       "bleak", "nfc", "serial")}
print(json.dumps({"before": before, "after": after}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["before"] == {"drivers.nfc.sim": False, "drivers.ble.sim": False, "drivers.pos.sim": False}
    assert out["after"] == {
        "drivers.nfc.sim": False,
        "drivers.ble.sim": True,
        "drivers.pos.sim": True,
        "bleak": False,
        "nfc": False,
        "serial": False,
    }
