"""The health endpoint: /metrics in Prometheus format and /healthz, served on the daemon's loop.

A real supervisor (simulated drivers, real SQLite buffer, real mosquitto for the uplink and a
fake cloud that acks over MQTT) with the health component; requests go over real loopback
TCP and the exposition is parsed with prometheus-client's own parser. What must hold:

- metrics show buffer events/bytes per source, oldest-unsent age, events in (pipeline) and
  dropped per source, uplink state and last-ack age, driver states and backend restarts;
- /healthz answers 200 with a JSON summary; junk, wrong methods, unknown paths and oversized
  requests get an error status (or a closed connection) and the server keeps serving;
- the endpoint is local by default, and a port that is taken does not stop the daemon.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.mosquitto import Mosquitto

from drivers.base import Backoff, Driver
from drivers.registry import build_drivers
from edge.buffer import Buffer
from edge.clock import Clock, FakeClock, SystemClock
from edge.config import Config, Health
from edge.events import Pending, Reading
from edge.health import Liveness, health_component
from edge.privacy.keys import KeyStore
from edge.supervisor import ComponentFactory, Runtime, Supervisor
from edge.uplink.service import uplink_component
from edge.wire.uplink import make_ack, parse_batch

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def device_doc(state: Path, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-h"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"enabled": False},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": 100, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": 20, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 10, "seed": 3}}],
        },
        "health": {"listen": "127.0.0.1:0", "drain_timeout": "5s", "advertise": False},
    }
    doc.update(over)
    return doc


def make_cfg(tmp_path: Path, **over: Any) -> Config:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = Config.model_validate(device_doc(state, **over))
    KeyStore(cfg.paths.keys_dir, SystemClock()).init()
    return cfg


@asynccontextmanager
async def running(
    cfg: Config,
    components: Sequence[ComponentFactory],
    drivers: Callable[[Config, Clock], Sequence[Driver]] | None = None,
) -> AsyncIterator[Runtime]:
    """A supervisor running until the block ends, once every component has started."""
    sup = Supervisor(cfg, SystemClock(), components=components, drivers=drivers)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        for _ in range(600):
            rt = sup.runtime
            if rt is not None and len(rt.components) == len(components):
                break
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("components did not start")
        yield rt
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def listen_of(rt: Runtime) -> tuple[str, int]:
    health = next(c for c in rt.components if c.name == "health")
    listen = health.status()["listen"]
    host, _, port = listen.rpartition(":")
    return host, int(port)


async def http(addr: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` as is; (status, headers, body), or (0, {}, b"") when the server just closes."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def get(addr: tuple[str, int], path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(addr, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


async def scrape(addr: tuple[str, int]) -> Samples:
    status, headers, body = await get(addr, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def wait_until(pred: Callable[[], bool]) -> None:
    """Poll `pred` for up to 20 s."""
    for _ in range(400):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_show_backlog_per_source_pipeline_counters_and_driver_states(tmp_path: Path) -> None:
    """Offline (uplink disabled): events pile up per source; every family the issue names is there."""
    cfg = make_cfg(tmp_path)
    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with running(cfg, [health_component(liveness)]) as rt:
        await wait_until(lambda: all(p.left > 0 for p in rt.pumps.values()))
        await rt.buffer.flush()
        m = await scrape(listen_of(rt))
    for src in ("ble", "nfc", "pos", "edge"):
        assert ("edge_buffer_events", (("source", src),)) in m
        assert ("edge_buffer_bytes", (("source", src),)) in m
    for src in ("ble", "nfc", "pos"):
        assert value(m, "edge_buffer_events", source=src) > 0
        assert value(m, "edge_buffer_bytes", source=src) > value(m, "edge_buffer_events", source=src)
        assert value(m, "edge_pipeline_events_total", source=src, outcome="accepted") > 0
    assert value(m, "edge_buffer_oldest_unsent_age_seconds") >= 0
    assert value(m, "edge_buffer_degraded") == 0
    assert value(m, "edge_healthy") == 1
    assert value(m, "edge_clock_synchronized") in (0, 1)
    for driver, kind in (("ble", "ble"), ("nfc", "nfc"), ("pos:till-1", "pos")):
        assert value(m, "edge_driver_state", driver=driver, kind=kind, edge_driver_state="running") == 1
        assert value(m, "edge_driver_restarts_total", driver=driver, kind=kind) == 0
        assert value(m, "edge_driver_readings_total", driver=driver, kind=kind) > 0
    assert value(m, "edge_info", device="edge-h", tenant="acme", store="s001", version="0.1.0") == 1
    assert value(m, "edge_process_resident_memory_bytes") > 1_000_000
    assert "edge_uplink_state" not in names(m)  # no uplink configured: no uplink metrics


class _Flaky:
    """A backend whose device keeps failing (an unplugged reader)."""

    name = "flaky"

    def __init__(self) -> None:
        self.opened = 0

    async def readings(self) -> AsyncIterator[Reading]:
        self.opened += 1
        if self.opened > 0:  # always: the device is gone
            raise OSError(19, "No such device")
        yield Reading(src="nfc", type="nfc.tap", ts=0)

    async def aclose(self) -> None:
        return None


async def test_backend_restarts_and_a_degraded_driver_show_in_metrics(tmp_path: Path) -> None:
    """A backend that fails on every start: driver state degraded, restarts counted, /healthz still ok."""
    cfg = make_cfg(tmp_path)
    flaky = _Flaky()

    def drivers(c: Config, k: Clock) -> list[Driver]:
        broken = Driver("nfc-door", "nfc", flaky, k, backoff=Backoff(initial=0.01, max=0.05))
        return [*build_drivers(c, k), broken]

    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with running(cfg, [health_component(liveness)], drivers) as rt:
        await wait_until(lambda: flaky.opened >= 3)
        addr = listen_of(rt)
        m = await scrape(addr)
        status, _, body = await get(addr, "/healthz")
    assert value(m, "edge_driver_restarts_total", driver="nfc-door", kind="nfc") >= 2
    assert value(m, "edge_driver_errors_total", driver="nfc-door", kind="nfc") >= 2
    assert value(m, "edge_driver_state", driver="nfc-door", kind="nfc", edge_driver_state="degraded") == 1
    doc = json.loads(body)
    assert status == 200, doc  # a missing reader is not a sick daemon
    assert doc["drivers"]["nfc-door"] == "degraded"


@pytest.mark.mosquitto
async def test_uplink_state_and_last_ack_age_with_a_cloud_that_acks(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Uplink to a real mosquitto; a fake cloud acks each batch: state online, acked batches and
    events counted, last-ack age known and small."""
    cfg = make_cfg(tmp_path, uplink={"broker": mosquitto.url, "batch": {"linger": "50ms", "max_events": 200}})
    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="cloud-h") as cloud:
        await cloud.subscribe("edge/v1/acme/s001/edge-h/batch", qos=1)

        async def ack_all() -> None:
            async for msg in cloud.messages:
                b = parse_batch(bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b"")
                ack = make_ack(tenant="acme", store="s001", device="edge-h", seq=b.seq, hh=b.hh, ok=True)
                await cloud.publish("edge/v1/acme/s001/edge-h/ack", ack, qos=1)

        acker = asyncio.create_task(ack_all())
        try:
            async with running(cfg, [uplink_component, health_component(liveness)]) as rt:
                up = next(c for c in rt.components if c.name == "uplink")
                await wait_until(lambda: up.status()["acked"] >= 2)
                m = await scrape(listen_of(rt))
        finally:
            acker.cancel()
            await asyncio.gather(acker, return_exceptions=True)
    assert value(m, "edge_uplink_state", edge_uplink_state="online") == 1
    assert value(m, "edge_uplink_state", edge_uplink_state="backoff") == 0
    assert value(m, "edge_uplink_batches_total", outcome="acked") >= 2
    assert value(m, "edge_uplink_events_acked_total") > 0
    assert 0 <= value(m, "edge_uplink_last_ack_age_seconds") < 60
    assert value(m, "edge_uplink_acks_refused_total", reason="forged") == 0


# -- /healthz and HTTP hygiene -------------------------------------------------------------------


async def test_healthz_and_bad_requests_do_not_break_the_server(tmp_path: Path) -> None:
    """200 JSON on /healthz; HEAD has no body; 404, 405, 400 for the rest; an oversized request
    line is cut off; the server answers normally afterwards."""
    cfg = make_cfg(tmp_path)
    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with running(cfg, [health_component(liveness)]) as rt:
        addr = listen_of(rt)
        status, headers, body = await get(addr, "/healthz")
        assert (status, headers["content-type"]) == (200, "application/json")
        doc = json.loads(body)
        assert doc["status"] == "ok"
        assert doc["device"] == "edge-h"
        assert doc["uplink"] == "disabled"
        assert set(doc["drivers"]) == {"ble", "nfc", "pos:till-1"}
        status, headers, body = await http(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0
        assert (await get(addr, "/nope"))[0] == 404
        assert (await http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0] == 405
        assert (await http(addr, b"\x16\x03\x01garbage\r\n\r\n"))[0] == 400
        assert (await http(addr, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"))[0] in (0, 400)
        many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n"
        assert (await http(addr, many))[0] == 431
        assert (await get(addr, "/healthz"))[0] == 200
        assert listen_of(rt)[0] == "127.0.0.1"


def test_the_endpoint_is_local_unless_configured_otherwise() -> None:
    """Default listen address is loopback; a malformed one is a config error naming the form."""
    assert Health().listen.startswith("127.0.0.1:")
    assert Health(listen="[::1]:9108").address() == ("::1", 9108)
    with pytest.raises(ValueError, match="host:port"):
        Health(listen="9108")
    with pytest.raises(ValueError, match="brackets"):
        Health(listen="::1:9108")


async def test_a_taken_port_is_reported_but_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """Another process holds the port: the health component says failed; data still flows."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_cfg(tmp_path, health={"listen": f"127.0.0.1:{port}", "advertise": False})
        liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
        async with running(cfg, [health_component(liveness)]) as rt:
            health = next(c for c in rt.components if c.name == "health")
            assert health.status()["state"] == "failed"
            assert "in use" in str(health.status()["error"]).lower()
            await wait_until(lambda: rt.buffer.last_committed_id > 0)


async def test_a_full_disk_is_not_a_stall_for_the_watchdog(tmp_path: Path) -> None:
    """Disk full with nothing left to evict: events wait queued and nothing commits, but the
    writer is alive and retrying. Withholding the watchdog would have systemd kill the daemon
    (losing the queue, freeing no space) until the start limit leaves the unit failed."""
    cfg = make_cfg(tmp_path, buffer={"queue_max": 100, "commit_max_events": 50})
    clock = FakeClock()
    buf = await Buffer.open(cfg, clock)
    try:
        await buf.set_max_pages(1)
        for i in range(60):
            await buf.put(Pending(clock.wall_ms(), "ble", "presence.enter", {"pad": "x" * 200, "i": i}))
        async with asyncio.timeout(10):
            while buf.degraded is None:  # noqa: ASYNC110 - polling a property the buffer sets
                await asyncio.sleep(0.01)
        assert buf.queued > 0
        rt = cast(Runtime, SimpleNamespace(buffer=buf, pumps={}))
        liveness = Liveness(clock, 1.0)
        assert liveness.check(rt) is None
        clock.advance(120)
        assert liveness.check(rt) is None  # degraded, not stalled
    finally:
        await buf.set_max_pages(None)
        await buf.close()
