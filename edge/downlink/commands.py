"""Signed commands (downlink-v1 §Commands): run at most once, within their time, one result each.

`CommandRunner.handle(doc)` takes a verified `cmd` document (edge/wire/downlink.py verified the
signature, the topic and the fields) and publishes exactly one `cmd-result` for it:

1. Time. Clock synchronized (`Clock.synchronized()`, the kernel's NTP status): refused
   `expired` once `exp` has passed. Not synchronized: the estimate of now is the last
   synchronized time plus monotonic time since (edge/downlink/seen.py); refused `expired` when
   `t` is more than 10 minutes before it, or `exp` has passed by it, or no estimate exists in
   this boot (a box that never had a synchronized clock since it booted cannot tell an old
   command from a new one, so it refuses: fail closed).
2. Replay. The id is stored durably (commands.db) BEFORE the command runs: a second delivery,
   also after a restart or a crash mid-command, gets `duplicate` and does not run again.
3. Run. An unknown name gets `unknown-command`; wrong arguments `bad-args`; a command that raises
   `failed` with a short detail (the exception's type and message, cut to 200 characters; no
   command here handles a pseudonym, so none can end up in a detail).

`restart` publishes its result first and only then asks the supervisor to stop (drain) with
the restart exit status, so its result is not lost with the connection. Results are UTF-8
JSON, published with QoS 1 through the `publish` callable the downlink component passes in; a
publish that fails is logged (`cmd_result_unsent`) and not retried: the command ran (or not)
all the same, and the cloud sees no result rather than two.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import structlog

from edge.buffer.bounds import boot_id
from edge.clock import Clock
from edge.downlink.loglevel import TemporaryLogLevel
from edge.downlink.seen import SeenFull, SeenIds
from edge.downlink.trust import TrustedKeys, TrustError
from edge.units import parse_duration
from edge.wire.downlink import Document, cmd_result_topic

log = structlog.get_logger("edge.downlink.commands")

T = TypeVar("T")

UNSYNCED_WINDOW_MS = 10 * 60 * 1000  # spec: t at most 10 minutes before the estimate of now
MAX_DETAIL = 200
ErrorCode = Literal["expired", "duplicate", "unknown-command", "bad-args", "failed"]
COMMANDS = ("ping", "status", "restart", "keys.rotate", "uplink.resend", "log.level", "cloud-key.add",
            "cloud-key.retire")


class Publish(Protocol):
    def __call__(self, topic: str, payload: bytes, qos: int = 1) -> Awaitable[None]: ...


class Rotator(Protocol):
    """The KeyStore's manual rotation: new ephemeral epoch, the old key file shredded."""

    def rotate(self) -> int: ...


class BadArgs(ValueError):
    """The command's `args` do not fit it (`bad-args`)."""


class Refused(Exception):
    """The command cannot be carried out (`failed`), with a detail for the operator."""


@dataclass(slots=True, frozen=True)
class CommandDeps:
    """What the commands act on; None = not available on this device (`failed`)."""

    status: Callable[[], Mapping[str, Any]] | None = None
    restart: Callable[[], None] | None = None
    keys: Rotator | None = None
    resend: Callable[[], Awaitable[int]] | None = None
    log_level: TemporaryLogLevel | None = None
    trust: TrustedKeys | None = None


@dataclass(slots=True)
class CommandCounters:
    results: dict[str, int] = field(default_factory=dict)  # "ok" or the error code -> count
    unsent: int = 0
    malformed: int = 0


class CommandRunner:
    """Runs verified `cmd` documents. `close()` when the downlink stops."""

    def __init__(
        self,
        *,
        state_dir: Path,
        clock: Clock,
        prefix: str,
        identity: tuple[str, str, str],
        publish: Publish,
        deps: CommandDeps,
        boot: str | None = None,
    ) -> None:
        self._clock = clock
        self._publish = publish
        self._deps = deps
        self._topic = cmd_result_topic(prefix, *identity)
        self._seen = SeenIds(state_dir, clock, boot or boot_id())
        self._seen.observe()
        self._lock = asyncio.Lock()  # one command at a time: a replay must see the first one's id
        self.counters = CommandCounters()
        self._handlers: dict[str, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ping": self._ping,
            "status": self._status,
            "restart": self._restart,
            "keys.rotate": self._keys_rotate,
            "uplink.resend": self._resend,
            "log.level": self._log_level,
            "cloud-key.add": self._key_add,
            "cloud-key.retire": self._key_retire,
        }
        self._after: Callable[[], None] | None = None

    def close(self) -> None:
        self._seen.close()

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {"results": dict(c.results), "unsent": c.unsent, "malformed": c.malformed}

    async def handle(self, doc: Document) -> None:
        body = doc.body
        cid, name, args, exp = body.get("id"), body.get("name"), body.get("args", {}), body.get("exp")
        if type(cid) is not str or not 1 <= len(cid) <= 64:
            self.counters.malformed += 1  # verify_document refuses these; nothing to answer to
            log.warning("cmd_dropped", reason="no-id", digest=doc.digest)
            return
        async with self._lock:
            if type(name) is not str or type(exp) is not int or not isinstance(args, Mapping):
                await self._result(cid, error="bad-args", detail="name, args or exp malformed")
                return
            late = await asyncio.to_thread(self._late, doc.t, exp)
            if late is not None:
                await self._result(cid, error="expired", detail=late)
                return
            try:
                fresh = await asyncio.to_thread(self._seen.take, cid, exp)
            except SeenFull as exc:
                await self._result(cid, error="failed", detail=str(exc))
                return
            if not fresh:
                await self._result(cid, error="duplicate", detail="this command id was run already")
                return
            await self._run(cid, name, args)
        after, self._after = self._after, None
        if after is not None:
            after()

    def _late(self, t: int, exp: int) -> str | None:
        """Why a command may not run now by the clock rules, or None."""
        if self._clock.synchronized():
            self._seen.observe()
            if self._clock.wall_ms() > exp:
                return "exp has passed"
            return None
        est = self._seen.estimate_ms()
        if est is None:
            return "clock not synchronized and no synchronized time known since boot"
        if t < est - UNSYNCED_WINDOW_MS:
            return "clock not synchronized: t is more than 10 minutes before the estimated time"
        if est > exp:
            return "clock not synchronized: exp has passed by the estimated time"
        return None

    async def _run(self, cid: str, name: str, args: Mapping[str, Any]) -> None:
        handler = self._handlers.get(name)
        if handler is None:
            await self._result(cid, error="unknown-command", detail="no such command")
            return
        try:
            result = await handler(args)
        except BadArgs as exc:
            await self._result(cid, error="bad-args", detail=str(exc))
            return
        except Refused as exc:
            await self._result(cid, error="failed", detail=str(exc))
            return
        except Exception as exc:
            log.exception("cmd_failed", cmd=name)
            await self._result(cid, error="failed", detail=f"{type(exc).__name__}: {exc}")
            return
        log.info("cmd_ran", cmd=name, id=cid)
        await self._result(cid, result=result)

    async def _result(self, cid: str, *, result: dict[str, Any] | None = None,
                      error: ErrorCode | None = None, detail: str = "") -> None:
        if error is None:
            msg: dict[str, Any] = {"id": cid, "ok": True, "result": result or {}}
        else:
            msg = {"id": cid, "ok": False, "error": error, "detail": detail[:MAX_DETAIL]}
            log.info("cmd_refused", id=cid, error=error)
        key = "ok" if error is None else error
        self.counters.results[key] = self.counters.results.get(key, 0) + 1
        payload = json.dumps(msg, separators=(",", ":"), default=str).encode()
        try:
            await self._publish(self._topic, payload, qos=1)
        except Exception as exc:
            self.counters.unsent += 1
            log.warning("cmd_result_unsent", id=cid, error=type(exc).__name__)

    # -- the commands -----------------------------------------------------------------------

    async def _ping(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        return {"t": self._clock.wall_ms()}

    async def _status(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        status = _need(self._deps.status, "status")
        return dict(await asyncio.to_thread(status))

    async def _restart(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        self._after = _need(self._deps.restart, "restart")  # after the result is published
        return {"restarting": True}

    async def _keys_rotate(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        keys = _need(self._deps.keys, "keys.rotate")
        epoch = await asyncio.to_thread(keys.rotate)
        return {"epoch": epoch}

    async def _resend(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        resend = _need(self._deps.resend, "uplink.resend")
        return {"batches": await resend()}

    async def _log_level(self, args: Mapping[str, Any]) -> dict[str, Any]:
        ll = _need(self._deps.log_level, "log.level")
        level, dur = args.get("level"), args.get("for")
        if type(level) is not str:
            raise BadArgs("level must be a str")
        try:
            for_s = parse_duration(dur)
            ll.set(level, for_s)
        except (ValueError, TypeError) as exc:
            raise BadArgs(str(exc)) from None
        return {"level": level.lower(), "for_s": for_s, "until_ms": self._clock.wall_ms() + int(for_s * 1000)}

    async def _key_add(self, args: Mapping[str, Any]) -> dict[str, Any]:
        trust = _need(self._deps.trust, "cloud-key.add")
        pub = args.get("pub")
        if type(pub) is not bytes:
            raise BadArgs("pub must be bin (32-byte Ed25519 public key)")
        try:
            kid = await asyncio.to_thread(trust.add, pub)
        except TrustError as exc:
            raise BadArgs(str(exc)) from None
        return {"kid": kid, "cloud_kids": sorted(trust.keys())}

    async def _key_retire(self, args: Mapping[str, Any]) -> dict[str, Any]:
        trust = _need(self._deps.trust, "cloud-key.retire")
        kid = args.get("kid")
        if type(kid) is not str:
            raise BadArgs("kid must be a str")
        if kid not in trust.keys():  # noqa: SIM118 - keys() is the Protocol's method, not a dict's
            raise BadArgs("not a trusted cloud key id")
        try:
            await asyncio.to_thread(trust.retire, kid)
        except TrustError as exc:
            raise Refused(str(exc)) from None
        return {"kid": kid, "cloud_kids": sorted(trust.keys())}


def _need(dep: T | None, name: str) -> T:
    if dep is None:
        raise Refused(f"{name} is not available on this device")
    return dep
