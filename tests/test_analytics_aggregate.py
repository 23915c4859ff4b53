"""privacy.mode aggregate, end to end: a daemon (the supervisor with the simulated BLE, NFC and
POS drivers, its buffer and its uplink to a real Mosquitto) keeps every per-person event on the
device. What reaches the broker, the buffer's files and an export of the buffer hold no
pseudonym at all; the same run in events mode finds them (the scan sees what it looks for)."""

from __future__ import annotations

import asyncio
import re
import zlib
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
import yaml
from support.mosquitto import Mosquitto

from edge.clock import SystemClock
from edge.config import Config
from edge.privacy.keys import KeyStore
from edge.status import export_main
from edge.supervisor import Supervisor
from edge.uplink.service import uplink_component
from edge.uplink.wire import parse_batch

# a pseudonym as edge/privacy/pseudonym.py writes it: class, key, 26 base32 characters
PSEUDONYM = re.compile(rb"(?:ble|nfc|loy|mail|tel):[es][0-9a-z]+:[a-z2-7]{26}")


def _doc(state: Path, broker: str, mode: str) -> dict[str, Any]:
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-agg"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "privacy": {"mode": mode},
        "analytics": {"enabled": True, "interval": "5m"},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"broker": broker, "insecure_unsigned_acks": True,  # no receiver: nothing acks
                   "batch": {"max_events": 50, "linger": "50ms"},
                   "reconnect": {"initial": "100ms", "max": "1s"}},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": 300, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": 40, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 20, "seed": 3}}],
        },
        "health": {"enabled": False, "advertise": False, "drain_timeout": "5s"},
        "logging": {"level": "info", "format": "json"},
    }


async def _run(tmp_path: Path, mosquitto: Mosquitto, mode: str) -> tuple[list[bytes], list[dict[str, Any]], Path]:
    state = tmp_path / mode
    state.mkdir()
    doc = _doc(state, mosquitto.url, mode)
    cfg = Config.model_validate(doc)
    clock = SystemClock()
    KeyStore(cfg.paths.keys_dir, clock).init()
    payloads: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"scan-{mode}") as client:
        await client.subscribe("edge/v1/#", qos=1)

        async def collect() -> None:
            async for m in client.messages:
                if isinstance(m.payload, bytes):
                    payloads.append(m.payload)

        collector = asyncio.create_task(collect())
        sup = Supervisor(cfg, clock, components=[uplink_component])
        stop = asyncio.Event()
        task = asyncio.create_task(sup.run(stop))
        await asyncio.sleep(3.0)
        assert not task.done()
        assert sup.runtime is not None
        assert sup.runtime.analytics is not None
        stop.set()
        await asyncio.wait_for(task, 15)
        await asyncio.sleep(0.3)
        collector.cancel()
    cfg_file = tmp_path / f"{mode}.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    export = tmp_path / f"{mode}.jsonl"
    assert await asyncio.to_thread(export_main, str(cfg_file), str(export)) == 0
    events = [yaml.safe_load(line) for line in export.read_text().splitlines() if line.strip()]
    return payloads, events, state


def _broker_events(payloads: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in payloads:
        if raw.startswith(b"{"):
            continue  # the retained status message (JSON)
        b = parse_batch(raw)
        body = zlib.decompress(b.b) if b.z == "zlib" else b.b
        out.extend(msgpack.unpackb(body, raw=False))
    return out


def _files_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.mosquitto
async def test_aggregate_mode_lets_no_pseudonym_reach_the_broker_the_buffer_or_an_export(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    payloads, events, state = await _run(tmp_path, mosquitto, "events")
    sent = _broker_events(payloads)
    assert any(PSEUDONYM.search(msgpack.packb(e["data"])) for e in sent), "control: events mode sends pseudonyms"
    assert PSEUDONYM.search(_files_bytes(state))

    payloads, events, state = await _run(tmp_path, mosquitto, "aggregate")
    sent = _broker_events(payloads)
    for e in sent:
        assert e["type"].startswith(("analytics.", "edge.")), e["type"]
        assert not PSEUDONYM.search(msgpack.packb(e)), e["type"]
    for raw in payloads:
        assert not PSEUDONYM.search(raw)
    assert events, "the export is empty: the partial interval at stop was not stored"
    assert {e["type"] for e in events} <= {"analytics.interval", "edge.dropped"}
    assert any(e["type"] == "analytics.interval" and e["data"]["partial"] for e in events)
    assert all(not PSEUDONYM.search(repr(e).encode()) for e in events)
    assert not PSEUDONYM.search(_files_bytes(state))
