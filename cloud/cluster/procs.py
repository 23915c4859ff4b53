"""Small process helpers shared by the NATS and PostgreSQL runners: free ports, pid checks, stops.

A server started by `edge-cloud up` outlives the command, so it is found again by its pid file;
`pid_alive` also checks the process's command line names our config (a pid can be reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (bind to 0; racy but fine on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
    except (FileNotFoundError, PermissionError):
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def pid_alive(pid: int, marker: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, given a marker, its command line contains it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return marker is None or marker in cmdline


def terminate(pid: int, *, marker: str | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL. Nothing happens when it is not running."""
    if not pid_alive(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except (FileNotFoundError, PermissionError):
        return f"(no {path.name})"
    return f"--- {path} ---\n" + "\n".join(text)
