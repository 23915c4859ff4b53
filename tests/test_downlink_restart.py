"""The `restart` command end to end: the real daemon drains, exits 75 for the service manager, comes
back, and the redelivered command is a duplicate (tests/restartchild.py runs the daemon).

What must hold: after `restart` every event the pipeline accepted is committed (drain), the exit
status is 75 (systemd/edge.service: RestartForceExitStatus=75), the unit file restarts on it, and
the second start does not run the same command again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.wire.downlink import document, sign_document
from edge.wire.uplink import kid_of, public_raw

ROOT = Path(__file__).resolve().parent.parent
EDGE = str(Path(sys.executable).parent / "edge")
CHILD = str(ROOT / "tests" / "restartchild.py")


def _config(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    doc = {
        "identity": {"tenant": "acme", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"enabled": False},
        "drivers": {"ble": {"backend": "sim", "sim": {"rate": 300, "seed": 1}},
                    "nfc": {"enabled": False}, "pos": []},
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s"},
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = subprocess.run([EDGE, "keys", "init", "--config", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return path


def _run(config: Path, cmd: Path, cloud_hex: str, *, terminate_after_result: bool) -> tuple[int, list[str]]:
    lines: list[str] = []
    with subprocess.Popen([sys.executable, CHILD, str(config), str(cmd), cloud_hex], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.strip())
                if terminate_after_result and line.startswith("result "):
                    time.sleep(0.2)
                    proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=30), lines
        finally:
            if proc.poll() is None:
                proc.kill()


def test_restart_drains_exits_75_and_comes_back_without_running_again(tmp_path: Path) -> None:
    config = _config(tmp_path)
    cloud = Ed25519PrivateKey.generate()
    pub = public_raw(cloud.public_key())
    now = int(time.time() * 1000)
    cmd = tmp_path / "restart.cmd"
    cmd.write_bytes(sign_document(document("cmd", "acme", "s1", "d1", kid_of(pub), now, id="r-1", name="restart",
                                           args={}, exp=now + 300_000), cloud))
    rc, lines = _run(config, cmd, pub.hex(), terminate_after_result=False)
    assert rc == 75, lines
    results = [json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("result ")]
    assert results == [{"id": "r-1", "ok": True, "result": {"restarting": True}}]
    stored, accepted = (int(x) for x in lines[-1].split()[1::2])
    assert accepted >= 20
    assert stored == accepted  # drained: every accepted event committed before the exit
    # the service manager starts it again; the broker delivers the same command once more
    rc2, lines2 = _run(config, cmd, pub.hex(), terminate_after_result=True)
    assert rc2 == 0, lines2
    results2 = [json.loads(ln.split(" ", 1)[1]) for ln in lines2 if ln.startswith("result ")]
    assert [(r["id"], r["error"]) for r in results2] == [("r-1", "duplicate")]
    stored2, accepted2 = (int(x) for x in lines2[-1].split()[1::2])
    assert stored2 == stored + accepted2


def test_the_unit_restarts_on_the_restart_exit_status() -> None:
    unit = (ROOT / "systemd" / "edge.service").read_text().splitlines()
    assert "RestartForceExitStatus=75" in unit
    assert "SuccessExitStatus=75" in unit
