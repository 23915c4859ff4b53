"""The driver seam: the `Backend` protocol, the `Driver` facade base that supervises a
backend, and the small toolkit the simulated backends share.

A facade (`BleDriver`, `NfcDriver`, `PosDriver`) owns one backend, chosen at run time by
`cfg.backend` and imported only when chosen, or handed in (an instance, or a class /
factory called as `factory(cfg, clock)`), so tests and later real backends slot in
without touching the facade. The facade turns device failures into a `degraded` state and
a capped, jittered, exponential retry; it never lets a failing device stop the daemon.

Privacy: a backend's `DriverError` messages and hints must not contain raw identifiers
(they are logged). Other exceptions are logged by type name only.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import math
import random
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import structlog

from edge.clock import Clock
from edge.errors import DriverError
from edge.events import IDENT_CLASSES, IdentClass, Reading
from edge.privacy.cards import gtin_check_digit, gtin_ok, is_card_number, luhn_ok

if TYPE_CHECKING:
    from drivers.ble.adverts import AdvertSource

Sleep = Callable[[float], Awaitable[None]]
DriverState = Literal["starting", "running", "degraded", "stopped"]
DriverKind = Literal["ble", "nfc", "pos"]
CfgT = TypeVar("CfgT")


class Backend(Protocol):
    """One way of talking to one device kind (a real library, or a simulation).

    `readings()` is an async generator that opens the device if needed, yields readings
    until cancelled or the device fails, and raises `DriverError` (or `OSError`) on device
    failure. After a failure the facade calls `aclose()` and later `readings()` again: a
    backend must support being restarted that way. Returning normally means "no more
    readings, ever" (e.g. a simulation's `limit`).
    """

    name: str

    def readings(self) -> AsyncIterator[Reading]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Opens(Protocol):
    """Optional: a backend with `open()` is opened before each `readings()` call, and the
    driver reports `running` as soon as it returns (instead of at the first reading, which
    for an NFC reader nobody taps may be a long time)."""

    async def open(self) -> None: ...


BackendFactory = Callable[[CfgT, Clock], Backend]


def resolve_backend(
    backend: Backend | BackendFactory[CfgT],
    cfg: CfgT,
    clock: Clock,
) -> Backend:
    """An instance is used as is; a class or factory is called as `backend(cfg, clock)`."""
    if isinstance(backend, type) or not hasattr(backend, "readings"):
        return cast("BackendFactory[CfgT]", backend)(cfg, clock)
    return cast(Backend, backend)  # an instance: it has `readings`


@dataclass(slots=True, frozen=True)
class Backoff:
    """Capped exponential backoff with +/- `jitter` (fraction) around each step."""

    initial: float = 1.0
    max: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max, self.initial * self.factor ** min(attempt, 64))
        return min(self.max, base * (1.0 + self.jitter * rng.uniform(-1.0, 1.0)))


@dataclass(slots=True)
class DriverCounters:
    readings: int = 0
    errors: int = 0
    restarts: int = 0


class Driver:
    """Facade base: supervises one backend and hands readings to one consumer.

    `readings()` is meant to be consumed by one task at a time (the supervisor's pump).
    """

    # what an operator should check when the backend fails with a bare OSError
    os_error_hint = "check that the device is connected and that the service user may open it"

    def __init__(
        self,
        name: str,
        kind: DriverKind,
        backend: Backend,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.kind: DriverKind = kind
        self.backend = backend
        self.state: DriverState = "starting"
        self.degraded_reason: str | None = None
        self.counters = DriverCounters()
        self.last_reading_ts: int | None = None
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._backoff = backoff if backoff is not None else Backoff()
        self._degraded_since: float | None = None

    async def readings(self) -> AsyncGenerator[Reading, None]:
        """Readings from the backend; on failure: log, degrade, back off, restart, resume."""
        backend = self.backend
        attempt = 0
        agen: AsyncIterator[Reading] | None = None
        structlog.get_logger().info("driver_starting", driver=self.name, backend=backend.name)
        try:
            while True:
                started = self._clock.monotonic()
                failure: Exception | None = None
                try:
                    if isinstance(backend, Opens):
                        await backend.open()
                        self._mark_running()
                    agen = backend.readings()
                except Exception as exc:  # any backend failure degrades, never kills the daemon
                    failure = exc
                while failure is None and agen is not None:
                    try:
                        r = await anext(agen)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:  # see above
                        failure = exc
                        break
                    self.counters.readings += 1
                    self.last_reading_ts = r.ts
                    if self.state != "running":
                        self._mark_running()
                    yield r
                await self._close_quietly(agen)
                agen = None
                if self._clock.monotonic() - started >= self._backoff.max:
                    attempt = 0  # it ran long enough: a new failure starts the backoff over
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                self._degrade(failure, delay, attempt)
                await self._sleep(delay)
                self.counters.restarts += 1
        finally:
            self.state = "stopped"
            await self._close_quietly(agen)
            structlog.get_logger().info("driver_stopped", driver=self.name, **self._counts())

    async def aclose(self) -> None:
        """Release the device. Safe to call more than once."""
        self.state = "stopped"
        await self.backend.aclose()

    def status(self) -> dict[str, Any]:
        """What `edge status` and the health endpoint show (no identifiers). A backend with a
        `stats()` method (its own counters: restarts, rejections, ...) adds them under the
        driver's kind, e.g. `status()["ble"]`."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "backend": self.backend.name,
            "state": self.state,
            "degraded_reason": self.degraded_reason,
            "last_reading_ts": self.last_reading_ts,
            **self._counts(),
        }
        stats = getattr(self.backend, "stats", None)
        if callable(stats):
            out[self.kind] = stats()
        return out

    def _counts(self) -> dict[str, int]:
        c = self.counters
        return {"readings": c.readings, "errors": c.errors, "restarts": c.restarts}

    def _mark_running(self) -> None:
        if self.state == "degraded" and self._degraded_since is not None:
            down_s = round(self._clock.monotonic() - self._degraded_since, 3)
            structlog.get_logger().info(
                "driver_recovered", driver=self.name, after_s=down_s, restarts=self.counters.restarts
            )
        self.state = "running"
        self.degraded_reason = None
        self._degraded_since = None

    def _degrade(self, exc: Exception | None, delay: float, attempt: int) -> None:
        fields: dict[str, Any] = {}
        if isinstance(exc, DriverError):
            reason, hint = exc.reason, exc.hint
            fields["error"] = exc.args[0] if exc.args else type(exc).__name__
        elif isinstance(exc, OSError):
            reason, hint = "os_error", self.os_error_hint
            fields["errno"] = errno_mod.errorcode.get(exc.errno or 0, exc.errno)
            fields["error"] = exc.strerror or type(exc).__name__
        else:
            # message may quote device bytes or identifiers: log the type only
            reason = "backend_bug"
            hint = "this is a bug in the backend; report it with this log line"
            fields["error"] = type(exc).__name__
        self.counters.errors += 1
        self.degraded_reason = reason
        if self.state != "degraded":
            self._degraded_since = self._clock.monotonic()
        self.state = "degraded"
        structlog.get_logger().warning(
            "driver_degraded",
            driver=self.name,
            backend=self.backend.name,
            reason=reason,
            hint=hint,
            attempt=attempt,
            retry_in_s=round(delay, 3),
            **fields,
        )

    async def _close_quietly(self, agen: AsyncIterator[Reading] | None) -> None:
        closers: list[Callable[[], Awaitable[None]]] = []
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            closers.append(aclose)
        closers.append(self.backend.aclose)
        for close in closers:
            try:
                await close()
            except Exception as exc:  # closing a broken device must not stop the retry
                structlog.get_logger().warning(
                    "driver_close_failed", driver=self.name, error=type(exc).__name__
                )


# ---------------------------------------------------------------------------------------
# Toolkit shared by the simulated backends: pacing, injected identifiers, check digits,
# and the store's fixed "world" (catalogue, loyalty customers) so NFC taps and POS
# receipts talk about the same products and customers.


@dataclass(slots=True, frozen=True)
class SimOptions:
    """What a caller (a test, a benchmark, the demo) may pass to the simulated backends.

    `inject`: raw identifiers the simulations must use early on (see `classify_injected`);
    `limit`: each simulation stops after that many readings; `sleep`: used for pacing;
    `ble_source`: the BLE simulation's advertisements instead of its own random store
    (`drivers.ble.adverts.AdvertSource`; `inject` and `sleep` then do not reach BLE).
    """

    inject: tuple[str, ...] = ()
    limit: int | None = None
    sleep: Sleep = asyncio.sleep
    ble_source: AdvertSource | None = None


class SimPacer:
    """Paces a simulation at `rate` readings per second on average (Poisson arrivals).

    Sleeps with the injected `sleep` until the next reading is due on the injected clock.
    When the consumer is slower than `rate` (or `rate` is very high), no per-reading sleep
    happens: it only yields to the loop with `sleep(0)` every `yield_every` readings, so a
    benchmark can pull a million readings quickly. Lag is capped at `max_lag_s`, so a
    stalled consumer does not get a burst afterwards.
    """

    min_sleep_s = 0.001
    max_lag_s = 1.0
    yield_every = 256

    def __init__(self, rate: float, clock: Clock, sleep: Sleep, rng: random.Random) -> None:
        self._clock = clock
        self.sleep = sleep
        # own stream, so what a simulation yields does not depend on its rate
        self._random = random.Random(rng.getrandbits(64)).random
        self._mean_s = 1.0 / rate
        self._due: float | None = None
        self._n = 0

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next reading: > 0 to wait, 0.0 to just yield to
        the loop, None to go on at once (the sync fast path: no coroutine per reading)."""
        now = self._clock.monotonic()
        due = self._due
        if due is None or due < now - self.max_lag_s:
            due = now if due is None else now - self.max_lag_s
        due -= math.log(1.0 - self._random()) * self._mean_s  # exponential inter-arrival
        self._due = due
        self._n += 1
        if due - now >= self.min_sleep_s:
            return due - now
        if self._n % self.yield_every == 0:
            return 0.0
        return None

    async def pace(self) -> None:
        """Wait until the next reading is due."""
        delay = self.next_delay()
        if delay is not None:
            await self.sleep(delay)


_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_HEX_RE = re.compile(r"^[0-9A-Fa-f]+$")
_PHONE_RE = re.compile(r"^\+[0-9][0-9 ()-]{5,24}$")


def classify_injected(inject: Sequence[str] | None) -> dict[IdentClass, deque[str]]:
    """Sort raw identifiers a test injects into the simulations by class, keeping order.

    Each entry is either `"<class>:<raw>"` with a class from `edge.events.IDENT_CLASSES`
    (e.g. `"nfc_uid:04A1B2C3D4E5F6"`), or a bare raw value classified by its shape:

    - six hex pairs joined by colons (`AA:BB:...`)     -> ble_address
    - contains `@`                                      -> email
    - starts with `+` (digits, spaces, `()-` follow)    -> phone
    - a card number as the card scrub sees one given alone -> card_number
      (`edge.privacy.cards.is_card_number`: 13-19 digits passing the Luhn check, except a
      valid EAN-13/GTIN-14 that is no certain card: it stays a product or loyalty code)
    - 6-12 digits                                       -> loyalty_id
    - 8, 14 or 20 hex digits (4/7/10-byte UID)          -> nfc_uid

    The raw value is used verbatim in the readings. Anything else raises ValueError (the
    message names the position, never the value).
    """
    out: dict[IdentClass, deque[str]] = {c: deque() for c in IDENT_CLASSES}
    for i, item in enumerate(inject or ()):
        prefix, sep, rest = item.partition(":")
        if sep and prefix in out and rest:
            out[prefix].append(rest)
            continue
        digits = item.isdigit()
        if _MAC_RE.match(item):
            out["ble_address"].append(item)
        elif "@" in item:
            out["email"].append(item)
        elif _PHONE_RE.match(item):
            out["phone"].append(item)
        elif digits and item.isascii() and is_card_number(item):
            out["card_number"].append(item)
        elif digits and 6 <= len(item) <= 12:
            out["loyalty_id"].append(item)
        elif _HEX_RE.match(item) and len(item) in (8, 14, 20):
            out["nfc_uid"].append(item)
        else:
            raise ValueError(f"injected identifier #{i} has no recognizable shape; prefix it with its class")
    return out


def luhn_valid(digits: str) -> bool:
    """True when `digits` is ASCII digits only and passes the Luhn check (`edge.privacy.cards`)."""
    return bool(digits) and digits.isascii() and digits.isdigit() and luhn_ok(digits)


def gtin_valid(code: str) -> bool:
    """A GTIN-8/12/13/14 of ASCII digits with a correct check digit (`edge.privacy.cards`)."""
    return code.isascii() and code.isdigit() and gtin_ok(code)


def random_nfc_uid(rng: random.Random, size: int = 7) -> str:
    """A 7-byte NXP-style UID (manufacturer byte 0x04), uppercase hex."""
    return "04" + "".join(f"{rng.randrange(256):02X}" for _ in range(size - 1))


@dataclass(slots=True, frozen=True)
class Product:
    code: str  # GTIN-13, or an in-store SKU/PLU
    code_kind: Literal["gtin", "sku"]
    name: str
    price_cents: int  # per unit, or per kg when by_weight
    by_weight: bool = False


@dataclass(slots=True, frozen=True)
class Customer:
    loyalty: str  # 12 digits
    card_uid: str  # 7-byte UID, hex
    tag_type: Literal["Type2", "Type4"]


_PACKAGED = (
    "OAT DRINK 1L",
    "WHOLE MILK 1L",
    "EGGS FREE RANGE 10",
    "BUTTER 250G",
    "GOUDA SLICES",
    "GREEK YOGURT 500G",
    "RYE BREAD 500G",
    "CROISSANTS 4PK",
    "PASTA FUSILLI",
    "BASMATI RICE 1KG",
    "TOMATO PASSATA",
    "OLIVE OIL 500ML",
    "COFFEE BEANS 1KG",
    "GREEN TEA 20",
    "DARK CHOC 85%",
    "CRISPS SEA SALT",
    "COLA 1.5L",
    "SPARKLING WATER 6X1.5L",
    "ORANGE JUICE",
    "MUESLI CRUNCHY",
    "PEANUT BUTTER",
    "HONEY 500G",
    "TOOTHPASTE",
    "SHAMPOO 250ML",
    "DISH SOAP",
    "KITCHEN ROLL 4",
    "TOILET PAPER 8",
    "BATTERIES AA 4",
    "CAT FOOD 12X85G",
    "RED WINE 0.75L",
    "LAGER 6X0.33L",
    "FROZEN PIZZA",
    "FISH FINGERS 10",
    "ICE CREAM VANILLA",
    "HUMMUS 200G",
    "TORTILLA WRAPS",
)
_BY_WEIGHT = (
    ("BANANAS", "4011"),
    ("APPLES GALA", "4133"),
    ("TOMATOES VINE", "4664"),
    ("CARROTS LOOSE", "4562"),
    ("POTATOES", "4072"),
    ("LEMONS", "4053"),
)
_WORLD_SEED = 0x5EED_ED6E


@cache
def store_catalogue() -> tuple[Product, ...]:
    """The simulated store's products; fixed, so every simulation agrees on them."""
    rng = random.Random(_WORLD_SEED)
    out = []
    for name in _PACKAGED:
        body = "40" + "".join(str(rng.randrange(10)) for _ in range(10))
        out.append(Product(body + gtin_check_digit(body), "gtin", name, rng.randrange(49, 1299)))
    for name, plu in _BY_WEIGHT:
        out.append(Product(plu, "sku", name, rng.randrange(99, 699), by_weight=True))
    return tuple(out)


@cache
def customer_pool(size: int = 400) -> tuple[Customer, ...]:
    """The simulated store's loyalty customers (number + card); fixed, shared by NFC and POS."""
    rng = random.Random(_WORLD_SEED + 1)
    return tuple(
        Customer(
            loyalty="9" + "".join(str(rng.randrange(10)) for _ in range(11)),
            card_uid=random_nfc_uid(rng),
            tag_type="Type4" if rng.random() < 0.7 else "Type2",
        )
        for _ in range(size)
    )
