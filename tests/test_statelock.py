"""One daemon per state folder (edge/statelock.py): a second `edge run` on the same folder exits 2
naming the holder's pid, while `edge status` and `edge export` still work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge.clock import SystemClock
from edge.privacy.keys import KeyStore
from edge.statelock import StateLock, StateLocked

EDGE = str(Path(sys.executable).parent / "edge")


def test_a_second_lock_on_the_same_folder_names_the_holder(tmp_path: Path) -> None:
    """Held once; the second acquire raises StateLocked with the holder's pid; released, it is free."""
    with StateLock(tmp_path / "state"):
        with pytest.raises(StateLocked) as info:
            StateLock(tmp_path / "state").acquire()
        assert info.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value)
        with StateLock(tmp_path / "other"):  # another folder is another lock
            pass
    with StateLock(tmp_path / "state"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """The kernel drops a flock when its holder dies, even by SIGKILL: a restart is never blocked."""
    code = ("import sys, time; from pathlib import Path; from edge.statelock import StateLock; "
            "StateLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"
        with pytest.raises(StateLocked) as info:
            StateLock(tmp_path).acquire()
        assert info.value.pid == child.pid
    finally:
        child.kill()
        child.communicate()
    with StateLock(tmp_path):
        pass


def test_second_daemon_on_one_state_folder_exits_2_and_read_only_commands_still_work(tmp_path: Path) -> None:
    """Two real `edge run` on one state folder: the second exits 2 naming the first's pid and
    leaves the buffer alone; `edge status` and `edge export` work while the first runs; the
    first stops cleanly."""
    state = tmp_path / "state"
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-lock"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"enabled": False},
        "drivers": {"ble": {"backend": "sim", "sim": {"rate": 50}}, "nfc": {"backend": "sim"}},
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s"},
        "logging": {"format": "json"},
    }))
    KeyStore(state / "keys", SystemClock()).init()
    first = subprocess.Popen([EDGE, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        runtime = state / "runtime.json"
        deadline = time.monotonic() + 30
        while not (runtime.exists() and json.loads(runtime.read_text() or "{}").get("state") == "running"):
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first daemon did not come up"
            time.sleep(0.1)
        second = subprocess.run([EDGE, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=30,
                                check=False)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert str(state) in second.stderr
        assert "UNIQUE constraint" not in second.stdout + second.stderr
        status = subprocess.run([EDGE, "status", "--config", str(cfg), "--json"], capture_output=True, text=True,
                                timeout=30, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["runtime"]["pid"] == first.pid
        out = tmp_path / "events.jsonl"
        export = subprocess.run([EDGE, "export", "--config", str(cfg), "--out", str(out)], capture_output=True,
                                text=True, timeout=30, check=False)
        assert export.returncode == 0, export.stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            _, err = first.communicate(timeout=15)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert first.returncode == 0, err[-2000:]
