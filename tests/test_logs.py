"""Logging: JSON or console, ISO UTC timestamps, level filtering, and no raw identifier in any line.

These tests render real output through `configure_logging` into a StringIO:
`structlog.testing.capture_logs()` bypasses the processor chain, so it cannot show
what the scrubber does.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from edge.logs import CHATTY_LIBRARIES, capture_uncaught, configure_logging, scrub_identifiers

RAW = {
    "mac": "aa:bb:cc:dd:ee:ff",
    "mac_dash": "AA-BB-CC-DD-EE-FF",
    "nfc": "04:A2:3B:1C:5D:80:00",
    "card": "4111 1111 1111 1111",
    "email": "anna.muster@example.com",
    "phone": "+49 30 1234567",
}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libs = {name: logging.getLogger(name).level for name in CHATTY_LIBRARIES}
    yield
    for name, lib_level in libs.items():
        logging.getLogger(name).setLevel(lib_level)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def assert_no_raw(text: str) -> None:
    for name, raw in RAW.items():
        assert raw not in text, name
        assert raw.lower() not in text.lower(), name
    assert "4111111111111111" not in text


def test_structlog_values_and_message_are_scrubbed() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    log = structlog.get_logger("edge.test")
    message = "seen " + RAW["mac"]  # an identifier in the event text itself (a bug we defend against)
    log.info(message, **RAW, nested={"inner": [RAW["email"], {"x": RAW["nfc"]}]}, n=7)
    log.warning("device_bytes", payload=b"\x04\xa2\x3b\x1c\x5d\x80\x00", addr=bytearray(b"\xaa\xbb"))
    out = buf.getvalue()
    assert_no_raw(out)
    first, second = lines(buf)
    assert first["event"] == "seen [redacted:mac]"
    assert first["mac"] == "[redacted:mac]"
    assert first["mac_dash"] == "[redacted:mac]"
    assert first["nfc"] == "[redacted:nfc_uid]"
    assert first["card"] == "[redacted:card]"
    assert first["email"] == "[redacted:email]"
    assert first["phone"] == "[redacted:phone]"
    assert first["nested"] == {"inner": ["[redacted:email]", {"x": "[redacted:nfc_uid]"}]}
    assert first["n"] == 7
    assert second["payload"] == "<bytes>"
    assert second["addr"] == "<bytes>"


def test_stdlib_third_party_loggers_are_scrubbed() -> None:
    """aiomqtt/bleak log through stdlib logging; their lines pass the same scrubber."""
    # an earlier configure_logging("warning") leaves bleak (a chatty library) at WARNING on purpose
    for name in ("aiomqtt", "bleak", "bleak.backends", "bleak.backends.bluezdbus"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.NOTSET)
        lg.disabled, lg.propagate = False, True
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    logging.getLogger("aiomqtt").warning("peer %s sent aa:bb:cc:dd:ee:ff", RAW["mac_dash"])
    logging.getLogger("bleak.backends.bluezdbus").info("device %s (%s)", RAW["mac"], RAW["email"])
    out = buf.getvalue()
    assert_no_raw(out)
    a, b = lines(buf)
    assert a == {
        "event": "peer [redacted:mac] sent [redacted:mac]",
        "level": "warning",
        "logger": "aiomqtt",
        "timestamp": a["timestamp"],
    }
    assert b["event"] == "device [redacted:mac] ([redacted:email])"
    assert b["logger"] == "bleak.backends.bluezdbus"


def test_tracebacks_are_scrubbed() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", buf)

    def parse() -> None:
        raise ValueError(f"bad frame from {RAW['nfc']} card {RAW['card']}")

    try:
        parse()
    except ValueError:
        structlog.get_logger("edge.test").exception("frame_failed")
        logging.getLogger("nfc.clf").exception("stdlib %s", RAW["phone"])
    assert_no_raw(buf.getvalue())
    a, b = lines(buf)
    assert "ValueError: bad frame from [redacted:nfc_uid] card [redacted:card]" in a["exception"]
    assert "Traceback" in b["exception"]


def test_level_filtering_applies_to_both_paths() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", buf)
    structlog.get_logger("edge.test").info("hidden")
    logging.getLogger("aiomqtt").info("hidden too")
    structlog.get_logger("edge.test").warning("shown")
    logging.getLogger("aiomqtt").error("shown too")
    assert [e["event"] for e in lines(buf)] == ["shown", "shown too"]


def test_timestamps_are_iso_utc() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", buf)
    structlog.get_logger("edge.test").debug("tick")
    (e,) = lines(buf)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", e["timestamp"])
    assert e["level"] == "debug"
    assert e["logger"] == "edge.test"


def test_auto_format_is_json_when_not_a_terminal() -> None:
    buf = io.StringIO()
    configure_logging("info", "auto", buf)
    structlog.get_logger("edge.test").info("started", version="1.0")
    assert lines(buf)[0]["version"] == "1.0"


def test_console_format_is_scrubbed_too() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", buf)
    structlog.get_logger("edge.test").info("seen", addr=RAW["mac"])
    logging.getLogger("aiomqtt").warning("from %s", RAW["mac"])
    out = buf.getvalue()
    assert_no_raw(out)
    assert "addr=[redacted:mac]" in out
    assert "\x1b[" not in out  # no colour codes when the stream is not a terminal
    assert not out.lstrip().startswith("{")


def test_reconfiguring_replaces_the_handler() -> None:
    """Calling configure_logging twice does not duplicate lines."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    configure_logging("info", "json", second)
    logging.getLogger("aiomqtt").warning("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose", "json", io.StringIO())


def test_scrub_processor_handles_odd_values() -> None:
    """Objects are rendered via str() and scrubbed; a broken __str__ does not break logging."""

    class Loud:
        def __str__(self) -> str:
            return f"Loud({RAW['mac']})"

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    out = scrub_identifiers(
        None, "info", {"a": Loud(), "b": Broken(), "c": None, "d": 1.5, "e": {RAW["email"]}}
    )
    assert out == {
        "a": "Loud([redacted:mac])",
        "b": "<Broken>",
        "c": None,
        "d": 1.5,
        "e": ["[redacted:email]"],
    }


def test_chatty_libraries_stay_at_info_even_at_debug() -> None:
    """zeroconf logs every mDNS packet of the LAN at DEBUG (phone names included); bleak,
    dbus-fast and nfcpy print device paths, advertisement bytes and tag IDs there."""
    buf = io.StringIO()
    for name in CHATTY_LIBRARIES:  # whatever earlier tests left (the fixture restores it)
        logging.getLogger(name).setLevel(logging.NOTSET)
    configure_logging("debug", "json", buf)
    logging.getLogger("zeroconf").debug("Received from %r: %r", "192.168.1.23", b"Alices-iPhone")
    logging.getLogger("nfc.clf").debug("found tag")
    logging.getLogger("edge.test").debug("own_debug_line")
    assert [x["event"] for x in lines(buf)] == ["own_debug_line"]
    assert logging.getLogger("bleak").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("dbus_fast").getEffectiveLevel() == logging.INFO


def test_a_stricter_level_on_a_chatty_library_stays() -> None:
    logging.getLogger("zeroconf").setLevel(logging.ERROR)
    configure_logging("debug", "json", io.StringIO())
    assert logging.getLogger("zeroconf").level == logging.ERROR


def test_uncaught_exceptions_and_warnings_are_scrubbed() -> None:
    """The daemon's uncaught exceptions (any thread, and in finalizers) and warnings reach the
    journal through the scrubbed handler, not as Python's raw traceback on stderr."""
    saved = sys.excepthook, threading.excepthook, sys.unraisablehook

    class Finalizer:
        def __del__(self) -> None:
            raise ValueError(f"closing {RAW['card']}")
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    try:
        capture_uncaught()
        exc = ValueError(f"bad tag {RAW['nfc']} for {RAW['email']}")
        sys.excepthook(ValueError, exc, exc.__traceback__)
        thread = threading.Thread(target=lambda: int(RAW["phone"]), name="worker")
        thread.start()
        thread.join()
        obj = Finalizer()
        del obj  # CPython finalizes at once: its error goes to sys.unraisablehook
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"odd value {RAW['mac']}", UserWarning, stacklevel=1)
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved
        logging.captureWarnings(False)
    out = lines(buf)
    assert [x["event"] for x in out][:3] == ["uncaught_exception", "thread_exception", "unraisable_exception"]
    assert "ValueError" in out[2]["exception"]
    assert out[1]["thread"] == "worker"
    assert "ValueError" in out[0]["exception"]
    assert "ValueError" in out[1]["exception"]
    assert any("UserWarning" in x["event"] for x in out[3:])
    assert_no_raw(buf.getvalue())
