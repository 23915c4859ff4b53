"""The real BLE backend: bleak's `BleakScanner` on BlueZ, scanning continuously.

    scanner callback -> bounded queue (oldest dropped, counted) -> BleProcessor -> Readings

Scanning: passive (a BlueZ advertisement monitor with or-patterns that match what phones
and beacons send) where bluetoothd supports it, else active discovery; `scan_mode` forces
one. The adapter is the configured one (`hci0`, ...), powered on when it is off
(`power_on`).

Resilience (see `watchdog.py` for the ladder): a scanner that has gone quiet is restarted,
then the adapter is powered off and on through BlueZ, then the backend raises
`DriverError("scanner_stalled")`: the facade shows `degraded` and retries with backoff, and
each retry first waits up to `watchdog.quiet` for an advertisement before it reports
running, so the state stays degraded (no crash loop, no power-cycle loop) until the radio
works again. A removed adapter (`InterfacesRemoved`), an adapter powered off by someone else
and bluetoothd going away end the scan with a `DriverError` naming the cause; the facade's
retries open it again once it is back. `org.bluez.Error.InProgress` on start is retried
after a pause (then one power cycle, which ends bluetoothd's stale discovery sessions);
`NotReady` powers the adapter on and retries.

Before such an error the open presence sessions are closed (`presence.exit`, reason
"stop") and every raw address is forgotten; `aclose()` forgets them too. Errors and logs
name the adapter and D-Bus error names, never a device address; bleak's and dbus-fast's
own loggers are kept at INFO or above (their DEBUG lines carry device paths). Any other
failure while scanning (OSError, EOFError, a dbus-fast error) becomes
`DriverError("bluez_error")` after the same flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import structlog
from bleak import BleakScanner
from bleak.args.bluez import OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakDBusError, BleakError

from drivers.base import Sleep
from drivers.ble.adapter import BluezAdapter, BluezCallError
from drivers.ble.config import Ble
from drivers.ble.processor import BleProcessor, tick_period
from drivers.ble.watchdog import Action, ScanWatchdog
from edge.clock import Clock
from edge.errors import DriverError
from edge.events import Reading

IN_PROGRESS = "org.bluez.Error.InProgress"
NOT_READY = "org.bluez.Error.NotReady"
START_ATTEMPTS = 3
CALL_TIMEOUT = 10.0
POWER_TIMEOUT = 10.0

# What passive scanning lets through (BlueZ needs at least one pattern): the LE flags
# values phones and beacons use, Apple manufacturer data and Eddystone service data.
PASSIVE_PATTERNS = [
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x06"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x1a"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x02"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x04"),
    OrPattern(0, AdvertisementDataType.FLAGS, b"\x18"),
    OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\x4c\x00"),
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xaa\xfe"),
]

_Advert = tuple[str, int, Mapping[int, bytes], Mapping[str, bytes], float, int]
_HINT_BLUEZ = "is bluetoothd running (`systemctl status bluetooth`) and may the service user use it over D-Bus?"
_HINT_RFKILL = "check `rfkill list` (blocked?) and `bluetoothctl show`"


def _quiet_library_logs() -> None:
    """bleak's and dbus-fast's DEBUG lines carry D-Bus device paths (/org/bluez/hci0/dev_AA_BB_...),
    device names and advertisement data: keep them at INFO or above even when debugging."""
    for name in ("bleak", "dbus_fast"):
        log = logging.getLogger(name)
        if log.getEffectiveLevel() < logging.INFO:
            log.setLevel(logging.INFO)


def _unexpected(what: str, exc: Exception) -> DriverError:
    """Any other failure (OSError, EOFError, a dbus-fast error) as a DriverError, so the open
    presence sessions are closed and the facade retries; the message names only the type."""
    err = DriverError(f"{what} ({type(exc).__name__})", reason="bluez_error", hint=_HINT_BLUEZ)
    err.__cause__ = exc
    return err


def _err_name(exc: BaseException) -> str:
    if isinstance(exc, BleakDBusError):
        return exc.dbus_error
    if isinstance(exc, BluezCallError):
        return exc.name
    return type(exc).__name__


class BleakBackend:
    name = "bleak"

    def __init__(self, cfg: Ble, clock: Clock, *, sleep: Sleep = asyncio.sleep) -> None:
        self.cfg = cfg
        self._clock = clock
        self._sleep = sleep
        self._log = structlog.get_logger("drivers.ble")
        _quiet_library_logs()
        now = clock.monotonic()
        self._proc = BleProcessor(cfg, now)
        self._dog = ScanWatchdog(cfg.watchdog, expect_always=bool(cfg.beacons.known))
        self._adverts: deque[_Advert] = deque(maxlen=cfg.queue_max)
        self._events: deque[tuple[str, bool]] = deque()
        self._wake = asyncio.Event()
        self._adapter: BluezAdapter | None = None
        self._scanner: BleakScanner | None = None
        self._mode: Literal["passive", "active"] | None = None
        self._passive_unavailable = False
        self._opened = False
        self._tick_s = tick_period(cfg)
        self.dropped = 0
        self.scanner_restarts = 0
        self.power_cycles = 0
        self.start_retries = 0

    # -- the seam -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to BlueZ, power the adapter if needed, start scanning. After the watchdog
        gave up, also wait up to `watchdog.quiet` for an advertisement (else: still stalled)."""
        await self.aclose()
        adapter = BluezAdapter(self.cfg.adapter, self._on_event, call_timeout=CALL_TIMEOUT)
        try:
            await adapter.connect()
        except Exception as exc:  # no bus, refused, timeout, auth: all "cannot reach BlueZ"
            raise DriverError(f"cannot reach the system D-Bus ({_err_name(exc)})", reason="bluez_unavailable",
                              hint=_HINT_BLUEZ) from exc
        self._adapter = adapter
        try:
            state = await adapter.state()
        except (BluezCallError, TimeoutError) as exc:
            raise DriverError(f"BlueZ did not answer ({_err_name(exc)})", reason="bluez_unavailable",
                              hint=_HINT_BLUEZ) from exc
        if state is None:
            raise DriverError(f"adapter {self.cfg.adapter} not found", reason="adapter_missing",
                              hint="plug the adapter in (`bluetoothctl list` shows them); the driver retries")
        if not state.get("Powered"):
            await self._power_on()
        await self._start_scanner()
        now = self._clock.monotonic()
        self._dog.started(now)
        self._proc.resume(now)
        self._opened = True
        if self._dog.exhausted:
            await self._probation()

    async def readings(self) -> AsyncIterator[Reading]:
        if not self._opened:
            await self.open()
        proc, dog, q, clock = self._proc, self._dog, self._adverts, self._clock
        next_tick = clock.monotonic() + self._tick_s
        while True:
            n = 0
            while q:
                address, rssi, mfr, svc, t, wall = q.popleft()
                if level := dog.advert(t):
                    self._log.info("ble_scanner_recovered", adapter=self.cfg.adapter, level=level)
                for r in proc.advert(address, rssi, mfr, svc, t, wall):
                    yield r
                n += 1
                if n >= 1024:  # let the loop breathe during a burst
                    n = 0
                    await asyncio.sleep(0)
            err: DriverError | None = None
            if self._events:
                err = await self._check_events()
            if err is None and clock.monotonic() >= next_tick:
                ticked, err = await self._tick()
                for r in ticked:
                    yield r
                next_tick = clock.monotonic() + self._tick_s
            if err is not None:
                for r in proc.flush(clock.monotonic(), clock.wall_ms()):
                    yield r
                raise err
            if not q and not self._events:
                await self._wait(next_tick)

    async def _wait(self, until: float) -> None:
        """Sleep until `until` (monotonic) or until an advertisement or adapter event arrives."""
        wait = until - self._clock.monotonic()
        if wait > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _tick(self) -> tuple[list[Reading], DriverError | None]:
        """Presence exits, occupancy, beacon.missing; then the watchdog's next action, if due."""
        dog, now = self._dog, self._clock.monotonic()
        out = self._proc.tick(now, self._clock.wall_ms(), scanner_ok=dog.listening(now))
        action = dog.due(now)
        if action is not None:
            try:
                await self._act(action)
            except DriverError as exc:
                return out, exc
            except Exception as exc:  # a dropped bus mid power cycle, ...: close sessions, then retry
                return out, _unexpected(f"watchdog {action} on {self.cfg.adapter} failed", exc)
        return out, None

    async def aclose(self) -> None:
        """Stop scanning, drop the D-Bus link, forget every address. Safe to call again."""
        self._opened = False
        await self._stop_scanner()
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            await adapter.close()
        self._adverts.clear()
        self._events.clear()
        self._proc.forget()

    def stats(self) -> dict[str, Any]:
        """Counters for `edge status` (no identifiers)."""
        return {
            "adapter": self.cfg.adapter,
            "scan_mode": self._mode,
            "queue_dropped": self.dropped,
            "scanner_restarts": self.scanner_restarts,
            "power_cycles": self.power_cycles,
            "start_retries": self.start_retries,
            "watchdog_level": self._dog.level,
            **self._proc.stats(),
        }

    # -- callbacks (on the event loop) ------------------------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        q = self._adverts
        if len(q) == q.maxlen:
            self.dropped += 1  # the deque drops the oldest
        q.append((device.address, adv.rssi, adv.manufacturer_data, adv.service_data,
                  self._clock.monotonic(), self._clock.wall_ms()))
        self._wake.set()

    def _on_event(self, kind: str, value: bool) -> None:
        self._events.append((kind, value))
        self._wake.set()

    # -- scanner --------------------------------------------------------------------------------

    def _scan_mode(self) -> Literal["passive", "active"]:
        mode = self.cfg.scan_mode
        if mode == "active" or (mode == "auto" and self._passive_unavailable):
            return "active"
        return "passive"

    def _new_scanner(self, mode: Literal["passive", "active"]) -> BleakScanner:
        if mode == "passive":
            return BleakScanner(self._on_advert, scanning_mode="passive",
                                bluez={"adapter": self.cfg.adapter, "or_patterns": list(PASSIVE_PATTERNS)})
        return BleakScanner(self._on_advert, scanning_mode="active", bluez={"adapter": self.cfg.adapter})

    async def _start_scanner(self) -> None:
        adapter = self.cfg.adapter
        attempts = 0
        cycled = False
        while True:
            mode = self._scan_mode()
            scanner = self._new_scanner(mode)
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    await scanner.start()
            except BleakDBusError as exc:
                name = exc.dbus_error
                attempts += 1
                if name in (IN_PROGRESS, NOT_READY) and attempts < START_ATTEMPTS:
                    self.start_retries += 1
                    self._log.warning("ble_start_retry", adapter=adapter, error=name, attempt=attempts)
                    if name == NOT_READY:
                        await self._power_on()
                    else:
                        await self._sleep(0.5 * attempts)
                    continue
                if name == IN_PROGRESS and not cycled and self._adapter is not None:
                    # bluetoothd still holds a discovery session for us: powering off ends it
                    cycled, attempts = True, 0
                    self._log.warning("ble_start_power_cycle", adapter=adapter, error=name)
                    await self._cycle_power()
                    continue
                reason = {IN_PROGRESS: "bluez_busy", NOT_READY: "adapter_not_ready"}.get(name, "bluez_error")
                raise DriverError(f"BlueZ refused to start scanning on {adapter} ({name})", reason=reason,
                                  hint=_HINT_RFKILL if name == NOT_READY else _HINT_BLUEZ) from exc
            except BleakBluetoothNotAvailableError as exc:
                raise DriverError("Bluetooth is not available", reason="bluetooth_unavailable",
                                  hint=_HINT_RFKILL) from exc
            except BleakError as exc:
                text = str(exc)  # bleak's own messages (adapter name, BlueZ version), no device
                if mode == "passive" and "requires BlueZ" in text:
                    if self.cfg.scan_mode == "auto":
                        self._passive_unavailable = True
                        self._log.info("ble_passive_unavailable", adapter=adapter, fallback="active")
                        continue
                    raise DriverError("BlueZ does not support passive scanning", reason="passive_unsupported",
                                      hint="run bluetoothd with --experimental (BlueZ >= 5.56, kernel >= 5.10)"
                                      " or set drivers.ble.scan_mode: active") from exc
                if "not found" in text:
                    raise DriverError(f"adapter {adapter} not found", reason="adapter_missing",
                                      hint="plug the adapter in (`bluetoothctl list`); the driver retries") from exc
                raise DriverError(f"bleak could not start scanning ({type(exc).__name__})", reason="bluez_error",
                                  hint=_HINT_BLUEZ) from exc
            except OSError as exc:  # the bus went away, or a call timed out
                raise DriverError(f"cannot reach BlueZ ({_err_name(exc)})", reason="bluez_unavailable",
                                  hint=_HINT_BLUEZ) from exc
            self._scanner, self._mode = scanner, mode
            self._log.info("ble_scanning", adapter=adapter, mode=mode)
            return

    async def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is None:
            return
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await scanner.stop()
        except Exception as exc:  # a scanner on a vanished adapter cannot stop cleanly; it is gone anyway
            self._log.warning("ble_scanner_stop_failed", adapter=self.cfg.adapter, error=_err_name(exc))

    # -- adapter --------------------------------------------------------------------------------

    def _require_adapter(self) -> BluezAdapter:
        if self._adapter is None:
            raise DriverError("not connected to BlueZ", reason="bluez_unavailable", hint=_HINT_BLUEZ)
        return self._adapter

    async def _power_on(self) -> None:
        name = self.cfg.adapter
        if not self.cfg.power_on:
            raise DriverError(f"adapter {name} is powered off", reason="adapter_off",
                              hint="power it on (`bluetoothctl power on`) or set drivers.ble.power_on: true")
        try:
            ok = await self._require_adapter().power(True, POWER_TIMEOUT)
        except (BluezCallError, TimeoutError) as exc:
            raise DriverError(f"adapter {name} could not be powered on ({_err_name(exc)})", reason="adapter_off",
                              hint=_HINT_RFKILL) from exc
        if not ok:
            raise DriverError(f"adapter {name} did not power on", reason="adapter_off", hint=_HINT_RFKILL)
        self._log.info("ble_adapter_powered_on", adapter=name)
        await self._sleep(self.cfg.watchdog.settle)

    async def _cycle_power(self) -> None:
        name = self.cfg.adapter
        self.power_cycles += 1
        await self._stop_scanner()
        adapter = self._require_adapter()
        try:
            ok = await adapter.power(False, POWER_TIMEOUT) and await adapter.power(True, POWER_TIMEOUT)
        except (BluezCallError, TimeoutError) as exc:
            raise DriverError(f"power cycling adapter {name} failed ({_err_name(exc)})", reason="power_cycle_failed",
                              hint=_HINT_RFKILL) from exc
        if not ok:
            raise DriverError(f"adapter {name} did not follow power off/on", reason="power_cycle_failed",
                              hint=_HINT_RFKILL)
        await self._sleep(self.cfg.watchdog.settle)

    async def _act(self, action: Action) -> None:
        name, dog = self.cfg.adapter, self._dog
        quiet_s = round(dog.quiet, 3)
        if action == "give_up":
            self._log.error("ble_scanner_stalled", adapter=name, quiet_s=quiet_s,
                            restarts=self.cfg.watchdog.restarts, power_cycles=self.cfg.watchdog.power_cycles)
            raise DriverError(
                f"no advertisements on {name} for {quiet_s}s after {self.cfg.watchdog.restarts} scanner restart(s)"
                f" and {self.cfg.watchdog.power_cycles} power cycle(s)",
                reason="scanner_stalled",
                hint="check the adapter (`btmgmt info`, `dmesg | grep -i blue`), replug it or restart bluetoothd;"
                     " the driver keeps retrying",
            )
        if action == "restart":
            self.scanner_restarts += 1
            self._log.warning("ble_scanner_restart", adapter=name, quiet_s=quiet_s, level=dog.level)
            await self._stop_scanner()
            await self._start_scanner()
        else:
            self._log.warning("ble_adapter_power_cycle", adapter=name, quiet_s=quiet_s, level=dog.level)
            await self._cycle_power()
            await self._start_scanner()
        now = self._clock.monotonic()
        dog.started(now)
        self._proc.resume(now)

    async def _check_events(self) -> DriverError | None:
        try:
            return await self._check_events_raw()
        except DriverError as exc:
            return exc
        except Exception as exc:  # see _tick
            return _unexpected(f"checking adapter {self.cfg.adapter} failed", exc)

    async def _check_events_raw(self) -> DriverError | None:
        name = self.cfg.adapter
        while self._events:
            kind, value = self._events.popleft()
            if kind == "removed":
                self._log.warning("ble_adapter_removed", adapter=name)
                return DriverError(f"adapter {name} was removed", reason="adapter_removed",
                                   hint="it was unplugged or reset; the driver retries until it is back"
                                        " (`bluetoothctl list`)")
            if kind in ("bluez_lost", "bus_lost"):
                self._log.warning("ble_bluez_lost", adapter=name, cause=kind)
                return DriverError("lost BlueZ on the system D-Bus", reason="bluez_lost",
                                   hint="bluetoothd stopped or restarted (`systemctl status bluetooth`);"
                                        " the driver retries")
            if kind == "powered" and not value:
                try:
                    off = not await self._require_adapter().powered()
                except (BluezCallError, TimeoutError):
                    off = True
                if off:  # not our own power cycle (that one is back on by now)
                    self._log.warning("ble_adapter_powered_off", adapter=name)
                    return DriverError(f"adapter {name} was powered off", reason="adapter_off",
                                       hint="something powered it off (bluetoothctl, rfkill); "
                                            + ("the driver powers it on again" if self.cfg.power_on
                                               else "power it on or set drivers.ble.power_on: true"))
        return None

    async def _probation(self) -> None:
        """After the watchdog gave up: running again only once an advertisement arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dog.quiet
        while not self._adverts:
            err = await self._check_events() if self._events else None
            if err is not None:
                raise err
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DriverError(
                    f"still no advertisements on {self.cfg.adapter} after restarting the scanner",
                    reason="scanner_stalled",
                    hint="check the adapter (`btmgmt info`, `dmesg | grep -i blue`), replug it or restart"
                         " bluetoothd; the driver keeps retrying",
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
