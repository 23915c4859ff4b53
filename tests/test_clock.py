"""Clock safety on boxes without an RTC (a Pi boots at its last saved time, or at 1970).

What must hold, and how it is checked here:
- whether the wall clock is NTP-synchronized is known (kernel adjtimex), shown by `edge status`
  and carried in every batch header (`sync`);
- an event captured while the clock is unsynchronized, or stamped more than a day ahead, says
  so (`data.clock`); so does one stamped in 1970 under a clock that claims to be synced;
- retention never deletes early because of the wall clock: it pauses while unsynchronized,
  and neither events stamped while the clock was wrong nor a clock step forward may make
  fresh events look old (retention marks on the monotonic clock).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.buffer import Buffer
from edge.clock import FakeClock, SystemClock, kernel_clock_synchronized
from edge.config import Config
from edge.events import Pending, Reading
from edge.pipeline import NormalizeStage
from edge.privacy.keys import KeyStore
from edge.uplink.batcher import Batcher
from edge.wire.uplink import parse_batch

NOW = 1_767_225_600_000  # FakeClock's default wall time, 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
EDGE = str(Path(sys.executable).parent / "edge")
ROOT = Path(__file__).resolve().parent.parent


def make_cfg(tmp_path: Path, **buffer: Any) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "state" / "keys")},
        "buffer": {"retention": {"ble": "7d", "nfc": "14d", "pos": "30d", "edge": "7d"}, **buffer},
        "uplink": {"batch": {"linger": 0}},
    })  # fmt: skip


def presence(ts: int, i: int = 0) -> Pending:
    return Pending(ts=ts, src="ble", type="presence.enter", data={"p": f"{i:016x}"})


async def stored_ids(buf: Buffer) -> list[int]:
    return [e.id for e in await buf.unsealed(1_000_000, 1 << 40) if e.src == "ble"]


# -- knowing the state of the clock ------------------------------------------------------------


def test_sync_state_comes_from_the_kernel_and_is_cached() -> None:
    """SystemClock.synchronized() is adjtimex's answer (a bool, never an exception)."""
    direct = kernel_clock_synchronized()
    assert isinstance(direct, bool)
    assert SystemClock().synchronized() == direct


def test_edge_status_shows_the_clock_state(tmp_path: Path) -> None:
    """`edge status` has a clock line, also when the daemon is not running; --json has the flag."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "state" / "keys")},
    }))  # fmt: skip
    text = subprocess.run([EDGE, "status", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    want = "NTP-synchronized" if kernel_clock_synchronized() else "NOT synchronized"
    assert any(ln.startswith("clock") and want in ln for ln in text.splitlines()), text
    doc = subprocess.run([EDGE, "status", "--config", str(cfg), "--json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f'"synchronized": {str(kernel_clock_synchronized()).lower()}' in doc


# Runs in a child: a seccomp filter denying adjtimex/clock_adjtime with EPERM, as systemd's
# ProtectClock= does, then asks the clock whether it is synchronized.
DENY_ADJTIMEX = r"""
import ctypes, ctypes.util, platform, struct
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
nrs = {"x86_64": (159, 305), "aarch64": (171, 266)}[platform.machine()]  # adjtimex, clock_adjtime
prog = [struct.pack("HBBI", 0x20, 0, 0, 0)]  # A = seccomp_data.nr
for i, nr in enumerate(nrs):
    prog.append(struct.pack("HBBI", 0x15, len(nrs) - i, 0, nr))  # A == nr: goto deny
prog.append(struct.pack("HBBI", 0x06, 0, 0, 0x7FFF0000))  # allow
prog.append(struct.pack("HBBI", 0x06, 0, 0, 0x00050000 | 1))  # errno EPERM
code = ctypes.create_string_buffer(b"".join(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.cast(code, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
from edge.clock import SystemClock, kernel_clock_synchronized
print(kernel_clock_synchronized(), SystemClock().synchronized())
"""


def test_a_clock_state_that_cannot_be_read_counts_as_unsynchronized() -> None:
    """adjtimex denied (seccomp, like ProtectClock=): "unknown" must read as NOT synchronized,
    never as synced (which would let retention trust a 1970 clock)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"syscall numbers for {platform.machine()} not in the test")
    done = subprocess.run([sys.executable, "-c", DENY_ADJTIMEX], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("synced", [True, False])
async def test_batch_headers_carry_the_sync_flag(tmp_path: Path, synced: bool) -> None:
    """uplink-v1 header `sync` is the clock's state when the batch was sealed."""
    clock = FakeClock(sync=synced)
    cfg = make_cfg(tmp_path)
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    buf = await Buffer.open(cfg, clock)
    try:
        await buf.put(presence(clock.wall_ms()))
        await buf.flush()
        batch = await Batcher(cfg, buf, keys, clock).seal_next(force=True)
        assert batch is not None
        assert parse_batch(batch.payload).sync is synced
    finally:
        await buf.close()


# -- flagging suspicious capture times ----------------------------------------------------------------


def reading(ts: int) -> Reading:
    return Reading(src="ble", type="presence.enter", ts=ts, data={"rssi": -60})


def test_events_captured_with_an_unsynced_clock_say_so() -> None:
    """Clock not synchronized (e.g. a Pi booted at 1970 before NTP): data.clock == "unsynced"."""
    clock = FakeClock(wall=0, sync=False)
    assert NormalizeStage(clock)(reading(clock.wall_ms())).data["clock"] == "unsynced"


def test_events_from_the_future_say_so_and_normal_ones_carry_no_flag() -> None:
    """Synchronized clock: more than a day ahead is "future"; the present is unflagged."""
    clock = FakeClock(sync=True)
    assert NormalizeStage(clock)(reading(NOW + 2 * DAY_MS)).data["clock"] == "future"
    assert "clock" not in NormalizeStage(clock)(reading(NOW)).data


def test_a_1970_capture_time_is_flagged_even_when_the_clock_claims_sync() -> None:
    """A reading stamped 1970 (a driver or device clock gone wrong) while the box is synced."""
    clock = FakeClock(sync=True)
    assert NormalizeStage(clock)(reading(0)).data["clock"] == "past"


# -- retention and a clock that jumps ------------------------------------------------------------------


async def test_retention_pauses_while_the_clock_is_unsynchronized(tmp_path: Path) -> None:
    """Nothing is deleted for age while adjtimex says unsynchronized, however old events look."""
    clock = FakeClock(sync=False)
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    try:
        for i in range(3):
            await buf.put(presence(NOW - 365 * DAY_MS, i))
        await buf.flush()
        assert await buf.enforce_retention() == 0
        assert len(await stored_ids(buf)) == 3
    finally:
        await buf.close()


async def test_events_stamped_while_the_clock_was_wrong_are_not_deleted_when_it_syncs(tmp_path: Path) -> None:
    """A Pi boots at 1970 (no RTC), captures for a minute, then NTP steps the clock to 2026:
    those events are a minute old, not 56 years, and must survive the next retention run."""
    clock = FakeClock(wall=60_000, sync=False)  # 1970-01-01T00:01:00Z, unsynchronized
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    try:
        for i in range(5):
            await buf.put(presence(clock.wall_ms(), i))
            clock.advance(10)
        await buf.flush()
        clock.wall, clock.sync = NOW, True  # NTP steps the clock; one more second passes
        clock.advance(1)
        await buf.enforce_retention()
        assert len(await stored_ids(buf)) == 5
    finally:
        await buf.close()


async def test_a_clock_step_forward_does_not_expire_fresh_events(tmp_path: Path) -> None:
    """Events captured a minute ago; a bad NTP source steps the clock a year ahead while still
    reporting sync. One minute of real time is not seven days of retention."""
    clock = FakeClock(sync=True)
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    try:
        for i in range(5):
            await buf.put(presence(clock.wall_ms(), i))
        await buf.flush()
        clock.advance(60)
        clock.wall += 365 * DAY_MS  # the step: wall moves, monotonic does not
        await buf.enforce_retention()
        assert len(await stored_ids(buf)) == 5
    finally:
        await buf.close()
