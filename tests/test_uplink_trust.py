"""The edge trusts only the cloud's signature, over a real Mosquitto with an attacker client on it.

- a forged unsigned ok-ack and a forged unsigned chain-broken delete and quarantine nothing (counted);
- a signed chain-broken quarantines; a signed other rejection (unknown-key) means "resend later":
  the batch stays, is published again after the backoff, and the reason is counted;
- MQTT 5: a message above the Maximum Packet Size on the ack topic never reaches the edge;
- client ids carry tenant, store, device and a kept random suffix, so two stores' `edge-01` on one
  broker never kick each other; the daemon's files come out 0600 under umask 022.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from support.cloudkey import CLOUD_KEY, CLOUD_PUBLIC_HEX
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.config import Config
from edge.events import Pending
from edge.privacy.keys import KeyStore
from edge.supervisor import Supervisor
from edge.uplink.clientid import SUFFIX_FILE, client_id, short_client_id
from edge.uplink.service import Uplink, uplink_component
from edge.uplink.wire import make_ack

pytestmark = pytest.mark.mosquitto


def _config(state: Path, url: str, *, store: str = "s001", **uplink: Any) -> Config:
    return Config.model_validate({
        "identity": {"tenant": "acme", "store": store, "device": "edge-01"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"broker": url, "cloud_public_key": CLOUD_PUBLIC_HEX, "window": 4, "ack_timeout": "60s",
                   "batch": {"max_events": 10, "linger": "20ms"},
                   "reconnect": {"initial": "300ms", "max": "600ms"}, **uplink},
    })  # fmt: skip


@asynccontextmanager
async def _running(state: Path, url: str, **kw: Any) -> AsyncIterator[tuple[Supervisor, Uplink]]:
    state.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - test setup, before anything runs
    cfg = _config(state, url, **kw)
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init(force=True)
    sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component])
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        while sup.runtime is None or not sup.runtime.components:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        up = sup.runtime.components[0]
        assert isinstance(up, Uplink)
        assert await _until(lambda: up.state == "online", 10), up.status()
        yield sup, up
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _until(cond: Callable[[], object], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


async def _one_batch_in_flight(sup: Supervisor, up: Uplink) -> tuple[int, bytes]:
    rt = sup.runtime
    assert rt is not None
    for i in range(5):
        await rt.buffer.put(Pending(ts=rt.clock.wall_ms(), src="edge", type="edge.test", data={"i": i}))
    await rt.buffer.flush()
    up.notify()
    assert await _until(lambda: up.counters["published"] >= 1, 10), up.status()
    pending = await rt.buffer.pending_batches()
    assert len(pending) == 1
    return pending[0].seq, pending[0].hh


ACK = "edge/v1/acme/s001/edge-01/ack"


async def test_forged_unsigned_ok_and_chain_broken_change_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """An attacker on the broker answers the held batch with an unsigned ok-ack and an unsigned
    chain-broken (and one signed by its own key): the batch stays pending, nothing is quarantined,
    all three are counted (acks_unsigned 2, acks_forged 1)."""
    async with _running(tmp_path / "state", mosquitto.url) as (sup, up):
        seq, hh = await _one_batch_in_flight(sup, up)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as attacker:
            ids: dict[str, Any] = {"tenant": "acme", "store": "s001", "device": "edge-01", "seq": seq, "hh": hh}
            await attacker.publish(ACK, make_ack(**ids, ok=True), qos=1)
            await attacker.publish(ACK, make_ack(**ids, ok=False, err="chain-broken"), qos=1)
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            rogue = Ed25519PrivateKey.generate()
            await attacker.publish(ACK, make_ack(**ids, ok=True, key=rogue), qos=1)
        assert await _until(lambda: up.counters["acks_unsigned"] + up.counters["acks_forged"] >= 3, 5)
        rt = sup.runtime
        assert rt is not None
        assert [(b.seq, b.hh) for b in await rt.buffer.pending_batches()] == [(seq, hh)]
        assert (up.counters["acks_unsigned"], up.counters["acks_forged"]) == (2, 1)
        assert (up.counters["acked"], up.counters["rejected"], up.counters["deferred"]) == (0, 0, 0)
        assert up.status()["rejections"] == {}


async def test_a_signed_chain_broken_quarantines(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The cloud's signed chain-broken: the batch leaves the pending set (kept aside), counted."""
    async with _running(tmp_path / "state", mosquitto.url) as (sup, up):
        seq, hh = await _one_batch_in_flight(sup, up)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="cloud") as cloud:
            ack = make_ack(tenant="acme", store="s001", device="edge-01", seq=seq, hh=hh, ok=False,
                           err="chain-broken", key=CLOUD_KEY)
            await cloud.publish(ACK, ack, qos=1)
        assert await _until(lambda: up.counters["rejected"] == 1, 5), up.status()
        rt = sup.runtime
        assert rt is not None
        assert await rt.buffer.pending_batches() == []
        assert up.status()["rejections"] == {"chain-broken": 1}


async def test_a_signed_other_rejection_means_resend_later_with_backoff(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The cloud's signed unknown-key: the batch stays pending, is published again only after the
    backoff (0.15-0.3 s here, not the 60 s ack timeout and not at once), counted per reason; a later
    signed ok-ack deletes it."""
    async with _running(tmp_path / "state", mosquitto.url) as (sup, up):
        seq, hh = await _one_batch_in_flight(sup, up)
        ids: dict[str, Any] = {"tenant": "acme", "store": "s001", "device": "edge-01", "seq": seq, "hh": hh}
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="cloud") as cloud:
            t0 = time.monotonic()
            await cloud.publish(ACK, make_ack(**ids, ok=False, err="unknown-key", key=CLOUD_KEY), qos=1)
            assert await _until(lambda: up.counters["deferred"] == 1, 5)
            assert up.counters["resent"] == 0
            assert await _until(lambda: up.counters["resent"] == 1, 5), up.status()
            assert 0.1 <= time.monotonic() - t0 < 5
            rt = sup.runtime
            assert rt is not None
            assert [b.seq for b in await rt.buffer.pending_batches()] == [seq]
            assert up.status()["rejections"] == {"unknown-key": 1}
            assert up.counters["rejected"] == 0
            await cloud.publish(ACK, make_ack(**ids, ok=True, key=CLOUD_KEY), qos=1)
            assert await _until(lambda: up.counters["acked"] == 1, 5)
            assert await rt.buffer.pending_batches() == []


async def test_mqtt5_maximum_packet_size_keeps_a_large_message_off_the_edge(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Against Mosquitto (MQTT 5): a 1 MiB message on the ack topic is not delivered to the edge
    (the broker honours our Maximum Packet Size); a genuine small signed ack still is."""
    async with _running(tmp_path / "state", mosquitto.url) as (sup, up):
        assert up.status()["protocol"] == "5"
        seq, hh = await _one_batch_in_flight(sup, up)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as attacker:
            await attacker.publish(ACK, b"\x90" * (1024 * 1024), qos=1)
            await asyncio.sleep(0.3)
            ack = make_ack(tenant="acme", store="s001", device="edge-01", seq=seq, hh=hh, ok=True, key=CLOUD_KEY)
            await attacker.publish(ACK, ack, qos=1)
        assert await _until(lambda: up.counters["acked"] == 1, 5), up.status()
        assert up.counters["acks_malformed"] == 0  # the big one never arrived
        assert up.counters["connects"] == 1


async def test_two_stores_edge_01_on_one_broker_never_kick_each_other(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Two daemons, both device edge-01, stores s001 and s002, on one Mosquitto for 3 s: each
    connects once and stays online (the broker never closed one for the other)."""
    async with _running(tmp_path / "a", mosquitto.url) as (_sa, a), \
            _running(tmp_path / "b", mosquitto.url, store="s002") as (_sb, b):  # fmt: skip
        await asyncio.sleep(3.0)
        assert (a.state, b.state) == ("online", "online")
        assert (a.counters["connects"], b.counters["connects"]) == (1, 1)
        ida, idb = a.status()["client_id"], b.status()["client_id"]
    assert ida.startswith("acme/s001/edge-01/")
    assert idb.startswith("acme/s002/edge-01/")


def test_client_id_suffix_is_made_once_kept_0600_and_short_ids_are_23_chars(tmp_path: Path) -> None:
    """The random suffix is created once (mode 0600 whatever the umask) and reused; the short form
    is 23 characters of [0-9a-z] and differs between stores."""
    old = os.umask(0o022)
    try:
        first = client_id("acme", "s001", "edge-01", tmp_path)
    finally:
        os.umask(old)
    assert first == client_id("acme", "s001", "edge-01", tmp_path)
    assert stat.S_IMODE((tmp_path / SUFFIX_FILE).stat().st_mode) == 0o600
    suffix = first.rsplit("/", 1)[1]
    assert len(suffix) == 16
    short = client_id("acme", "s001", "edge-01", tmp_path, "short")
    assert len(short) == 23
    assert short.isalnum()
    assert short == short.lower()
    assert short != short_client_id(f"acme/s002/edge-01/{suffix}")


def test_edge_run_makes_its_files_0600_under_umask_022(tmp_path: Path) -> None:
    """`edge run` under umask 022 (no systemd): buffer.db, its -wal/-shm, runtime.json and the client
    suffix are 0600 (the daemon sets umask 0077 itself)."""
    import signal
    import subprocess
    import sys

    import yaml

    state = tmp_path / "state"
    state.mkdir()
    doc = {"identity": {"tenant": "acme", "store": "s001", "device": "edge-01"},
           "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
           "uplink": {"insecure_unsigned_acks": True, "broker": "mqtt://127.0.0.1:9"},
           "drivers": {"ble": {"backend": "sim"}, "nfc": {"backend": "sim"}},
           "health": {"enabled": False, "advertise": False}, "logging": {"format": "json"}}  # fmt: skip
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    edge = str(Path(sys.executable).parent / "edge")
    env = {**os.environ}
    subprocess.run([edge, "keys", "init", "--config", str(cfg)], check=True, capture_output=True, timeout=60)
    proc = subprocess.Popen(["sh", "-c", f"umask 022; exec {edge} run --config {cfg}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        want = ["buffer.db", "buffer.db-wal", "runtime.json", SUFFIX_FILE]
        while not all((state / n).exists() for n in want) and time.monotonic() < deadline:
            time.sleep(0.1)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir() if p.is_file()}  # while running
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert set(want) <= set(modes), modes
    assert {n: m for n, m in modes.items() if m & 0o077} == {}, modes


def test_edge_status_shows_unverified_acks_rejections_and_ignored_acks() -> None:
    """`edge status` text: a loud warning when acks are not verified, rejections per reason, and
    counts of ignored (unsigned, wrongly signed) acks."""
    from edge.status import _render

    uplink = {"state": "online", "broker": "mqtt://b:1883", "unsigned_acks_trusted": True,
              "rejections": {"unknown-key": 3, "chain-broken": 1}, "waiting_to_resend": 2,
              "acks_unsigned": 5, "acks_forged": 1, "acks_malformed": 0}  # fmt: skip
    text = _render({"device": "edge-01", "runtime": {"state": "running", "components": {"uplink": uplink}},
                    "buffer": None})
    assert "WARNING: acks are NOT verified" in text
    assert "rejected by the cloud: chain-broken 1, unknown-key 3" in text
    assert "2 waiting" in text
    assert "acks ignored: unsigned 5, bad signature 1" in text


async def test_mqtt311_a_large_inbound_packet_drops_the_connection_unread(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """uplink.protocol 3.1.1 (no Maximum Packet Size in the protocol): a 1 MiB message on the ack
    topic is refused on its header (inbound_refused counted, connection dropped, reconnected), and a
    genuine signed ack afterwards still deletes the batch."""
    async with _running(tmp_path / "state", mosquitto.url, protocol="3.1.1") as (sup, up):
        assert up.status()["protocol"] == "3.1.1"
        seq, hh = await _one_batch_in_flight(sup, up)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as attacker:
            await attacker.publish(ACK, b"\x90" * (1024 * 1024), qos=0)
            assert await _until(lambda: up.counters["inbound_refused"] == 1, 5), up.status()
            assert await _until(lambda: up.counters["connects"] == 2 and up.state == "online", 10), up.status()
            ack = make_ack(tenant="acme", store="s001", device="edge-01", seq=seq, hh=hh, ok=True, key=CLOUD_KEY)
            await attacker.publish(ACK, ack, qos=1)
        assert await _until(lambda: up.counters["acked"] == 1, 10), up.status()


def _has_components(sup: Supervisor) -> bool:
    return sup.runtime is not None and bool(sup.runtime.components)


async def test_insecure_unsigned_acks_warns_at_every_start_and_shows_in_status(tmp_path: Path) -> None:
    """insecure_unsigned_acks without a cloud key: each start logs uplink_acks_unsigned, and the
    status says unsigned acks are trusted; an uplink built in code without key or flag refuses to
    start (StartupError naming uplink.cloud_public_key)."""
    from structlog.testing import capture_logs

    from edge.errors import StartupError

    state = tmp_path / "state"
    state.mkdir()
    clock = SystemClock()
    for round_ in range(2):
        cfg = _config(state, "mqtt://127.0.0.1:9", cloud_public_key=None, insecure_unsigned_acks=True)
        KeyStore(cfg.paths.keys_dir, clock).init(force=True)
        sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component])
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(sup.run(stop))
            assert await _until(partial(_has_components, sup), 10)
            assert sup.runtime is not None
            assert sup.runtime.components[0].status()["unsigned_acks_trusted"] is True
            stop.set()
            await asyncio.wait_for(task, 20)
        assert [e for e in logs if e["event"] == "uplink_acks_unsigned"], (round_, logs)
    cfg = _config(state, "mqtt://127.0.0.1:9", cloud_public_key=None)
    with pytest.raises(StartupError, match=r"uplink\.cloud_public_key"):
        await Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component]).run(asyncio.Event())



@pytest.mark.cloud
async def test_a_refused_ack_subscription_is_counted_and_the_session_is_tried_again(
    tmp_path: Path, nats_cluster: Any
) -> None:
    """A broker that answers SUBSCRIBE to the ack topic with the failure code (here NATS, whose
    store user t-a.s-a may not read store s-b's acks; under a 500-device reconnect storm NATS did
    the same when it could not create the subscription's consumer in time): the edge never counts
    itself online on such a session, where no ack could ever arrive and every batch would be resent
    forever; the refusal is counted and the uplink connects again."""
    state = tmp_path / "state"
    state.mkdir()
    password = tmp_path / "pw"
    password.write_text(nats_cluster.password("t-a.s-a"))
    node = nats_cluster.nats.nodes[0]
    cfg = Config.model_validate({
        "identity": {"tenant": "t-a", "store": "s-b", "device": "edge-01"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "downlink": {"enabled": False},
        "uplink": {"broker": f"mqtt://{node.host}:{node.mqtt_port}", "cloud_public_key": CLOUD_PUBLIC_HEX,
                   "protocol": "3.1.1", "auth": {"username": "t-a.s-a", "password_file": str(password)},
                   "reconnect": {"initial": "200ms", "max": "400ms"}},
    })  # fmt: skip
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init(force=True)
    sup = Supervisor(cfg, clock, drivers=lambda c, k: [], components=[uplink_component])
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        assert await _until(lambda: _has_components(sup), 10)
        assert sup.runtime is not None
        up = sup.runtime.components[0]
        assert isinstance(up, Uplink)
        assert await _until(lambda: up.counters["subscribe_refused"] >= 2, 20), up.status()
        assert up.state != "online"
        assert up.counters["connects"] >= 2
        assert "refused the subscription" in str(up.last_error)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
