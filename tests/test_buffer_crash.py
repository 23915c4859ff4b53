"""Power-cut safety: a child ingesting flat out is SIGKILLed at random moments, again and again,
over the same database. After every kill, whatever the child reported committed is there."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import sys
from pathlib import Path

import pytest

from edge.buffer import Buffer
from edge.clock import FakeClock
from edge.config import Config

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "crashchild.py"
ROUNDS = 28


async def _run_and_kill(state: Path, rng: random.Random) -> tuple[int | None, list[int]]:
    """One child lifetime; returns (last id at its open, committed ids it reported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), str(state),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        if rng.random() < 0.2:  # somewhere in start-up: open, check, migrate
            await asyncio.sleep(rng.uniform(0.0, 0.8))
        else:  # mid-ingest, after a random number of commits and a little more
            target = rng.randint(2, 60)
            async with asyncio.timeout(30):
                while len(lines) < target:
                    line = await proc.stdout.readline()
                    assert line, "child exited early"
                    lines.append(line)
            await asyncio.sleep(rng.uniform(0.0, 0.05))
    finally:
        proc.kill()  # SIGKILL: no flush, no close, no atexit
        rest = await proc.stdout.read()
        await proc.wait()
    lines += rest.splitlines(keepends=True)
    complete = [ln.decode().split() for ln in lines if ln.endswith(b"\n")]  # a torn last line is ignored
    opened = None
    if complete:
        assert complete[0][0] == "open", complete[0]
        assert complete[0][2] in ("created", "ok"), complete[0]  # never a salvage: no corruption
        opened = int(complete[0][1])
    return opened, [int(c[0]) for c in complete[1:]]


@pytest.mark.slow
async def test_sigkill_never_loses_a_committed_event(tmp_path: Path) -> None:
    rng = random.Random(20260101)
    state = tmp_path / "state"
    db_path = state / "buffer.db"
    highest_on_disk = 0
    kills = commits_checked = 0
    for _ in range(ROUNDS):
        opened, committed = await _run_and_kill(state, rng)
        kills += 1
        if not db_path.exists():
            assert not committed
            continue
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            if opened is not None:
                assert opened >= highest_on_disk  # ids continue above everything stored before
            assert committed == sorted(set(committed))  # strictly increasing
            if committed:
                first = (opened or 0) + 1
                last = committed[-1]
                (n,) = conn.execute(
                    "SELECT count(*) FROM events WHERE id BETWEEN ? AND ?", (first, last)
                ).fetchone()
                assert n == last - first + 1, (
                    f"lost {last - first + 1 - n} committed events in {first}..{last}"
                )
                commits_checked += len(committed)
            assert conn.execute("SELECT count(*) FROM drops").fetchone() == (0,)
            (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
            assert top >= highest_on_disk  # nothing committed ever disappears
            highest_on_disk = top
    assert kills >= 25
    assert commits_checked > 100
    cfg = Config.model_validate(
        {"identity": {"tenant": "crash", "store": "s1", "device": "d1"}, "paths": {"state_dir": str(state)}}
    )
    buf = await Buffer.open(cfg, FakeClock())
    assert buf.open_report.status == "ok"
    assert buf.last_committed_id >= highest_on_disk
    await buf.close()
