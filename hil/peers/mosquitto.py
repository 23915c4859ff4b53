"""A real Mosquitto broker for tests and the HIL rig: one subprocess on a free loopback port,
plain and optionally TLS.

    with Mosquitto(tmp_path) as broker:            # plain listener only
        ... aiomqtt.Client(broker.host, broker.port) ...
    with Mosquitto(tmp_path, tls=make_certs(tmp_path / "pki")) as broker:
        ... broker.tls_url ...                      # needs a client certificate signed by certs.ca

`tls` is anything with `ca`, `server_cert` and `server_key` paths (tests pass their
`support.certs.CertPaths`; `tests/support/mosquitto.py` re-exports this module with that type).

The broker keeps its ports across `restart()` so clients can reconnect to the same URL. Its log
goes to `log_path`; a failed start raises `MosquittoError` with the log tail. All methods are
synchronous and fast (tens of milliseconds), so they can be called from async tests too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

HOST = "127.0.0.1"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


class ServerTls(Protocol):
    """PEM files of a TLS listener: the CA clients must chain to, the server's cert and key."""

    @property
    def ca(self) -> Path: ...

    @property
    def server_cert(self) -> Path: ...

    @property
    def server_key(self) -> Path: ...


class MosquittoError(RuntimeError):
    """The broker did not start (or stop) as expected; the message includes its log tail."""


def find_mosquitto() -> Path | None:
    """The mosquitto binary: $MOSQUITTO, /usr/sbin/mosquitto (Debian/Ubuntu), or mosquitto on PATH."""
    candidates = [os.environ.get("MOSQUITTO"), "/usr/sbin/mosquitto", shutil.which("mosquitto")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; racy but fine on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """One mosquitto process. Ports are chosen at construction and kept for the object's lifetime."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: ServerTls | None = None,
        allow_anonymous: bool = True,
        binary: Path | None = None,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoError("mosquitto not found (apt-get install mosquitto)")
        self.binary = found
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = tls
        self.allow_anonymous = allow_anonymous  # False (and no password file): every CONNECT is refused
        self.host = HOST
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls is not None else None
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.output_path = workdir / "mosquitto.out"  # stdout/stderr: errors before logging starts
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise MosquittoError("this broker has no TLS listener (construct it with tls=...)")
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence false",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 0",  # 0 = no limit on outgoing QoS 1/2 messages in flight
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to user mosquitto and cannot read our keys
        lines.append(f"listener {self.port} {self.host}")
        if self.certs is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.certs.ca}",
                f"certfile {self.certs.server_cert}",
                f"keyfile {self.certs.server_key}",
                "require_certificate true",
                "use_identity_as_username false",
                "tls_version tlsv1.2",  # minimum; TLS 1.3 is negotiated when both sides can
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start and wait (at most 5 s) until mosquitto says it is running and every port accepts."""
        if self.running:
            return
        self.config_path.write_text(self.config_text())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.output_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ports = [p for p in (self.port, self.tls_port) if p is not None]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # "running" is logged after every listener is open; the port probe alone could be fooled
            # by another process on our port while mosquitto is failing to bind it.
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise MosquittoError(f"mosquitto exited with {code} during start\n{self.log_tail()}")
            if self._logged_running(log_offset) and all(_accepts(self.host, p) for p in ports):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise MosquittoError(f"mosquitto not ready on {ports} after {START_TIMEOUT}s\n"
                                     f"{self.log_tail()}")
            time.sleep(0.02)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return b" running" in log.read()
        except FileNotFoundError:
            return False

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 5 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the broker dies without closing connections cleanly (a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same ports (sessions are gone: persistence is off)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts TCP connections but the broker answers nothing."""
        if self._proc is None:
            raise MosquittoError("not running")
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is None:
            raise MosquittoError("not running")
        self._proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no mosquitto output)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
