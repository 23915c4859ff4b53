"""The daemon under test: `edge run` as a subprocess, one "life" per start.

Each life's stdout and stderr go to `logs/daemon-<n>.log`. A life is ready when its log says
`started` (the supervisor's line once drivers and uplink run). It ends by SIGTERM (a clean
stop, whose exit code and duration are recorded) or SIGKILL (a power cut: no flush, no close).
The CLI is invoked as `python -m edge.cli`, the interpreter being the rig's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


class DaemonError(RuntimeError):
    """The daemon did not start or stop as expected; the message has its log tail."""


@dataclass(slots=True)
class Life:
    n: int
    config: Path
    log: Path
    pid: int
    started_wall_ms: int
    ready_wall_ms: int | None = None
    ended_wall_ms: int | None = None
    ended_by: str | None = None  # "sigterm", "sigkill", "exited"
    exit_code: int | None = None
    stop_s: float | None = None  # SIGTERM -> exit


def edge_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_cli(*args: str, timeout: float = 60.0) -> str:
    """Run one `edge` command to completion; its stdout (raises DaemonError on failure)."""
    proc = subprocess.run(edge_cli(*args), capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise DaemonError(f"edge {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


@dataclass(slots=True)
class Daemon:
    """Starts and stops `edge run` lives; `lives` is the history."""

    logs: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the daemon's environment (peers)
    lives: list[Life] = field(default_factory=list)
    _proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def current(self) -> Life | None:
        return self.lives[-1] if self.lives else None

    async def start(self, config: Path, *, within: float = START_TIMEOUT) -> Life:
        if self.running:
            raise DaemonError("the daemon is already running")
        self.logs.mkdir(parents=True, exist_ok=True)
        n = len(self.lives) + 1
        log = self.logs / f"daemon-{n}.log"
        with log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *edge_cli("run", "--config", str(config)),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=cli_env(self.env), cwd=ROOT,
            )  # fmt: skip
        life = Life(n, config, log, self._proc.pid, _now_ms())
        self.lives.append(life)
        deadline = time.monotonic() + within
        while True:
            if self._proc.returncode is not None or await _exited(self._proc):
                life.ended_by, life.exit_code, life.ended_wall_ms = "exited", self._proc.returncode, _now_ms()
                raise DaemonError(f"edge run exited with {self._proc.returncode} at start\n{tail(log)}")
            if any(e.get("event") == "started" for e in read_log(log)):
                life.ready_wall_ms = _now_ms()
                return life
            if time.monotonic() > deadline:
                await self.kill()
                raise DaemonError(f"edge run not started after {within:g}s\n{tail(log)}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: a power cut."""
        proc, life = self._proc, self.current
        if proc is None or life is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        life.ended_by, life.exit_code, life.ended_wall_ms = "sigkill", proc.returncode, _now_ms()
        self._proc = None

    async def terminate(self, within: float) -> int:
        """SIGTERM and wait; SIGKILL after `within` seconds (then the stop counts as unclean: -9)."""
        proc, life = self._proc, self.current
        if proc is None or life is None:
            return 0
        if proc.returncode is None:
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), within)
                life.ended_by = "sigterm"
            except TimeoutError:
                proc.kill()
                await proc.wait()
                life.ended_by = "sigkill"
            life.stop_s = round(time.monotonic() - t0, 3)
        else:
            life.ended_by = life.ended_by or "exited"
        life.exit_code, life.ended_wall_ms = proc.returncode, _now_ms()
        self._proc = None
        return proc.returncode if proc.returncode is not None else -1

    def check_alive(self) -> str | None:
        """None while running (or deliberately stopped); else how the current life died."""
        proc, life = self._proc, self.current
        if proc is None or life is None or proc.returncode is None:
            return None
        life.ended_by, life.exit_code, life.ended_wall_ms = "exited", proc.returncode, _now_ms()
        self._proc = None
        return f"life {life.n} exited with {proc.returncode} by itself"


async def _exited(proc: asyncio.subprocess.Process) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 0.001)
        return True
    return False


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a daemon log (other lines, e.g. a traceback, are skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for ln in text.splitlines():
        if ln.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(ln)
                if isinstance(doc, dict):
                    out.append(doc)
    return out


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _now_ms() -> int:
    return int(time.time() * 1000)
