"""Logging: structlog to stdout (JSON under systemd, console on a terminal), scrubbed.

Everything goes through one stdlib root handler with a `ProcessorFormatter`, so lines from
structlog loggers and from third-party stdlib loggers (aiomqtt, bleak, nfcpy, ...) are
rendered alike and both pass `scrub_identifiers` right before rendering: any
identifier-shaped substring (MAC, NFC UID, card-like digit run, e-mail, phone) becomes
`[redacted:<kind>]`, and bytes values become `<bytes>`. Our code never logs raw
identifiers in the first place; this is defence in depth for the day something does.
Exceptions are formatted to text before scrubbing (tracebacks contain values too).

Libraries whose DEBUG lines print what they receive (zeroconf: every mDNS packet on the
store's LAN, phone names included; bleak and dbus-fast: device paths and advertisement
bytes; nfcpy: tag IDs) are held at INFO or above whatever the configured level.
`capture_uncaught` (`edge run` calls it) routes uncaught exceptions of the main
and other threads, and warnings, through the same scrubbed handler instead of raw stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from edge.privacy.scrub import redact_identifiers

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_MAX_DEPTH = 4
# third-party loggers whose DEBUG output carries raw packets, device paths or tag IDs
CHATTY_LIBRARIES = ("zeroconf", "bleak", "dbus_fast", "nfc")


def _scrub(v: Any, depth: int) -> Any:
    if isinstance(v, str):
        return redact_identifiers(v)
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if depth < _MAX_DEPTH:
        if isinstance(v, Mapping):
            return {_scrub(k, depth + 1): _scrub(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [_scrub(x, depth + 1) for x in v]
    try:
        text = str(v)
    except Exception:  # a broken __str__ must not break logging
        text = f"<{type(v).__name__}>"
    return redact_identifiers(text)


def scrub_identifiers(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact identifier-shaped substrings in every key and value."""
    return {_scrub(k, 0): _scrub(v, 0) for k, v in event_dict.items()}


class _EdgeHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """Marks the root handler we installed, so reconfiguring replaces only ours."""


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def is_journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal connection systemd gave us (`JOURNAL_STREAM=dev:ino`
    names the same file), whatever else it looks like."""
    raw = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default stdout), scrubbed.

    JSON when `fmt` is json, or auto and the stream is the journal (`JOURNAL_STREAM`) or
    not a terminal; console otherwise. Timestamps are ISO 8601 UTC. Calling it again
    replaces the previous configuration.
    """
    out = sys.stdout if stream is None else stream
    lvl = _LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    use_json = fmt == "json" or (fmt == "auto" and (is_journal_stream(out) or not _is_tty(out)))

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            scrub_identifiers,  # last before rendering
            renderer,
        ],
    )
    handler = _EdgeHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _EdgeHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in CHATTY_LIBRARIES:  # at INFO or above; a stricter level set before stays
        lib = logging.getLogger(name)
        lib.setLevel(max(lvl, logging.INFO, lib.level))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # loggers are created at import time all over the code base; caching would pin
        # whatever configuration was active at their first use
        cache_logger_on_first_use=False,
    )


def capture_uncaught() -> None:
    """Uncaught exceptions (main thread and others), unraisable ones (raised in `__del__`,
    finalizers) and warnings go through the scrubbed handler as `uncaught_exception` /
    `thread_exception` / `unraisable_exception` / py.warnings lines, instead of
    Python printing them, values and all, to stderr (the journal).

    For a process that owns its whole run and logs to the journal (`edge run`); the demo
    keeps Python's traceback on the terminal (simulated identifiers only); test runners
    keep their own hooks.
    """
    log = structlog.get_logger("edge.uncaught")

    def excepthook(typ: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(typ, KeyboardInterrupt):
            sys.__excepthook__(typ, value, tb)  # no values in it: keep Python's short message
            return
        log.critical("uncaught_exception", exc_info=(typ, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
        log.error("thread_exception", thread=name, exc_info=exc_info)

    def unraisablehook(u: sys.UnraisableHookArgs) -> None:  # e.g. an error in a __del__
        exc_info = (u.exc_type, u.exc_value or u.exc_type(), u.exc_traceback)
        log.error("unraisable_exception", message=u.err_msg or "", exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    # off, then on: nfcpy turns capturing on at import, and a test runner may have swapped
    # warnings.showwarning since, which would leave "on" pointing at someone else's hook
    logging.captureWarnings(False)
    logging.captureWarnings(True)
