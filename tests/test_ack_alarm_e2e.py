"""The ack alarm end to end (issue 18 point 3): a real `edge run` whose `uplink.cloud_public_key` is
NOT the key of the real receiver (`edge-cloud receive`, with a cloud key of its own) on a real
Mosquitto. Every genuine ack is refused `bad-signature`, batches wait, and after
`health.ack_timeout_alarm` (3 s here) GET /healthz answers 503 naming the reason and `edge status`
prints the ALARM line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from support.cloudkey import CLOUD_PUBLIC_HEX
from support.mosquitto import Mosquitto, free_port

BIN = Path(sys.executable).parent
EDGE, EDGE_CLOUD = str(BIN / "edge"), str(BIN / "edge-cloud")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False)


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_wrong_cloud_key_makes_healthz_503_and_edge_status_loud(tmp_path: Path, mosquitto: Mosquitto) -> None:
    state, rdir = tmp_path / "state", tmp_path / "receiver"
    state.mkdir()
    rdir.mkdir()
    port = free_port()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-al"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        # the test key, not the receiver's: every genuine ack fails its signature check
        "uplink": {"broker": mosquitto.url, "cloud_public_key": CLOUD_PUBLIC_HEX, "protocol": "3.1.1",
                   "window": 2, "ack_timeout": "2s", "batch": {"max_events": 5, "linger": "50ms"}},
        "drivers": {"ble": {"backend": "sim", "sim": {"rate": 20, "seed": 1}}},
        "health": {"listen": f"127.0.0.1:{port}", "ack_timeout_alarm": "3s", "drain_timeout": "3s"},
        "logging": {"level": "info", "format": "json"},
    }))  # fmt: skip
    res = _run(EDGE, "keys", "init", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    device_pub = json.loads(_run(EDGE, "keys", "show", "--config", str(cfg), "--json").stdout)["public_key"]
    res = _run(EDGE_CLOUD, "keys", "create", "--out", str(rdir / "cloud.key"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["public_key"] != CLOUD_PUBLIC_HEX
    keys = rdir / "keys" / "acme" / "s001"
    keys.mkdir(parents=True)
    (keys / "edge-al.pub").write_text(device_pub + "\n")
    rcfg = rdir / "receiver.yaml"
    rcfg.write_text(yaml.safe_dump({
        "broker": mosquitto.url, "protocol": "3.1.1", "prefix": "edge/v1", "keys_dir": str(rdir / "keys"),
        "db": str(rdir / "receiver.db"), "out": str(rdir / "events.jsonl"), "cloud_key": str(rdir / "cloud.key"),
        "logging": {"level": "info", "format": "json"},
    }))  # fmt: skip

    with (tmp_path / "receiver.log").open("w") as rlog, (tmp_path / "edge.log").open("w") as elog:
        receiver = subprocess.Popen([EDGE_CLOUD, "receive", "--config", str(rcfg)], stdout=rlog, stderr=rlog)
        daemon = subprocess.Popen([EDGE, "run", "--config", str(cfg)], stdout=elog, stderr=elog)
        try:
            deadline = time.monotonic() + 40
            code, doc = 0, dict[str, Any]()
            while time.monotonic() < deadline:
                assert daemon.poll() is None, (tmp_path / "edge.log").read_text()[-3000:]
                assert receiver.poll() is None, (tmp_path / "receiver.log").read_text()[-3000:]
                code, doc = _healthz(port)
                if code == 503:
                    break
                time.sleep(0.3)
            assert code == 503, (doc, (tmp_path / "edge.log").read_text()[-3000:])
            assert doc["status"] == "degraded"
            assert doc["ack_alarm"]["refused"].get("bad-signature", 0) >= 1, doc
            assert any(r.startswith("uplink: ") and "bad-signature" in r for r in doc["reasons"]), doc
            # the receiver did store and ack them: the refusal is the device's wrong key, not silence
            assert (rdir / "events.jsonl").stat().st_size > 0

            status = _run(EDGE, "status", "--config", str(cfg))
            assert status.returncode == 0, status.stderr
            alarm = [ln for ln in status.stdout.splitlines() if ln.startswith("ALARM")]
            assert alarm, status.stdout
            assert "batches unacknowledged for" in alarm[0]
            assert "bad-signature" in status.stdout
        finally:
            _stop(daemon)
            _stop(receiver)
    assert "ack_rejected" in (tmp_path / "edge.log").read_text()
