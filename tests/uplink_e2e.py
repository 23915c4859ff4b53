"""Helpers for the end-to-end uplink tests (tests/test_uplink_*.py): peers on the broker side.

- `Capture`: a plain (non-shared) MQTT subscriber on every device's batch topic that records each
  payload as the broker delivered it, with its arrival time: what went over the wire, byte for byte.
- `ReceiverProcess`: the reference receiver as a real subprocess (JSON logs to a file), so a test
  can SIGSTOP, SIGTERM or restart it while the daemon streams.
- `check_chain`: verifies captured payloads independently of the receiver (signature, body hash,
  seq from 1 without holes, prev = SHA-256 of the previous header, resends byte-identical).

Wire constants are written as literals here (topic layout, signing context), per the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ROOT = Path(__file__).resolve().parent.parent
EDGE = str(Path(sys.executable).parent / "edge")
BATCH_FILTER = "edge/v1/+/+/+/batch"  # every device's batches, plain subscription (sees every copy)


@dataclass(slots=True)
class Capture:
    """Everything published on the batch topics: (monotonic arrival time, topic, payload)."""

    seen: list[tuple[float, str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def by_seq(self) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = defaultdict(list)
        for _t, _topic, payload in self.seen:
            out[decode(payload)[0]["seq"]].append(payload)
        return dict(out)

    async def wait_for(self, cond: Callable[[], bool], seconds: float) -> bool:
        """Wait until `cond()` holds (checked on every arrival); False on timeout."""
        try:
            async with asyncio.timeout(seconds):
                while not cond():
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self.changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_count(self, n: int, seconds: float) -> bool:
        """Wait until at least `n` payloads have been captured; False on timeout."""
        return await self.wait_for(lambda: len(self.seen) >= n, seconds)


@contextlib.asynccontextmanager
async def capture(host: str, port: int, **tls: Any) -> AsyncIterator[Capture]:
    """Subscribe (QoS 1) to every batch topic for as long as the block runs."""
    cap = Capture()
    async with aiomqtt.Client(host, port, identifier=f"capture-{os.getpid()}", **tls) as client:
        await client.subscribe(BATCH_FILTER, qos=1)

        async def pump() -> None:
            async for m in client.messages:
                payload = m.payload
                assert isinstance(payload, bytes)
                cap.seen.append((time.monotonic(), m.topic.value, payload))
                cap.changed.set()

        task = asyncio.create_task(pump())
        try:
            yield cap
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def decode(payload: bytes) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(header map, header bytes, top-level map) of a batch payload, decoded independently of edge.*"""
    top = msgpack.unpackb(payload, raw=False)
    h = top["h"]
    return msgpack.unpackb(h, raw=False), h, top


def events_of(payload: bytes) -> list[dict[str, Any]]:
    header, _h, top = decode(payload)
    body = zlib.decompress(top["b"]) if header["z"] == "zlib" else top["b"]
    events: list[dict[str, Any]] = msgpack.unpackb(body, raw=False)
    return events


def check_chain(cap: Capture, public_key: bytes) -> dict[int, bytes]:
    """Assert the captured batches form one intact, verified chain; returns seq -> payload.

    For any seq seen more than once every copy is byte-identical; seqs run 1..max without a hole;
    each signature verifies over b"edge-batch-v1\\n" + h; bh is SHA-256 of b; prev links headers.
    """
    key = Ed25519PublicKey.from_public_bytes(public_key)
    copies = cap.by_seq()
    assert copies, "nothing was captured"
    for seq, payloads in copies.items():
        assert all(p == payloads[0] for p in payloads), f"resends of seq {seq} differ"
    assert sorted(copies) == list(range(1, max(copies) + 1)), "a seq never went over the wire"
    prev = bytes(32)
    for seq in range(1, max(copies) + 1):
        header, h, top = decode(copies[seq][0])
        key.verify(top["s"], b"edge-batch-v1\n" + h)  # raises InvalidSignature
        assert header["bh"] == hashlib.sha256(top["b"]).digest(), f"seq {seq}: bh"
        assert header["prev"] == prev, f"seq {seq}: prev does not link to seq {seq - 1}"
        prev = hashlib.sha256(h).digest()
    return {seq: payloads[0] for seq, payloads in copies.items()}


def receiver_yaml(path: Path, *, broker: str, keys_dir: Path, cloud_key: Path | None = None,
                  group: str | None = "edge-receivers", tls: dict[str, str] | None = None) -> Path:  # fmt: skip
    doc: dict[str, Any] = {
        "broker": broker, "keys_dir": str(keys_dir), "db": str(path.parent / "receiver.db"),
        "out": str(path.parent / "events.jsonl"), "shared_group": group, "client_id": "e2e-receiver",
    }  # fmt: skip
    if cloud_key is not None:
        doc["cloud_key"] = str(cloud_key)
    if tls is not None:
        doc["tls"] = tls
    path.write_text(yaml.safe_dump(doc))
    return path


_RECEIVER_MAIN = (
    "import asyncio, sys; from edge.logs import configure_logging; "
    "from cloud.receiver import receive_main; configure_logging('info', 'json'); "
    "sys.exit(asyncio.run(receive_main(sys.argv[1])))"
)


class ReceiverProcess:
    """`receive_main` (what `edge receive` runs) in a subprocess, JSON logs appended to `log`."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs: list[dict[str, Any]] = []  # stats logged by each run at its clean stop

    def start(self, timeout: float = 20.0) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", _RECEIVER_MAIN, str(self.config)], cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not any(e["event"] == "receiver_subscribed" for e in self.lines(offset)):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "receiver did not subscribe"
            time.sleep(0.05)

    def lines(self, offset: int = 0) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        with self.log.open("rb") as fh:
            fh.seek(offset)
            out = []
            for ln in fh.read().decode(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(ln)
                    if isinstance(doc, dict) and "event" in doc:
                        out.append(doc)
            return out

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, expect exit 0, and keep the stats it logged."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            code = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, self.log.read_text()[-3000:]
        stopped = [e for e in self.lines() if e["event"] == "receiver_stopped"]
        assert len(stopped) == len(self.runs) + 1
        self.runs.append(stopped[-1])

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def total(self, key: str) -> int:
        return sum(int(r[key]) for r in self.runs)

    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.runs:
            for reason, n in r["rejected"].items():
                out[reason] += int(n)
        return dict(out)


def received_ids(out: Path) -> list[int]:
    """Event ids in the receiver's JSON-lines output, in file order (duplicates kept)."""
    if not out.exists():
        return []
    return [int(json.loads(ln)["id"]) for ln in out.read_text().splitlines() if ln.strip()]


async def eventually(cond: Callable[[], object], seconds: float) -> bool:
    """Whether `cond()` turns true within `seconds` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return False
