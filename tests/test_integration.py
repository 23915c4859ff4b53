"""The whole product from the outside: the `edge` command, the daemon, privacy end to end, acks.

Everything runs for real: the installed `edge` entry point as a subprocess, the supervisor with
simulated drivers, SQLite, and mosquitto for the uplink. Each test stays well under 20 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.mosquitto import Mosquitto

from drivers.base import SimOptions
from drivers.registry import build_drivers
from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.events import IdentClass
from edge.leakscan import Needle, needles_for, scan
from edge.logs import configure_logging
from edge.privacy.keys import KeyStore
from edge.status import export_main
from edge.supervisor import Supervisor
from edge.uplink.service import Uplink, uplink_component
from edge.wire.uplink import make_ack

ROOT = Path(__file__).resolve().parent.parent
EDGE = str(Path(sys.executable).parent / "edge")
DEMO_CONFIG = ROOT / "config" / "demo.yaml"

INJECTED: tuple[tuple[IdentClass, str], ...] = (
    ("ble_address", "D4:21:8B:70:F3:5C"),
    ("nfc_uid", "04F6E5D4C3B2A1"),
    ("loyalty_id", "812093645172"),
    ("card_number", "4111 1111 1111 1111"),
    ("email", "john.roe@example.org"),
    ("phone", "+44 20 7946 0958"),
)


def edge(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def device_doc(state: Path, *, rate: float = 200.0, uplink: dict[str, Any] | None = None) -> dict[str, Any]:
    """A minimal device config: simulated BLE/NFC/POS at `rate`, state and keys under `state`."""
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-it"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": uplink if uplink is not None else {"enabled": False},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": rate, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": rate / 4, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": rate / 10, "seed": 3}}],
        },
        "health": {"drain_timeout": "5s"},
        "logging": {"level": "info", "format": "json"},
    }


def write_config(tmp_path: Path, **kw: Any) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(device_doc(state, **kw)))
    return cfg


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# -- 1. the demo -------------------------------------------------------------------------------


def test_demo_delivers_every_event_verified_and_leaks_no_identifier(tmp_path: Path) -> None:
    """`edge demo` exits 0 and its summary shows every generated event received on an intact chain, no leak."""
    summary = tmp_path / "summary.json"
    res = edge("demo", "--duration", "4", "--summary", str(summary), "--state", str(tmp_path / "st"),
               cwd=tmp_path, timeout=90)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(summary.read_text())
    assert (doc["tenant"], doc["store"], doc["device"]) == ("demo", "store-001", "edge-demo")
    assert len(doc["kid"]) == 16
    assert int(doc["kid"], 16) >= 0
    assert len(doc["public_key"]) == 64
    assert int(doc["public_key"], 16) >= 0
    assert doc["kid"] == hashlib.sha256(bytes.fromhex(doc["public_key"])).digest()[:8].hex()
    assert doc["events_generated"] > 0
    assert doc["events_generated"] == doc["events_received"]
    assert doc["batches_acked"] > 0
    assert doc["raw_identifiers_found"] == 0
    assert doc["chain_intact"] is True


# -- 2. the command line ------------------------------------------------------------------------


def test_version_and_the_shipped_demo_config_is_valid(tmp_path: Path) -> None:
    """`edge --version` names the product; `edge check-config config/demo.yaml` exits 0."""
    res = edge("--version", cwd=tmp_path)
    assert res.returncode == 0
    assert "store-edge" in res.stdout
    res = edge("check-config", str(DEMO_CONFIG), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_bad_config_exits_2_with_problems_not_a_traceback(tmp_path: Path) -> None:
    """A config with an unknown key and a wrong type exits 2 and explains itself without a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("identity: {tenant: a, store: b, device: c}\nbogus_key: 1\nuplink: {window: lots}\n")
    res = edge("check-config", str(bad), cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
    res = edge("run", "--config", str(bad), cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr


def test_keys_init_show_and_refuse_to_overwrite(tmp_path: Path) -> None:
    """keys init creates 0600 files once; a second init without --force fails; show prints kid + public key."""
    cfg = write_config(tmp_path)
    res = edge("keys", "init", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    files = [p for p in (tmp_path / "state" / "keys").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    before = {p: p.read_bytes() for p in files}
    res = edge("keys", "init", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert {p: p.read_bytes() for p in files} == before
    res = edge("keys", "show", "--config", str(cfg), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc) == {"kid", "public_key"}
    assert doc["kid"] == hashlib.sha256(bytes.fromhex(doc["public_key"])).digest()[:8].hex()


def test_run_without_keys_exits_1_and_says_how_to_create_them(tmp_path: Path) -> None:
    """`edge run` on a device without keys exits 1 and points at `edge keys init`."""
    cfg = write_config(tmp_path)
    res = edge("run", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert "edge keys init" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr


# -- 3. the daemon drains on SIGTERM and keeps its ids ----------------------------------------------


def run_then_sigterm(cfg: Path, cwd: Path, seconds: float = 2.0) -> float:
    """Run the daemon for `seconds`, SIGTERM it; returns how long it took to exit (must exit 0)."""
    proc = subprocess.Popen([EDGE, "run", "--config", str(cfg)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(seconds)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=5 + 5)  # drain_timeout 5 s + 5 s
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return took


def backlog_events(cfg: Path, cwd: Path) -> int:
    res = edge("status", "--config", str(cfg), "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    return sum(int(s["events"]) for s in doc["buffer"]["backlog"].values())


def test_daemon_drains_on_sigterm_and_ids_continue_across_restarts(tmp_path: Path) -> None:
    """SIGTERM stops the daemon with exit 0; the backlog is exportable in id order; a restart continues ids."""
    cfg = write_config(tmp_path)
    assert edge("keys", "init", "--config", str(cfg), cwd=tmp_path).returncode == 0
    run_then_sigterm(cfg, tmp_path)
    n1 = backlog_events(cfg, tmp_path)
    assert n1 > 0
    out1 = tmp_path / "export1.jsonl"
    res = edge("export", "--config", str(cfg), "--out", str(out1), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ids1 = [e["id"] for e in read_lines(out1)]
    assert len(ids1) == n1
    assert all(a < b for a, b in itertools.pairwise(ids1))

    run_then_sigterm(cfg, tmp_path)
    out2 = tmp_path / "export2.jsonl"
    assert edge("export", "--config", str(cfg), "--out", str(out2), cwd=tmp_path).returncode == 0
    ids2 = [e["id"] for e in read_lines(out2)]
    assert all(a < b for a, b in itertools.pairwise(ids2))
    new = [i for i in ids2 if i > max(ids1)]
    assert new, "the second run committed nothing new"
    assert ids2[: len(ids1)] == ids1
    assert len(ids2) == backlog_events(cfg, tmp_path)


# -- 4. privacy through the whole daemon ----------------------------------------------------------


def _needles() -> list[Needle]:
    out: list[Needle] = []
    for cls, raw in INJECTED:
        out.extend(needles_for(cls, raw))
    return out


def _strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for x in v.values() for s in _strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in _strings(x)]
    return []


async def run_supervisor(cfg: Config, clock: Clock, seconds: float, **kw: Any) -> Supervisor:
    sup = Supervisor(cfg, clock, **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    await asyncio.sleep(seconds)
    assert not task.done(), task.exception() if task.done() else None
    stop.set()
    await asyncio.wait_for(task, 15)
    return sup


async def test_injected_identifiers_never_reach_the_buffer_the_export_or_the_logs(tmp_path: Path) -> None:
    """One raw identifier of each class through every simulated device: none is found anywhere afterwards."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = Config.model_validate(device_doc(state))
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init()
    logfile = state / "edge.log"
    inject = tuple(f"{cls}:{raw}" for cls, raw in INJECTED)
    with logfile.open("a", encoding="utf-8") as fh:
        configure_logging("debug", "json", fh)
        try:
            await run_supervisor(
                cfg, clock, 2.0,
                drivers=lambda c, k: build_drivers(c, k, sim=SimOptions(inject=inject)),
            )  # fmt: skip
        finally:
            configure_logging("info", "json", sys.stderr)
    export = tmp_path / "export.jsonl"
    cfg_file = tmp_path / "edge.yaml"
    cfg_file.write_text(yaml.safe_dump(device_doc(state)))
    assert await asyncio.to_thread(export_main, str(cfg_file), str(export)) == 0
    events = read_lines(export)
    assert events
    values = [s for e in events for s in _strings(e.get("data"))]
    assert any(s.startswith("ble:") for s in values), "no BLE pseudonym: was anything injected?"
    assert any(s.startswith("loy:") for s in values), "no loyalty pseudonym: was anything injected?"
    assert logfile.stat().st_size > 0
    assert scan([state, export, logfile], _needles()) == []


# -- 5. a forged ack over real mosquitto ----------------------------------------------------------


@pytest.mark.mosquitto
async def test_forged_ack_deletes_nothing_when_a_cloud_key_is_configured(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """An ok ack for a held batch, signed by a key other than the cloud's, is counted forged and deletes nothing."""
    cloud = Ed25519PrivateKey.generate()
    cloud_pub = cloud.public_key().public_bytes_raw().hex()
    state = tmp_path / "state"
    state.mkdir()
    doc = device_doc(state, rate=50, uplink={
        "broker": mosquitto.url, "cloud_public_key": cloud_pub, "window": 4,
        "batch": {"max_events": 50, "linger": "50ms"}, "ack_timeout": "30s",
        "reconnect": {"initial": "100ms", "max": "1s"},
    })  # fmt: skip
    cfg = Config.model_validate(doc)
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init()
    sup = Supervisor(cfg, clock, components=[uplink_component])
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="it-cloud") as cloud_client:
            deadline = time.monotonic() + 10
            pending: list[Any] = []
            while time.monotonic() < deadline:
                rt = sup.runtime
                if rt is not None and rt.components:
                    up = rt.components[0]
                    assert isinstance(up, Uplink)
                    if up.counters["published"] > 0:
                        pending = await rt.buffer.pending_batches()
                        if pending:
                            break
                await asyncio.sleep(0.05)
            assert pending, "no batch was sealed and published"
            rt = sup.runtime
            assert rt is not None
            up = rt.components[0]
            assert isinstance(up, Uplink)
            rogue = Ed25519PrivateKey.generate()
            await sup.stop_drivers()  # nothing new gets sealed while we look
            before = {(b.seq, b.hh) for b in await rt.buffer.pending_batches()}
            for b in pending:
                ack = make_ack(tenant="acme", store="s001", device="edge-it", seq=b.seq, hh=b.hh, ok=True, key=rogue)
                await cloud_client.publish("edge/v1/acme/s001/edge-it/ack", ack, qos=1)
            for _ in range(100):  # up to 5 s
                if up.counters["acks_forged"] >= len(pending):
                    break
                await asyncio.sleep(0.05)
            assert up.counters["acks_forged"] >= len(pending)
            assert up.counters["acked"] == 0
            after = {(b.seq, b.hh) for b in await rt.buffer.pending_batches()}
            assert {(b.seq, b.hh) for b in pending} <= after
            assert before <= after
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def test_edge_binary_is_the_venv_entry_point() -> None:
    """Sanity: the tests run the installed `edge` next to this interpreter."""
    assert os.access(EDGE, os.X_OK) or shutil.which("edge") is not None
