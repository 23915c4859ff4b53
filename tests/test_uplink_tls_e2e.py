"""The uplink over TLS with required client certificates, end to end (issue 3, tests 1 and 7).

A real Mosquitto with a TLS listener that requires a client certificate signed by the test CA
(conftest's `mosquitto_tls`). What must hold:
- daemon -> TLS broker -> reference receiver (also over TLS with its own certificate): every event
  arrives exactly once, verified, and the batches seen on the broker form an intact chain;
- a daemon presenting a certificate from another CA, or none, is refused, and the daemon's own
  log (`edge run`, JSON on stdout) names the cause instead of a bare timeout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.certs import CertPaths
from support.mosquitto import Mosquitto
from uplink_e2e import EDGE, ROOT, capture, check_chain, eventually, received_ids

from cloud.config import ReceiverConfig
from cloud.identity import register_key
from cloud.receiver import Receiver
from edge.clock import SystemClock
from edge.config import Config, Tls
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.service import Uplink, uplink_component

pytestmark = pytest.mark.mosquitto

DEVICE = "dev-test-01"  # the CN of the test client certificate (support.certs)


def _doc(state: Path, broker: str, tls: dict[str, str], cloud_pub: str | None = None) -> dict[str, Any]:
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": DEVICE},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {
            "broker": broker, "tls": tls, "cloud_public_key": cloud_pub, "window": 8,
            "batch": {"max_events": 100, "linger": "50ms"}, "ack_timeout": "5s",
            "reconnect": {"initial": "200ms", "max": "1s"},
        },
        "drivers": {
            "ble": {"sim": {"rate": 300, "seed": 1}},
            "nfc": {"sim": {"rate": 30, "seed": 2}},
            "pos": [{"name": "till-1", "sim": {"rate": 10, "seed": 3}}],
        },
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s"},
        "logging": {"level": "info", "format": "json"},
    }  # fmt: skip


async def test_tls_with_client_certificates_delivers_everything_once_verified(
    tmp_path: Path, mosquitto_tls: Mosquitto, tls_certs: CertPaths
) -> None:
    """daemon --mqtts, client cert--> mosquitto --mqtts, client cert--> receiver: all events once,
    no rejection, and the captured batches verify as one chain."""
    certs = tls_certs
    tls = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
    cloud = Ed25519PrivateKey.generate()
    (tmp_path / "cloud.key").write_text(cloud.private_bytes_raw().hex())
    (tmp_path / "cloud.key").chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    cfg = Config.model_validate(_doc(state, mosquitto_tls.tls_url, tls, cloud.public_key().public_bytes_raw().hex()))
    clock = SystemClock()
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    (tmp_path / "rkeys").mkdir()
    register_key(tmp_path / "rkeys", ("acme", "s001", DEVICE), keys.public_key().hex())
    rcfg = ReceiverConfig(
        broker=mosquitto_tls.tls_url, tls=Tls.model_validate(tls), client_id="tls-receiver",
        keys_dir=tmp_path / "rkeys", db=tmp_path / "r.db", out=tmp_path / "events.jsonl",
        cloud_key=tmp_path / "cloud.key",
    )  # fmt: skip
    receiver = Receiver(rcfg)
    rstop = asyncio.Event()
    rtask = asyncio.create_task(receiver.run(rstop))
    await asyncio.wait_for(receiver.ready.wait(), 15)
    sup = Supervisor(cfg, clock, components=[uplink_component])
    stop = asyncio.Event()
    try:
        # the capture listens on the broker's plain listener: it sees what the TLS clients sent
        async with capture(mosquitto_tls.host, mosquitto_tls.port) as cap:
            task = asyncio.create_task(sup.run(stop))
            try:
                assert await eventually(lambda: sup.runtime is not None and sup.runtime.components, 15)
                rt = sup.runtime
                assert rt is not None
                up = rt.components[0]
                assert isinstance(up, Uplink)
                assert await eventually(lambda: up.counters["events_acked"] >= 500, 20), up.status()
                assert up.broker == mosquitto_tls.tls_url
                generated = await sup.stop_drivers()
                assert await eventually(lambda: up.counters["events_acked"] >= generated, 30), up.status()
                assert up.counters["acks_forged"] == 0
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    finally:
        rstop.set()
        await asyncio.wait_for(rtask, 20)
    ids = received_ids(tmp_path / "events.jsonl")
    assert sorted(ids) == list(range(1, generated + 1))  # every event, once
    assert receiver.stats.rejected == {}
    assert receiver.stats.accepted == up.counters["acked"]
    chain = check_chain(cap, keys.public_key())
    assert len(chain) == up.counters["acked"]


def _log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(ln)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def test_refused_client_certificates_are_named_in_the_daemon_log(
    tmp_path: Path, mosquitto_tls: Mosquitto, tls_certs: CertPaths
) -> None:
    """Two `edge run` daemons against the TLS listener: one with a client certificate from a rogue CA,
    one with none. Each keeps running, publishes nothing, and logs `uplink_down` with a cause that
    names the refusal (client certificate rejected / required), the broker URL and a hint."""
    certs = tls_certs
    cases = {
        "rogue": ({"ca_file": str(certs.ca), "cert_file": str(certs.rogue_client_cert),
                   "key_file": str(certs.rogue_client_key)}, "the broker rejected our client certificate"),
        "none": ({"ca_file": str(certs.ca)}, "requires a client certificate"),
    }  # fmt: skip
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for name, (tls, _) in cases.items():
            state = tmp_path / name
            state.mkdir()
            KeyStore(state / "keys", SystemClock()).init()
            cfg = tmp_path / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(_doc(state, mosquitto_tls.tls_url, tls)))
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([EDGE, "run", "--config", str(cfg)], cwd=ROOT, stdout=out,
                                        stderr=subprocess.STDOUT)  # fmt: skip
            procs[name] = (proc, log)
        deadline = time.monotonic() + 60  # a TLS 1.3 refusal first shows as the 10 s connect timeout
        causes: dict[str, str] = {}
        while len(causes) < len(cases) and time.monotonic() < deadline:
            for name, (proc, log) in procs.items():
                assert proc.poll() is None, log.read_text()[-3000:]
                down = [e for e in _log_events(log) if e.get("event") == "uplink_down"]
                if down:
                    causes[name] = str(down[0]["cause"])
            time.sleep(0.2)
        for name, (_, expected) in cases.items():
            assert name in causes, procs[name][1].read_text()[-3000:]
            assert expected in causes[name]
            assert mosquitto_tls.tls_url in causes[name]
            assert "hint:" in causes[name]
        for proc, log in procs.values():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()[-3000:]
            events = [e.get("event") for e in _log_events(log)]
            assert "uplink_up" not in events
            assert "uplink_stop_forced" not in events
            assert "component_stop_failed" not in events
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
