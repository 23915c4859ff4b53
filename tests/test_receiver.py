"""The reference receiver against a real mosquitto: store, dedupe, chain, rejections, acks.

Each test publishes sealed batches as a device would and reads the acks the receiver sends
back; what was stored is read from the receiver's JSON-lines output and SQLite file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from structlog.testing import capture_logs
from support.certs import CertPaths
from support.mosquitto import Mosquitto

from cloud.config import ReceiverConfig, load_receiver_config
from cloud.receiver import Receiver
from edge.clock import FakeClock
from edge.config import Tls
from edge.errors import ConfigError, StartupError
from edge.wire.uplink import Ack, encode_event, kid_of, parse_ack, public_raw, seal_batch, verify_ack

pytestmark = pytest.mark.mosquitto

PREFIX = "edge/v1"
WAIT = 10.0  # seconds any single expected ack may take


class Device:
    """Seals a chain of batches the way an edge device does (seq from 1, prev linking headers)."""

    def __init__(self, name: str = "edge-01", *, key: Ed25519PrivateKey | None = None) -> None:
        self.ids = ("acme", "s001", name)
        self.key = key or Ed25519PrivateKey.generate()
        self.raw = public_raw(self.key.public_key())
        self.seq = 0
        self.prev = bytes(32)
        self.next_id = 1

    @property
    def topic(self) -> str:
        return f"{PREFIX}/{'/'.join(self.ids)}/batch"

    def register(self, keys_dir: Path, ids: tuple[str, str, str] | None = None) -> None:
        """Register this key at keys_dir/<tenant>/<store>/<device>.pub (its own identity by default)."""
        t, s, d = ids or self.ids
        (keys_dir / t / s).mkdir(parents=True, exist_ok=True)
        (keys_dir / t / s / f"{d}.pub").write_text(self.raw.hex() + "\n")

    def seal(self, n_events: int = 3, *, seq: int | None = None, prev: bytes | None = None,
             tag: str = "x", extra: dict[str, Any] | None = None) -> tuple[int, bytes, bytes]:  # fmt: skip
        """(seq, hh, payload) of the next batch; `seq`/`prev` override the chain (for attacks)."""
        chained = seq is None
        s = self.seq + 1 if seq is None else seq
        p = self.prev if prev is None else prev
        events: list[dict[str, Any]] = [
            {"id": self.next_id + i, "ts": 1767225600000 + i, "src": "edge", "type": "edge.tick",
             "data": {"tag": tag, "i": i}, **(extra or {})}
            for i in range(n_events)
        ]  # fmt: skip
        self.next_id += n_events
        payload, hh = seal_batch(
            tenant=self.ids[0], store=self.ids[1], device=self.ids[2], seq=s, prev=p,
            event_bodies=[encode_event(e) for e in events], first=events[0]["id"], last=events[-1]["id"],
            t_ms=1767225600000, sync=True, key=self.key, kid=kid_of(self.raw), compression="zlib",
        )  # fmt: skip
        if chained:
            self.seq, self.prev = s, hh
        return s, hh, payload

    def restart_from_scratch(self) -> None:
        """The device lost its state: a new chain from seq 1 (same key)."""
        self.seq, self.prev = 0, bytes(32)


class Publisher:
    """A device-side MQTT client: publishes payloads and collects the acks per (device, seq)."""

    def __init__(self, client: aiomqtt.Client, cloud: Ed25519PublicKey | None = None) -> None:
        self.client = client
        self.cloud = cloud or CLOUD.public_key()
        self.acks: dict[tuple[str, int], list[Ack]] = defaultdict(list)
        self.raw_acks: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    async def listen(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            tenant, store, device = m.topic.value.split("/")[-4:-1]
            self.raw_acks.append((m.topic.value, m.payload))
            ack = parse_ack(m.payload)
            assert verify_ack(ack, tenant=tenant, store=store, device=device, cloud_key=self.cloud)
            self.acks[(device, ack.seq)].append(ack)
            self._changed.set()

    async def send(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)

    async def ack(self, device: str, seq: int, *, count: int = 1) -> Ack:
        """The `count`-th ack for (device, seq), waiting for it."""
        async with asyncio.timeout(WAIT):
            while len(self.acks[(device, seq)]) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.acks[(device, seq)][count - 1]

    async def roundtrip(self, dev: Device, seq: int, payload: bytes, *, topic: str | None = None) -> Ack:
        count = len(self.acks[(dev.ids[2], seq)]) + 1
        await self.send(topic or dev.topic, payload)
        return await self.ack(dev.ids[2], seq, count=count)


@asynccontextmanager
async def publisher(broker: Mosquitto, cloud: Ed25519PublicKey | None = None) -> AsyncIterator[Publisher]:
    ident = f"pub-{os.getpid()}-{time.monotonic_ns()}"
    async with aiomqtt.Client(broker.host, broker.port, identifier=ident) as c:
        await c.subscribe(f"{PREFIX}/+/+/+/ack", qos=1)
        pub = Publisher(c, cloud)
        task = asyncio.create_task(pub.listen())
        try:
            yield pub
        finally:
            task.cancel()


CLOUD = Ed25519PrivateKey.generate()  # the cloud key of every receiver in this file


def cloud_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cloud.key"
    if not path.exists():
        path.write_text(CLOUD.private_bytes_raw().hex() + "\n")
        path.chmod(0o600)
    return path


def make_cfg(tmp_path: Path, url: str, *, name: str = "r1", **changes: Any) -> ReceiverConfig:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    fields: dict[str, Any] = {
        "broker": url, "client_id": f"receiver-{name}", "keys_dir": keys,
        "db": tmp_path / name / "receiver.db", "out": tmp_path / name / "events.jsonl",
        "cloud_key": cloud_key_file(tmp_path),
    }  # fmt: skip
    fields.update(changes)
    return ReceiverConfig.model_validate(fields)


@asynccontextmanager
async def running(cfg: ReceiverConfig, **kwargs: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver(cfg, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(receiver.run(stop))
    try:
        async with asyncio.timeout(WAIT):
            ready = asyncio.create_task(receiver.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                task.result()  # raise the startup error
        yield receiver
    finally:
        stop.set()
        async with asyncio.timeout(WAIT):
            await task


def stored(cfg: ReceiverConfig) -> list[dict[str, Any]]:
    if not cfg.out.exists():
        return []
    return [json.loads(line) for line in cfg.out.read_text().splitlines()]


def stored_seqs(cfg: ReceiverConfig) -> list[int]:
    return sorted({r["seq"] for r in stored(cfg)})


# ------------------------------------------------------------------------------------------------


async def test_accepted_batch_is_stored_as_json_lines_then_acked_ok(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Each event becomes one JSON object with tenant/store/device/seq added; the ack binds hh."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    seen: list[dict[str, Any]] = []
    async with running(cfg, on_event=lambda rec: seen.append(dict(rec))) as r, publisher(mosquitto) as pub:
        seq, hh, payload = dev.seal(3)
        ack = await pub.roundtrip(dev, seq, payload)
        assert (ack.seq, ack.hh, ack.ok, ack.err) == (1, hh, True, None)
        assert verify_ack(ack, tenant="acme", store="s001", device="edge-01", cloud_key=CLOUD.public_key())
        records = stored(cfg)
        assert [rec["id"] for rec in records] == [1, 2, 3]
        assert records[0]["tenant"] == "acme"
        assert records[0]["store"] == "s001"
        assert records[0]["device"] == "edge-01"
        assert records[0]["seq"] == 1
        assert records[0]["src"] == "edge"
        assert records[0]["data"] == {"tag": "x", "i": 0}
        assert isinstance(records[0]["received_ms"], int)
        assert seen == records
        assert (r.stats.accepted, r.stats.events, r.stats.rejected) == (1, 3, {})
    with sqlite3.connect(cfg.db) as db:
        rows = db.execute("SELECT tenant, store, device, seq, hh, n, first, last FROM batches").fetchall()
    assert rows == [("acme", "s001", "edge-01", 1, hh, 3, 1, 3)]


async def test_unknown_event_keys_are_kept_but_cannot_override_the_added_fields(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg), publisher(mosquitto) as pub:
        s1, _, p1 = dev.seal(1, extra={"zone": "entrance"})
        s2, _, p2 = dev.seal(1, extra={"tenant": "evil", "seq": 99})
        assert (await pub.roundtrip(dev, s1, p1)).ok
        assert (await pub.roundtrip(dev, s2, p2)).ok
    first, second = stored(cfg)
    assert (first["zone"], first["tenant"], first["seq"]) == ("entrance", "acme", 1)
    assert (second["tenant"], second["seq"]) == ("acme", 2)


def test_receiver_config_resolves_paths_against_its_folder_and_lists_problems(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "receiver.yaml"
    conf.parent.mkdir()
    conf.write_text("broker: mqtts://broker.example:8884\nkeys_dir: keys\ndb: /abs/r.db\nshared_group: null\n"
                    "cloud_key: cloud.key\n"
                    "tls:\n  ca_file: ca.pem\n")  # fmt: skip
    cfg = load_receiver_config(conf)
    assert (cfg.host, cfg.port, cfg.use_tls, cfg.shared_group) == ("broker.example", 8884, True, None)
    assert cfg.keys_dir == conf.parent.resolve() / "keys"
    assert cfg.db == Path("/abs/r.db")
    assert cfg.tls.ca_file == conf.parent.resolve() / "ca.pem"
    conf.write_text("broker: tcp://x\nprefix: edge/#\nmax_group: 0\ntypo: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_receiver_config(conf)
    problems = "\n".join(exc.value.problems)
    for field in ("broker", "prefix", "max_group", "typo", "cloud_key"):
        assert field in problems
    assert len(exc.value.problems) == 5


async def test_duplicate_is_acked_ok_and_written_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        seq, hh, payload = dev.seal(2)
        first = await pub.roundtrip(dev, seq, payload)
        again = await pub.roundtrip(dev, seq, payload)
        assert first.ok
        assert again.ok
        assert again.hh == hh
        assert len(stored(cfg)) == 2
        assert (r.stats.accepted, r.stats.duplicates) == (1, 1)


async def test_batch_not_continuing_the_chain_is_chain_broken_and_not_stored(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Wrong prev for a held seq-1, or a different batch for a held seq: rejected, not stored."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        s1, _, p1 = dev.seal()
        assert (await pub.roundtrip(dev, s1, p1)).ok
        s2, _, bad = dev.seal(seq=2, prev=b"\x42" * 32, tag="bad")
        ack = await pub.roundtrip(dev, s2, bad)
        assert (ack.ok, ack.err) == (False, "chain-broken")
        s2, _, p2 = dev.seal()
        assert (await pub.roundtrip(dev, s2, p2)).ok
        _, fork_hh, fork = dev.seal(seq=2, prev=_hh_of(p1), tag="fork")  # links fine, but 2 is taken
        ack = await pub.roundtrip(dev, 2, fork)
        assert (ack.ok, ack.err, ack.hh) == (False, "chain-broken", fork_hh)
        assert stored_seqs(cfg) == [1, 2]
        assert {rec["data"]["tag"] for rec in stored(cfg)} == {"x"}
        assert r.stats.rejected == {"chain-broken": 2}


def _hh_of(payload: bytes) -> bytes:
    h: bytes = msgpack.unpackb(payload, raw=False)["h"]
    return hashlib.sha256(h).digest()


async def test_gap_and_reset_are_reported_not_rejected(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """seq 1, 2, 5 -> a gap (3..4); then seq 1 of a new chain -> a reset opening a new epoch in
    which the new chain is checked, while resends of the old chain stay duplicates."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        with capture_logs() as logs:
            old = [dev.seal() for _ in range(5)]
            for seq, _, payload in (old[0], old[1], old[4]):
                assert (await pub.roundtrip(dev, seq, payload)).ok
            dev.restart_from_scratch()
            n1 = dev.seal(tag="new")
            n2 = dev.seal(tag="new")
            for seq, _, payload in (n1, n2):
                assert (await pub.roundtrip(dev, seq, payload)).ok
            assert (await pub.roundtrip(dev, 2, old[1][2])).ok  # old-chain resend: duplicate
            wrong = dev.seal(seq=3, prev=old[1][1], tag="old-link")  # links to the old chain
            ack = await pub.roundtrip(dev, 3, wrong[2])
        assert (ack.ok, ack.err) == (False, "chain-broken")
        assert (r.stats.gaps, r.stats.resets, r.stats.accepted, r.stats.duplicates) == (1, 1, 5, 1)
    gaps = [e for e in logs if e["event"] == "uplink_gap"]
    resets = [e for e in logs if e["event"] == "uplink_reset"]
    assert [(g["missing_from"], g["missing_to"], g["log_level"]) for g in gaps] == [(3, 4, "warning")]
    assert [(x["device"], x["epoch"]) for x in resets] == [("edge-01", 2)]
    assert sorted({(rec["seq"], rec["data"]["tag"]) for rec in stored(cfg)}) == [
        (1, "new"), (1, "x"), (2, "new"), (2, "x"), (5, "x")]  # fmt: skip


async def no_ack(pub: Publisher, device: str, seq: int, *, count: int, quiet: float = 0.5) -> None:
    """No further ack arrives for (device, seq) within `quiet` seconds."""
    with suppress(TimeoutError):
        async with asyncio.timeout(quiet):
            await pub.ack(device, seq, count=count + 1)
    assert len(pub.acks[(device, seq)]) == count


async def test_unauthenticated_input_gets_no_ack_and_nothing_is_stored(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Tampered body or signature, "v": 2, a replaced body, garbage, an unregistered kid, another
    device's key on this topic: no ack at all (not even a signed rejection carrying the genuine
    hh), counted as unauthenticated; the genuine batch is then stored and acked ok."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev, other, stranger = Device("edge-01"), Device("edge-02"), Device("edge-03")
    dev.register(cfg.keys_dir)
    other.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        seq, hh, payload = dev.seal()
        top = msgpack.unpackb(payload, raw=False)
        body = bytearray(top["b"])
        body[5] ^= 1
        sig = bytearray(top["s"])
        sig[0] ^= 1
        cases = [
            msgpack.packb({**top, "b": bytes(body)}),  # bad-body-hash
            msgpack.packb({**top, "s": bytes(sig)}),  # bad-signature
            msgpack.packb({**top, "v": 2}),  # malformed envelope, genuine h
            msgpack.packb({**top, "b": zlib.compress(b"\x90")}),  # body replaced
            b"\xc1 not msgpack",
        ]
        for data in cases:
            await pub.send(dev.topic, data)
        _, _, foreign = other.seal()  # edge-02's own batch, genuine, on edge-01's topic
        await pub.send(dev.topic, foreign)
        forged = Device("edge-01")  # a key nobody registered, claiming edge-01's seq 1
        _, _, forged_payload = forged.seal()
        await pub.send(dev.topic, forged_payload)
        s_seq, _, s_payload = stranger.seal()
        await pub.send(stranger.topic, s_payload)
        await no_ack(pub, "edge-01", seq, count=0)
        await no_ack(pub, "edge-03", s_seq, count=0)
        ack = await pub.roundtrip(dev, seq, payload)  # processed after all of the above
        assert (ack.ok, ack.hh) == (True, hh)
        assert r.stats.unauthenticated == 8
        assert r.stats.rejected == {"bad-body-hash": 2, "bad-signature": 1, "malformed": 2, "unknown-key": 3}
        assert r.stats.accepted == 1
        assert stored_seqs(cfg) == [1]
        assert {rec["data"]["tag"] for rec in stored(cfg)} == {"x"}
        assert len(pub.acks[("edge-01", 1)]) == 1
    with sqlite3.connect(cfg.db) as db:
        assert db.execute("SELECT count(*) FROM rejected").fetchone() == (0,)  # never quarantined


async def test_a_key_is_valid_only_for_its_own_identity(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Device A's key signing batches as store B's device (topic and header both B's) is refused
    unknown-key, unanswered, and stored nowhere; B's genuine chain is untouched by A claiming its
    seqs 1..5, and a key registered for another tenant is no key for this one."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    a = Device("edge-a")
    a.register(cfg.keys_dir)
    b = Device("edge-b")
    b.ids = ("acme", "s002", "edge-b")
    b.register(cfg.keys_dir)
    a_as_b = Device("edge-b", key=a.key)
    a_as_b.ids = b.ids
    a_other_tenant = Device("edge-a", key=a.key)
    a_other_tenant.ids = ("othertenant", "s001", "edge-a")
    async with running(cfg) as r, publisher(mosquitto) as pub:
        claims = [a_as_b.seal(tag="claim") for _ in range(5)]
        for _, _, payload in claims:
            await pub.send(b.topic, payload)
        _, _, x = a_other_tenant.seal()
        await pub.send(a_other_tenant.topic, x)
        for seq in range(1, 6):
            await no_ack(pub, "edge-b", seq, count=0, quiet=0.1)
        await no_ack(pub, "edge-a", 1, count=0, quiet=0.1)
        for _ in range(5):
            seq, hh, payload = b.seal(tag="genuine")
            ack = await pub.roundtrip(b, seq, payload)
            assert (ack.ok, ack.hh) == (True, hh)
        assert r.stats.rejected == {"unknown-key": 6}
        assert (r.stats.accepted, r.stats.gaps, r.stats.resets) == (5, 0, 0)
    assert {(rec["store"], rec["data"]["tag"]) for rec in stored(cfg)} == {("s002", "genuine")}


async def test_stored_batch_is_answered_already_stored_before_other_checks(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A resend of a stored batch is acked ok even once its key is no longer registered."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        seq, hh, payload = dev.seal()
        assert (await pub.roundtrip(dev, seq, payload)).ok
        (cfg.keys_dir / "acme" / "s001" / "edge-01.pub").unlink()
        again = await pub.roundtrip(dev, seq, payload)
        assert (again.ok, again.hh) == (True, hh)
        assert (r.stats.accepted, r.stats.duplicates) == (1, 1)


async def test_authenticated_faults_get_signed_rejections(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A body that does not match its header (n), signed by the registered key: `malformed`, signed,
    recorded in the quarantine table; a key registered for two identities used across them:
    `topic-mismatch`."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device("edge-01")
    dev.register(cfg.keys_dir)
    dev.register(cfg.keys_dir, ("acme", "s001", "edge-02"))  # one key registered twice (a mistake)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        seq, hh, payload = dev.seal()
        other_topic = f"{PREFIX}/acme/s001/edge-02/batch"
        await pub.send(other_topic, payload)
        ack = await pub.ack("edge-02", seq)
        assert (ack.ok, ack.err, ack.hh) == (False, "topic-mismatch", hh)
        h = msgpack.packb({**msgpack.unpackb(msgpack.unpackb(payload)["h"]), "n": 7})
        top = msgpack.unpackb(payload)
        bad = msgpack.packb({**top, "h": h, "s": dev.key.sign(b"edge-batch-v1\n" + h)})
        ack = await pub.roundtrip(dev, seq, bad)
        assert (ack.ok, ack.err, ack.hh) == (False, "malformed", hashlib.sha256(h).digest())
        assert r.stats.rejected == {"topic-mismatch": 1, "malformed": 1}
    with sqlite3.connect(cfg.db) as db:
        rows = db.execute("SELECT device, seq, reason FROM rejected ORDER BY reason").fetchall()
    assert rows == [("edge-01", 1, "malformed"), ("edge-02", 1, "topic-mismatch")]


async def test_acks_are_signed_with_the_cloud_key(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Acceptances and rejections alike verify with the cloud public key, for this device only."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg), publisher(mosquitto) as pub:
        seq, _, payload = dev.seal()
        ok = await pub.roundtrip(dev, seq, payload)
        _, _, bad = dev.seal(seq=2, prev=b"\1" * 32)
        rejected = await pub.roundtrip(dev, 2, bad)
    pk = CLOUD.public_key()
    for ack in (ok, rejected):
        assert verify_ack(ack, tenant="acme", store="s001", device="edge-01", cloud_key=pk)
        assert not verify_ack(ack, tenant="acme", store="s001", device="edge-02", cloud_key=pk)
    assert (ok.ok, rejected.ok, rejected.err) == (True, False, "chain-broken")


async def test_receiver_refuses_to_start_without_a_readable_cloud_key(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = make_cfg(tmp_path, mosquitto.url, cloud_key=tmp_path / "missing.key")
    with pytest.raises(StartupError) as exc:
        async with running(cfg):
            pass
    assert "missing.key" in str(exc.value)


async def test_newly_registered_key_is_picked_up_at_most_once_a_second(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clock = FakeClock()
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    async with running(cfg, clock=clock) as r, publisher(mosquitto) as pub:
        seq, _, payload = dev.seal()
        await pub.send(dev.topic, payload)
        await no_ack(pub, "edge-01", seq, count=0)
        dev.register(cfg.keys_dir)
        await pub.send(dev.topic, payload)
        await no_ack(pub, "edge-01", seq, count=0)  # reloaded < 1 s ago
        clock.advance(1.5)
        assert (await pub.roundtrip(dev, seq, payload)).ok
        assert r.stats.rejected == {"unknown-key": 2}


async def test_two_receivers_in_a_shared_group_process_each_batch_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """200 batches through `$share/edge-receivers/...`: the union of what the two receivers stored
    is every batch, the intersection is empty, and every batch got exactly one ok ack."""
    cfg_a = make_cfg(tmp_path, mosquitto.url, name="a")
    cfg_b = make_cfg(tmp_path, mosquitto.url, name="b")
    dev = Device()
    dev.register(cfg_a.keys_dir)
    async with running(cfg_a) as ra, running(cfg_b) as rb, publisher(mosquitto) as pub:
        batches = [dev.seal(2) for _ in range(200)]
        for _, _, payload in batches:
            await pub.send(dev.topic, payload)
        acks = [await pub.ack("edge-01", seq) for seq, _, _ in batches]
        assert all(a.ok and a.hh == hh for a, (_, hh, _) in zip(acks, batches, strict=True))
        assert ra.stats.accepted + rb.stats.accepted == 200
    a, b = set(stored_seqs(cfg_a)), set(stored_seqs(cfg_b))
    assert a | b == set(range(1, 201))
    assert not a & b
    assert a
    assert b
    assert all(len(v) == 1 for v in pub.acks.values())


async def test_restarted_receiver_keeps_dedupe(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Resends of batches stored before a restart are acked ok and not written again."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    batches = [dev.seal(2) for _ in range(15)]
    async with publisher(mosquitto) as pub:
        async with running(cfg):
            for seq, _, payload in batches[:10]:
                assert (await pub.roundtrip(dev, seq, payload)).ok
        async with running(cfg) as r2:
            for seq, _, payload in batches[4:]:
                assert (await pub.roundtrip(dev, seq, payload)).ok
            assert (r2.stats.accepted, r2.stats.duplicates, r2.stats.gaps) == (5, 6, 0)
    assert [rec["seq"] for rec in stored(cfg)] == [s for s in range(1, 16) for _ in range(2)]


async def test_large_batches_flow_through(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """20 batches of 1000 events (the device default size) are stored completely."""
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r, publisher(mosquitto) as pub:
        batches = [dev.seal(1000) for _ in range(20)]
        for _, _, payload in batches:
            await pub.send(dev.topic, payload)
        for seq, _, _ in batches:
            assert (await pub.ack("edge-01", seq)).ok
        assert r.stats.events == 20_000
    assert len(stored(cfg)) == 20_000


async def test_receiver_over_tls_with_a_client_certificate(
    tmp_path: Path, mosquitto_tls: Mosquitto, tls_certs: CertPaths
) -> None:
    """mqtts:// with the CA and a client certificate (the broker requires one)."""
    certs = tls_certs
    tls = Tls(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    cfg = make_cfg(tmp_path, mosquitto_tls.tls_url, tls=tls)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg), publisher(mosquitto_tls) as pub:  # the device side uses the plain listener
        seq, _, payload = dev.seal()
        assert (await pub.roundtrip(dev, seq, payload)).ok


async def test_receiver_reconnects_after_a_broker_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = make_cfg(tmp_path, mosquitto.url)
    dev = Device()
    dev.register(cfg.keys_dir)
    async with running(cfg) as r:
        async with publisher(mosquitto) as pub:
            seq, _, payload = dev.seal()
            assert (await pub.roundtrip(dev, seq, payload)).ok
        mosquitto.restart()  # sessions are gone: the receiver must reconnect and resubscribe
        async with publisher(mosquitto) as pub:
            seq, _, payload = dev.seal()
            async with asyncio.timeout(WAIT):
                while not pub.acks[("edge-01", seq)]:  # resend until acked, as a device does
                    await pub.send(dev.topic, payload)
                    with suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await pub.ack("edge-01", seq)
            assert pub.acks[("edge-01", seq)][0].ok
        assert r.stats.accepted == 2


def test_edge_cloud_receive_runs_logs_json_and_stops_on_sigterm(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`edge-cloud receive --config F` logs JSON lines when not on a terminal (here: a pipe), makes
    its files 0600 even when started under umask 022, runs until SIGTERM and exits 0; a config
    without cloud_key exits 2 naming it with the command that makes one; typos are reported
    file:line with a did-you-mean."""
    (tmp_path / "keys").mkdir()
    cloud_key_file(tmp_path)
    conf = tmp_path / "receiver.yaml"
    conf.write_text(f"broker: {mosquitto.url}\nkeys_dir: keys\ndb: state/r.db\nout: state/e.jsonl\n"
                    "cloud_key: cloud.key\n")  # fmt: skip
    cmd = [sys.executable, "-u", "-m", "cloud.cli", "receive", "--config", str(conf)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          umask=0o022) as proc:
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + WAIT
            for line in proc.stdout:
                lines.append(line)
                if "receiver_subscribed" in line or time.monotonic() > deadline:
                    break
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert json.loads(lines[-1])["event"] == "receiver_subscribed"  # JSON, not the console renderer
    assert (tmp_path / "state" / "r.db").exists()  # relative to the config file's folder
    assert (tmp_path / "state" / "r.db").stat().st_mode & 0o777 == 0o600  # umask 0077 whatever the parent
    conf.write_text("broker: mqtt://127.0.0.1:1\nkeys_dir: keys\n")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WAIT, check=False)
    assert done.returncode == 2
    assert "cloud_key" in done.stdout
    assert "edge-cloud keys create --out FILE" in done.stdout
    conf.write_text("broker: mqtt://127.0.0.1:1\ncloud_key: cloud.key\nkeys_dirs: keys\n")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WAIT, check=False)
    assert done.returncode == 2
    assert f"{conf}:3: keys_dirs: unknown key 'keys_dirs'; did you mean 'keys_dir'?" in done.stdout


def test_an_unset_client_id_is_unique_per_receiver_and_a_set_one_is_kept(tmp_path: Path) -> None:
    """Shared subscriptions are on by default, so two receivers on defaults must not share a client
    id (the broker would kick one off each time the other connects)."""
    a = ReceiverConfig(cloud_key=tmp_path / "k")
    b = ReceiverConfig(cloud_key=tmp_path / "k")
    assert a.shared_group == "edge-receivers"
    assert re.fullmatch(r"edge-receiver-[0-9a-f]{8}", a.client_id)
    assert a.client_id != b.client_id
    assert a.resolved(tmp_path).client_id == a.client_id  # fixed for the life of the process
    assert ReceiverConfig(cloud_key=tmp_path / "k", client_id="r-7").client_id == "r-7"
