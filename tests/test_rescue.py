"""Rescue by USB stick, end to end: `edge export --signed` on the device, `edge-cloud import` in
the cloud, through the same ingest core as network uploads, deduplicated against them."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from support.mosquitto import Mosquitto
from test_receiver import Publisher, publisher, running

from cloud.cli import main as cloud_main
from cloud.config import load_receiver_config
from cloud.identity import register_key
from edge.buffer import Buffer
from edge.cli import main as edge_main
from edge.clock import SystemClock
from edge.configload import load_config
from edge.events import Pending
from edge.privacy.keys import KeyStore
from edge.statelock import StateLock
from edge.uplink.rescue import MAGIC, read_records, write_record

pytestmark = pytest.mark.mosquitto
EVENTS = 250


async def _device(tmp_path: Path, cloud_pub: str) -> tuple[Path, str]:
    state = tmp_path / "device"
    conf = tmp_path / "store.yaml"
    conf.write_text(yaml.safe_dump({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-usb"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": {"broker": "mqtt://127.0.0.1:1", "cloud_public_key": cloud_pub, "batch": {"max_events": 100}},
        "drivers": {"ble": {"enabled": False}, "nfc": {"enabled": False}},
    }))  # fmt: skip
    cfg = load_config(conf)
    clock = SystemClock()
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    buf = await Buffer.open(cfg, clock)
    for i in range(EVENTS):
        await buf.put(Pending(ts=clock.wall_ms(), src="edge", type="edge.test", data={"i": i}))
    assert await buf.flush() == EVENTS
    await buf.close()
    return conf, keys.public_key().hex()


async def test_signed_export_is_imported_once_and_later_network_resends_are_duplicates(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud_key = tmp_path / "cloud.key"
    assert cloud_main(["keys", "create", "--out", str(cloud_key), "--json"]) == 0
    cloud_pub = json.loads(capsys.readouterr().out)["public_key"]
    conf, device_pub = await _device(tmp_path, cloud_pub)
    stick = tmp_path / "stick.bin"
    assert await asyncio.to_thread(edge_main, ["export", "--config", str(conf), "--out", str(stick), "--signed"]) == 0
    assert "3 signed batches" in capsys.readouterr().out  # 250 events, 100 per batch
    assert not (tmp_path / "stick.bin.partial").exists()
    assert stick.stat().st_mode & 0o777 == 0o600  # whatever the umask: it holds pseudonyms
    with stick.open("rb") as fh:
        records = list(read_records(fh, max_payload=1 << 20))
    assert [t for t, _ in records] == ["edge/v1/acme/s001/edge-usb/batch"] * 3

    rconf = tmp_path / "receiver.yaml"
    rconf.write_text(f"broker: {mosquitto.url}\nkeys_dir: rkeys\ndb: r/receiver.db\nout: r/events.jsonl\n"
                     f"cloud_key: {cloud_key}\nshared_group: null\n")  # fmt: skip
    register_key(tmp_path / "rkeys", ("acme", "s001", "edge-usb"), device_pub)
    assert cloud_main(["import", "--config", str(rconf), str(stick)]) == 0
    assert "3 batches stored (250 events), 0 already stored, 0 refused" in capsys.readouterr().out
    assert cloud_main(["import", "--config", str(rconf), str(stick)]) == 0  # a second import: duplicates
    assert "0 batches stored (0 events), 3 already stored" in capsys.readouterr().out
    out = tmp_path / "r" / "events.jsonl"
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == list(range(1, EVENTS + 1))

    # the device comes back online and resends the same (byte-identical) batches: acked ok, not stored again
    cfg = load_receiver_config(rconf)
    cloud = Ed25519PublicKey.from_public_bytes(bytes.fromhex(cloud_pub))
    async with running(cfg) as r, publisher(mosquitto, cloud) as pub:
        assert isinstance(pub, Publisher)
        for i, (topic, payload) in enumerate(records, start=1):
            await pub.send(topic, payload)
            assert (await pub.ack("edge-usb", i)).ok
        assert (r.stats.accepted, r.stats.duplicates) == (0, 3)
    assert len(out.read_text().splitlines()) == EVENTS


def test_import_refuses_a_foreign_key_and_a_file_that_is_not_an_export(tmp_path: Path) -> None:
    """A batch signed by an unregistered key is refused (exit 1, nothing stored); garbage is exit 2."""
    from test_receiver import Device, cloud_key_file

    dev = Device("edge-usb", key=Ed25519PrivateKey.generate())
    (tmp_path / "rkeys").mkdir()
    rconf = tmp_path / "receiver.yaml"
    rconf.write_text(f"broker: mqtt://127.0.0.1:1\nkeys_dir: rkeys\ncloud_key: {cloud_key_file(tmp_path)}\n")
    buf = io.BytesIO()
    buf.write(MAGIC)
    write_record(buf, dev.topic, dev.seal()[2])
    stick = tmp_path / "stick.bin"
    stick.write_bytes(buf.getvalue())
    assert cloud_main(["import", "--config", str(rconf), str(stick)]) == 1
    assert not (tmp_path / "events.jsonl").read_text()
    stick.write_bytes(b"not an export")
    assert cloud_main(["import", "--config", str(rconf), str(stick)]) == 2



async def test_signed_export_refuses_beside_a_running_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sealing writes to the buffer: with the state folder locked (a daemon running) it exits 2 naming
    the holder and writes nothing."""
    conf, _ = await _device(tmp_path, Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex())
    stick = tmp_path / "stick.bin"
    with StateLock(load_config(conf).paths.state_dir):
        assert await asyncio.to_thread(edge_main, ["export", "--config", str(conf), "--out", str(stick),
                                                   "--signed"]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert not stick.exists()
    assert not stick.with_name(stick.name + ".partial").exists()
@pytest.mark.parametrize(
    ("tail", "says"),
    [
        (b"\x00\x05edge/\x00\x00\x01\x00abc", "file cut short (payload)"),  # 256 bytes promised, 3 there
        (b"\x00\x05edge/\xff\xff\xff\xf0abc", "file cut short (an oversized payload"),  # above max_payload
    ],
)
def test_a_cut_short_last_record_is_reported_and_what_came_before_stays_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tail: bytes, says: str
) -> None:
    """The stick was pulled mid-write: the last record is truncated (or claims an oversized payload the
    file does not hold). The import exits 2 naming the problem, and the two whole batches before it
    are stored (a re-import finds them already stored)."""
    from test_receiver import Device, cloud_key_file

    dev = Device("edge-usb")
    dev.register(tmp_path / "rkeys")
    rconf = tmp_path / "receiver.yaml"
    rconf.write_text(f"broker: mqtt://127.0.0.1:1\nkeys_dir: rkeys\ncloud_key: {cloud_key_file(tmp_path)}\n")
    buf = io.BytesIO()
    buf.write(MAGIC)
    for _ in range(2):
        write_record(buf, dev.topic, dev.seal()[2])
    stick = tmp_path / "stick.bin"
    stick.write_bytes(buf.getvalue() + tail)
    capsys.readouterr()
    assert cloud_main(["import", "--config", str(rconf), str(stick)]) == 2
    cap = capsys.readouterr()
    assert says in cap.err
    assert "after 2 record(s), which are imported" in cap.err
    assert "2 batches stored (6 events)" in cap.out
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 6
