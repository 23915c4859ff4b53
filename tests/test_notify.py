"""sd_notify without systemd: a real `edge run` subprocess talks to a fake NOTIFY_SOCKET.

The fake is an AF_UNIX datagram socket in a temp dir, the same thing systemd binds. The
daemon runs as systemd would start it: NOTIFY_SOCKET and WATCHDOG_USEC in its environment,
stdout not a terminal, and under NoNewPrivileges + MemoryDenyWriteExecute (prctl, inherited
across exec) like the unit's hardening. What must hold:

- READY=1 comes once config, keys, buffer and drivers are up, with a STATUS= line (backlog,
  uplink state); WATCHDOG=1 follows every WATCHDOG_USEC/2.
- A failed start-up never says READY.
- A wedged event loop sends no pings (the loop is wedged for real: the consent file is swapped
  for a FIFO nobody writes, and the daemon blocks opening it); pings resume after.
- A hung pipeline (the buffer cannot commit: another process holds SQLite's write lock)
  withholds pings while the loop itself is fine; /healthz says why; pings resume after.
- SIGTERM: STOPPING=1 (with EXTEND_TIMEOUT_USEC) at once, no ping after it, exit 0 within the
  unit's TimeoutStopSec.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cloudkey import signed_uplink
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.notify import Notifier
from edge.privacy.keys import KeyStore

ROOT = Path(__file__).resolve().parent.parent
EDGE = str(Path(sys.executable).parent / "edge")
UNIT = ROOT / "systemd" / "edge.service"
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
PING_S = WATCHDOG_USEC / 2e6

# Runs the daemon the way the unit's hardening would: no new privileges, no W+X memory.
HARDENED = r"""
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
libc.prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE (Linux >= 6.3; ignored where unknown)
os.execv(sys.argv[1], sys.argv[1:])
"""


@dataclass(slots=True, frozen=True)
class Msg:
    at: float  # monotonic arrival
    fields: dict[str, str]

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET; keeps every datagram with its arrival time."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[Msg] = []

    def pump(self, seconds: float) -> None:
        """Receive for `seconds`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            fields = dict(ln.split("=", 1) for ln in data.decode().splitlines() if "=" in ln)
            self.messages.append(Msg(time.monotonic(), fields))

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float) -> Msg:
        end = time.monotonic() + timeout
        seen = len(self.messages)
        while True:
            for m in self.messages[seen:]:
                if pred(m):
                    return m
            seen = len(self.messages)
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such notification within {timeout}s; got {self.messages[-5:]}")
            self.pump(min(left, 0.2))

    def pings_between(self, start: float, end: float) -> list[Msg]:
        return [m for m in self.messages if m.has("WATCHDOG", "1") and start <= m.at <= end]

    def silence(self, after: float, gap: float, timeout: float) -> bool:
        """Receive until no WATCHDOG=1 came for `gap` seconds (True), or `timeout` passed (False)."""
        end = after + timeout
        while (now := time.monotonic()) < end:
            last = max([after] + [m.at for m in self.pings_between(after, now)])
            if now - last >= gap:
                return True
            self.pump(min(0.1, end - now))
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    """A fake NOTIFY_SOCKET in a short temp dir (AF_UNIX paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    fake = FakeSystemd(d)
    yield fake
    fake.close()
    shutil.rmtree(d, ignore_errors=True)


def device_doc(state: Path, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-sd"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms", "queue_max": 200},
        "uplink": {"enabled": False},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": 100, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": 10, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 5, "seed": 3}}],
        },
        "health": {"listen": "127.0.0.1:0", "drain_timeout": "5s", "stall_timeout": "2s", "advertise": False},
        "logging": {"level": "info", "format": "auto"},
    }
    doc.update(over)
    return doc


def make_config(tmp_path: Path, *, keys: bool = True, **over: Any) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(device_doc(state, **over)))
    if keys:
        KeyStore(state / "keys", SystemClock()).init()
    return path


class Daemon:
    def __init__(self, config: Path, systemd: FakeSystemd, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_PID")}
        env |= {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HARDENED, EDGE, "run", "--config", str(config)],
            env=env, stdout=self._out, stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for ln in self.log.read_text().splitlines():
            if ln.startswith("{"):
                out.append(json.loads(ln))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def start(config: Path, systemd: FakeSystemd, daemons: list[Daemon]) -> Daemon:
    d = Daemon(config, systemd, config.parent / "daemon.log")
    daemons.append(d)
    return d


def health_url(state: Path, path: str) -> str:
    doc = json.loads((state / "runtime.json").read_text())
    return f"http://{doc['components']['health']['listen']}{path}"


def fetch(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - a loopback URL we built
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def unit_timeout_stop_s() -> float:
    m = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.M)
    assert m is not None, "edge.service sets TimeoutStopSec in seconds"
    return float(m.group(1))


def wait_for_file(path: Path, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


# -- the protocol itself, in process -------------------------------------------------------------


def test_notifier_without_notify_socket_is_a_no_op_and_reads_the_watchdog_env() -> None:
    """No NOTIFY_SOCKET: nothing sent, nothing raised. WATCHDOG_USEC applies only to our pid."""
    quiet = Notifier.from_env({})
    assert not quiet.enabled
    assert quiet.send("READY=1") is False
    assert quiet.watchdog_interval is None
    ours = Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42)
    assert ours.watchdog_interval == 15.0
    theirs = Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42)
    assert theirs.watchdog_interval is None


def test_notifier_reaches_an_abstract_socket_and_survives_a_missing_one(tmp_path: Path) -> None:
    """`@name` is the abstract namespace; a socket that is gone makes send() return False."""
    name = f"store-edge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        rx.settimeout(5)
        n = Notifier(f"@{name}")
        assert n.ready("backlog 0 events")
        got = rx.recv(4096).decode().splitlines()
        assert got[0] == "READY=1"
        assert "STATUS=backlog 0 events" in got
        n.close()
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.watchdog() is False
    assert gone.stopping("bye") is False
    gone.close()


# -- a real daemon ----------------------------------------------------------------------------------


def test_ready_after_startup_with_status_then_watchdog_pings(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon]
) -> None:
    """READY=1 + STATUS (backlog, uplink, drivers) once up; then WATCHDOG=1 about every 0.5 s."""
    d = start(make_config(tmp_path), systemd, daemons)
    ready = systemd.wait_for(lambda m: m.has("READY", "1"), 60)
    status = ready.fields["STATUS"]
    assert "backlog" in status
    assert "uplink disabled" in status
    assert "drivers 3/3 running" in status
    assert ready.fields["MAINPID"] == str(d.proc.pid)  # the launcher exec()s: same pid
    assert (tmp_path / "state" / "buffer.db").exists()
    assert not any(m.has("WATCHDOG") for m in systemd.messages if m.at < ready.at)
    systemd.pump(3.0)
    pings = systemd.pings_between(ready.at, ready.at + 3.0)
    assert len(pings) >= 3
    logs = d.lines()
    assert logs, "JSON log lines on stdout when it is not a terminal"
    assert any(ln.get("event") == "ready" for ln in logs)


def test_a_failed_start_never_says_ready(tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon]) -> None:
    """No device keys: exit 2 (a start-up check shared with check-config) with the reason, and no
    READY=1 was ever sent."""
    d = start(make_config(tmp_path, keys=False), systemd, daemons)
    assert d.proc.wait(60) == 2
    systemd.pump(0.3)
    assert not any(m.has("READY") for m in systemd.messages)
    assert any(ln.get("event") == "startup_failed" for ln in d.lines())


def test_a_wedged_event_loop_misses_its_pings(tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon]) -> None:
    """The daemon is frozen (SIGSTOP: its loop makes no progress, the process still exists): no
    WATCHDOG=1 arrives; once it runs again (SIGCONT), pings resume. (This used to wedge the loop
    with a FIFO as consent file; opening that no longer blocks: edge/privacy/consent.py.)"""
    config = make_config(tmp_path)
    d = start(config, systemd, daemons)
    ready = systemd.wait_for(lambda m: m.has("READY", "1"), 60)
    systemd.wait_for(lambda m: m.has("WATCHDOG", "1") and m.at > ready.at, 10)

    d.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        assert systemd.silence(stopped, gap=6 * PING_S, timeout=20), "pings while the loop is wedged"
        assert d.proc.poll() is None, "the daemon is alive, only its loop is stuck"
    finally:
        d.proc.send_signal(signal.SIGCONT)
    released = time.monotonic()
    systemd.wait_for(lambda m: m.has("WATCHDOG", "1") and m.at > released, 10)
    assert d.proc.poll() is None


def test_a_hung_pipeline_withholds_pings_and_healthz_says_why(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon]
) -> None:
    """Another process holds SQLite's write lock: events queue, nothing commits. The loop still
    runs (/healthz answers 503 with the reason), but WATCHDOG=1 stops after stall_timeout (2 s);
    once the lock goes, commits and pings resume."""
    state = tmp_path / "state"
    d = start(make_config(tmp_path), systemd, daemons)
    ready = systemd.wait_for(lambda m: m.has("READY", "1"), 60)
    systemd.wait_for(lambda m: m.has("WATCHDOG", "1") and m.at > ready.at, 10)
    wait_for_file(state / "runtime.json")
    status, doc = fetch(health_url(state, "/healthz"))
    assert (status, doc["status"]) == (200, "ok")

    locker = sqlite3.connect(state / "buffer.db", timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # the WAL write lock: the daemon's commits now wait
        locked = time.monotonic()
        # stall_timeout is 2 s; then no ping for 6 intervals although the loop runs
        assert systemd.silence(locked, gap=6 * PING_S, timeout=12), "pings while nothing commits"
        status, doc = fetch(health_url(state, "/healthz"))
        assert status == 503
        assert doc["status"] == "unhealthy"
        assert any(r.startswith(("buffer:", "pipeline:")) for r in doc["reasons"]), doc
        assert d.proc.poll() is None
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    released = time.monotonic()
    systemd.wait_for(lambda m: m.has("WATCHDOG", "1") and m.at > released, 20)
    assert any(ln.get("event") == "watchdog_withheld" for ln in d.lines())


@pytest.mark.mosquitto
def test_sigterm_says_stopping_and_exits_within_the_stop_timeout(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon], mosquitto: Mosquitto
) -> None:
    """With the uplink online: STATUS reports it; SIGTERM -> STOPPING=1 and EXTEND_TIMEOUT_USEC
    >= drain_timeout at once, no WATCHDOG=1 after it, exit 0 within the unit's TimeoutStopSec."""
    config = make_config(tmp_path, uplink=signed_uplink(broker=mosquitto.url, batch={"linger": "50ms"}))
    d = start(config, systemd, daemons)
    systemd.wait_for(lambda m: m.has("READY", "1"), 60)
    systemd.wait_for(lambda m: "uplink online" in m.fields.get("STATUS", ""), 30)

    d.proc.send_signal(signal.SIGTERM)
    stop = systemd.wait_for(lambda m: m.has("STOPPING", "1"), 10)
    assert int(stop.fields["EXTEND_TIMEOUT_USEC"]) >= 5_000_000  # drain_timeout 5s
    assert d.proc.wait(unit_timeout_stop_s()) == 0
    systemd.pump(0.3)
    assert [m for m in systemd.messages if m.has("WATCHDOG") and m.at > stop.at] == []
    events = [ln.get("event") for ln in d.lines()]
    assert "drained" in events
    assert events.index("drained") < events.index("buffer_closed")
