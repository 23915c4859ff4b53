"""Zeroconf: a running `edge run` announces `_store-edge._tcp` (TXT device, version, metrics port),
and says goodbye when it stops.

mDNS is multicast, so everything runs inside a private network namespace whose only interface
is a multicast-enabled loopback (as in test_discovery.py): the daemon subprocess announces, a
zeroconf browser in the same namespace finds it. Where namespaces are not allowed it skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.netns import namespace_prefix

from edge import __version__
from edge.advertise import SERVICE_TYPE, service_info
from edge.clock import SystemClock
from edge.config import Config
from edge.privacy.keys import KeyStore

REPO = Path(__file__).resolve().parents[1]
EDGE = str(Path(sys.executable).parent / "edge")

# Runs inside the namespace: start the daemon, browse for it, stop it, watch it leave.
SCENARIO = r"""
import asyncio, json, signal, subprocess, sys
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

EDGE, CONFIG, TYPE = sys.argv[1:4]

async def main():
    out = {}
    events = asyncio.Queue()
    loop = asyncio.get_running_loop()
    azc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    def on_change(zeroconf, service_type, name, state_change):
        loop.call_soon_threadsafe(events.put_nowait, (name, state_change.name))
    browser = AsyncServiceBrowser(azc.zeroconf, [TYPE], handlers=[on_change])
    daemon = subprocess.Popen([EDGE, "run", "--config", CONFIG], stdout=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(40):
            while True:
                name, change = await events.get()
                if change != "Removed":
                    break
        info = AsyncServiceInfo(TYPE, name)
        assert await info.async_request(azc.zeroconf, 5000)
        out["name"] = name
        out["port"] = info.port
        out["txt"] = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        out["addresses"] = info.parsed_addresses()
        daemon.send_signal(signal.SIGTERM)
        out["exit"] = daemon.wait(30)
        async with asyncio.timeout(10):
            while True:
                gone, change = await events.get()
                if gone == name and change == "Removed":
                    out["removed"] = True
                    break
    finally:
        if daemon.poll() is None:
            daemon.kill()
        await browser.async_cancel()
        await azc.async_close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def announced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a private network namespace (unshare -n / -rn); mDNS is not "
                    "tested here rather than multicast on a real network")
    d = tmp_path_factory.mktemp("advertise")
    state = d / "state"
    doc = {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-zc"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": {"enabled": False},
        "drivers": {"ble": {"backend": "sim", "sim": {"rate": 5}}, "nfc": {"enabled": False}},
        "health": {"listen": "127.0.0.1:0", "advertise": True, "drain_timeout": "3s"},
        "logging": {"format": "json"},
    }
    config = d / "edge.yaml"
    config.write_text(yaml.safe_dump(doc))
    KeyStore(state / "keys", SystemClock()).init()
    script = d / "scenario.py"
    script.write_text(SCENARIO)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, "-W", "error", str(script), EDGE, str(config), SERVICE_TYPE],
                          capture_output=True, text=True, timeout=100, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    runtime = json.loads((state / "runtime.json").read_text())
    result["health_listen"] = runtime["components"]["health"]["listen"]
    return result


def test_the_daemon_announces_itself_with_device_version_and_metrics_port(announced: dict[str, Any]) -> None:
    """`<device>._store-edge._tcp.local.`, SRV port = the bound metrics port, TXT as documented."""
    assert announced["name"] == "edge-zc._store-edge._tcp.local."
    txt = announced["txt"]
    assert txt["device"] == "edge-zc"
    assert txt["version"] == __version__
    port = int(announced["health_listen"].rpartition(":")[2])
    assert txt["metrics_port"] == str(port)
    assert announced["port"] == port
    assert txt["metrics"] == "local"  # bound to loopback: reach it through an SSH tunnel
    assert announced["addresses"]


def test_the_announcement_is_withdrawn_when_the_daemon_stops(announced: dict[str, Any]) -> None:
    """SIGTERM: exit 0 and a goodbye, so a technician's browser drops the box at once."""
    assert announced["exit"] == 0
    assert announced["removed"] is True


def test_service_info_without_health_announces_port_zero(tmp_path: Path) -> None:
    """Health disabled: nothing to scrape, metrics_port 0 (pure: no network)."""
    cfg = Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-zc"},
        "health": {"enabled": False},
    })  # fmt: skip
    info = service_info(cfg, ["192.0.2.10"], hostname="box-7")
    assert info.port == 0
    assert info.properties[b"metrics_port"] == b"0"
    assert info.server == "box-7.local."
    assert info.type == "_store-edge._tcp.local."
