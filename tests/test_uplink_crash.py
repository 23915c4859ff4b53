"""The real daemon (`edge run`) SIGKILLed again and again while it syncs to a real Mosquitto.

What must hold (issue 3, tests 3 and 4): nothing committed is lost; every resend is byte-identical
to the first publication of its seq (captured on the broker by a raw subscriber); the chain is
intact (verified independently from the captured bytes and by the receiver); the receiver, itself
stopped (SIGSTOP) and restarted mid-stream, stores every event exactly once.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.mosquitto import Mosquitto
from uplink_e2e import (
    EDGE,
    ROOT,
    ReceiverProcess,
    capture,
    check_chain,
    events_of,
    eventually,
    received_ids,
    receiver_yaml,
)

from cloud.identity import register_key
from edge.buffer.stats import read_stats
from edge.clock import SystemClock
from edge.privacy.keys import KeyStore

pytestmark = pytest.mark.mosquitto

DEVICE = "edge-crash"
KILLS = 6


def _doc(state: Path, broker: str, cloud_pub: str, *, drivers: bool) -> dict[str, Any]:
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": DEVICE},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {
            "broker": broker, "cloud_public_key": cloud_pub, "window": 8,
            "batch": {"max_events": 40, "linger": "30ms"}, "ack_timeout": "20s",
            "reconnect": {"initial": "100ms", "max": "300ms"},
        },
        "drivers": {
            "ble": {"enabled": drivers, "sim": {"rate": 300, "seed": 1}},
            "nfc": {"enabled": drivers, "sim": {"rate": 30, "seed": 2}},
            "pos": [{"name": "till-1", "sim": {"rate": 10, "seed": 3}}] if drivers else [],
        },
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s"},
        "logging": {"level": "info", "format": "json"},
    }  # fmt: skip


class Daemon:
    """`edge run --config` as a subprocess; its JSON log goes to a file per run."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with (self.logs / f"daemon-{self.runs}.log").open("wb") as out:
            self.proc = subprocess.Popen([EDGE, "run", "--config", str(self.config)], cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log_tail()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return (self.logs / f"daemon-{self.runs}.log").read_text(errors="replace")[-3000:]


def _keys(state: Path) -> bytes:
    ks = KeyStore(state / "keys", SystemClock())
    ks.init()
    return ks.public_key()


async def test_sigkilled_daemon_loses_nothing_resends_identical_bytes_and_keeps_the_chain(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """SIGKILL at random moments (some while the receiver is SIGSTOPped, so batches are in flight
    unacked; one receiver restart mid-stream): after a final drain every committed event id is in
    the receiver's output exactly once, each seq's copies on the broker are byte-identical, the
    captured chain verifies, and the receiver deduplicated the resends it got twice."""
    rng = random.Random(3)
    state = tmp_path / "state"
    state.mkdir()
    public = _keys(state)
    rkeys = tmp_path / "rkeys"
    rkeys.mkdir()
    register_key(rkeys, ("acme", "s001", DEVICE), public.hex())
    cloud = Ed25519PrivateKey.generate()
    cloud_file = tmp_path / "cloud.key"
    cloud_file.write_text(cloud.private_bytes_raw().hex())
    cloud_file.chmod(0o600)
    cloud_pub = cloud.public_key().public_bytes_raw().hex()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(_doc(state, mosquitto.url, cloud_pub, drivers=True)))
    (tmp_path / "rcv").mkdir()
    rconf = receiver_yaml(tmp_path / "rcv" / "receiver.yaml", broker=mosquitto.url, keys_dir=rkeys,
                          cloud_key=cloud_file)  # fmt: skip
    receiver = ReceiverProcess(rconf, tmp_path / "rcv" / "receiver.log")
    daemon = Daemon(cfg, tmp_path)
    receiver.start()
    paused_rounds = {1, 4}
    try:
        async with capture(mosquitto.host, mosquitto.port) as cap:
            for round_ in range(KILLS):
                before = len(cap.seen)
                daemon.start()
                assert await cap.wait_count(before + 3, 30), daemon.log_tail()
                if round_ - 1 in paused_rounds:
                    # the restarted daemon resent what was in flight: now the receiver gets both copies
                    receiver.signal(signal.SIGCONT)
                if round_ == 2:
                    receiver.stop()  # the receiver restarted mid-stream
                    receiver.start()
                await asyncio.sleep(rng.uniform(0.2, 1.2))
                if round_ in paused_rounds:
                    receiver.signal(signal.SIGSTOP)  # acks stop: the window fills with published batches
                    assert await cap.wait_count(len(cap.seen) + 3, 20), daemon.log_tail()
                daemon.kill()
            # last run without drivers: the backlog drains completely
            cfg.write_text(yaml.safe_dump(_doc(state, mosquitto.url, cloud_pub, drivers=False)))
            daemon.start()

            def drained() -> bool:
                s = read_stats(state / "buffer.db")
                return s.batches_pending == 0 and not any(b.events for b in s.backlog.values())

            assert await eventually(drained, 60), daemon.log_tail()
            assert daemon.terminate() == 0, daemon.log_tail()
            assert "component_stop_failed" not in daemon.log_tail()  # a clean stop, not a forced one
            assert "uplink_stop_forced" not in daemon.log_tail()
            await asyncio.sleep(0.5)  # the last acks' duplicates, if any, reach the capture
    finally:
        if daemon.alive():
            daemon.terminate()
        receiver.stop()

    stats = read_stats(state / "buffer.db")
    assert stats.batches_quarantined == 0
    chain = check_chain(cap, public)
    assert max(chain) == stats.next_seq - 1  # every sealed batch went out
    resent = {seq for seq, copies in cap.by_seq().items() if len(copies) > 1}
    assert resent, "no batch was ever resent: the kills did not hit in-flight batches"

    committed = set(range(1, stats.next_event_id))
    on_wire = [e["id"] for p in chain.values() for e in events_of(p)]
    assert sorted(on_wire) == sorted(committed)  # every committed event sealed, none twice
    ids = received_ids(tmp_path / "rcv" / "events.jsonl")
    assert len(ids) == len(set(ids)), "an event was written twice"
    assert set(ids) == committed  # nothing lost
    assert receiver.rejected() == {}
    assert receiver.total("resets") == 0
    assert receiver.total("accepted") == max(chain)
    assert receiver.total("duplicates") >= 1, "the receiver never had to deduplicate"
    assert daemon.runs == KILLS + 1
