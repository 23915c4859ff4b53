"""The store page in a real browser: Debian's headless Chromium, driven by Playwright.

A real supervisor (simulated drivers, real SQLite buffer) runs the health component; a fake
analytics source with the shape of edge/analytics' `snapshot()` is handed to the runtime the way
the daemon does it (`rt.analytics`, set before the page is opened). What must hold:

- the page renders with data in every chart (footfall bars, conversion points, one heatmap cell
  per zone and interval, dwell bars), suppressed cells hatched, KPI tiles, drivers, buffer, uplink
  and config, and no console error or page error;
- when the data changes the page changes without a reload;
- no identifier or pseudonym appears on the page or in its JSON, even when a driver's error text
  quotes one;
- bound off loopback, the page, its APIs and /metrics refuse without the token; /?token= sets a
  cookie and leaves the address bar clean; /healthz stays open.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from playwright.async_api import ConsoleMessage, Error, Page, expect
from support.browser import chromium

from drivers.base import Driver
from drivers.registry import build_drivers
from edge.analytics.engine import StoreAnalytics
from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.health import Liveness, health_component
from edge.privacy.keys import KeyStore
from edge.status import collect_status, status_main
from edge.supervisor import Runtime, Supervisor

ZONES = ["entrance", "grocery", "checkout"]
DAY_START_MS = 1_796_630_400_000  # 2026-12-04 08:00 UTC
QUARTER_MS = 900_000
MAC = "a4:c1:38:9f:02:7e"
PSEUDONYM = re.compile(r"\b(?:ble|nfc|loy|mail|tel):[es][0-9a-z]{1,8}:[a-z2-7]{6,}")
IDENTIFIER = re.compile(r"(?i)\b[0-9a-f]{2}(?::[0-9a-f]{2}){5}\b|\b[0-9a-f]{2}(?::[0-9a-f]{2}){6}\b")


class FakeAnalytics:
    """edge/analytics' snapshot() contract, with a day that can grow while the page is open."""

    def __init__(self, intervals: int = 12) -> None:
        self.intervals = intervals
        self.footfall_total = 412

    def flush(self) -> list[Any]:
        """What the supervisor calls at stop: nothing open to publish here."""
        return []

    def status(self) -> dict[str, Any]:
        """What the supervisor writes into runtime.json."""
        return {"visits": 0}

    def health_reason(self) -> str | None:
        """What /healthz asks: analytics is advancing."""
        return None

    def snapshot(self) -> dict[str, Any]:
        ivs = []
        for i in range(self.intervals):
            start = DAY_START_MS + i * QUARTER_MS
            low = i == 0  # the first quarter: too few people, suppressed
            footfall = None if low else 10 + 3 * i
            receipts = None if low else 2 + i
            ivs.append({
                "start": start, "end": start + QUARTER_MS, "footfall": footfall, "receipts": receipts,
                "conversion": None if low else round((2 + i) / (10 + 3 * i), 3),
                "dwell": {"mean_s": None if low else 600.0, "p50_s": None if low else 480.0,
                          "p90_s": None if low else 1500.0},
                "occupancy": {z: ({"mean": None, "peak": None} if low and z != "entrance"
                                  else {"mean": 1.5 + zi + i * 0.4, "peak": 3 + zi + i})
                              for zi, z in enumerate(ZONES)},
            })
        return {
            "interval_s": 900, "day": "2026-12-04", "k": 5, "zones": list(ZONES), "intervals": ivs,
            "dwell_histogram": [{"bucket": "0-5m", "visits": 40}, {"bucket": "5-15m", "visits": 120},
                                {"bucket": "15-30m", "visits": 90}, {"bucket": "30-60m", "visits": 25},
                                {"bucket": "60m+", "visits": None}],
            "totals": {"footfall": self.footfall_total, "receipts": 95, "conversion": 0.231, "staff": 6},
            "suppressed": 7,
        }


def make_cfg(tmp_path: Path, **health: Any) -> Config:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = Config.model_validate({
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-web"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "buffer": {"commit_interval": "20ms"},
        "uplink": {"enabled": False},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": 50, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": 5, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 2, "seed": 3}}],
        },
        "health": {"listen": "127.0.0.1:0", "advertise": False, "drain_timeout": "5s", **health},
    })  # fmt: skip
    KeyStore(cfg.paths.keys_dir, SystemClock()).init()
    return cfg


class _Broken:
    """A backend whose device error text quotes a raw Bluetooth address (as a library might)."""

    name = "broken"

    async def readings(self) -> AsyncIterator[Any]:
        nothing: tuple[Any, ...] = ()
        for reading in nothing:  # an async generator that fails before its first reading
            yield reading
        raise OSError(f"device {MAC} not responding")

    async def aclose(self) -> None:
        return None


@asynccontextmanager
async def serving(
    cfg: Config, analytics: FakeAnalytics | None, config_path: str | None = None,
    drivers: Callable[[Config, Clock], Sequence[Driver]] | None = None,
) -> AsyncIterator[tuple[Runtime, str]]:
    """A running daemon core with the page; yields (runtime, base URL)."""

    is_ready = asyncio.Event()

    def ready(rt: Runtime) -> None:
        rt.analytics = cast("StoreAnalytics | None", analytics)  # the fake stands in for the engine's snapshot()
        is_ready.set()

    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    sup = Supervisor(cfg, SystemClock(), components=[health_component(liveness, config_path)],
                     drivers=drivers, on_ready=ready)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(stop))
    try:
        async with asyncio.timeout(30):
            while not is_ready.is_set():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
        rt = sup.runtime
        assert rt is not None
        health = next(c for c in rt.components if c.name == "health")
        listen = str(health.status()["listen"])
        port = listen.rpartition(":")[2]
        scheme = "https" if cfg.health.tls.enabled else "http"
        yield rt, f"{scheme}://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def watch_console(page: Page) -> list[str]:
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            problems.append(f"console {msg.type}: {msg.text}")

    def on_error(err: Error) -> None:
        problems.append(f"page error: {err}")

    page.on("console", on_console)
    page.on("pageerror", on_error)
    return problems


async def eventually(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):
        while not pred():  # noqa: ASYNC110 - polling state the daemon updates
            await asyncio.sleep(0.05)


async def count(page: Page, selector: str) -> int:
    return await page.locator(selector).count()


async def test_the_page_renders_every_chart_with_data_and_no_console_errors(tmp_path: Path) -> None:
    """Footfall bars (one per unsuppressed interval, the suppressed one hatched), conversion points,
    a heatmap cell per zone x interval, dwell bars; KPI tiles; drivers, buffer, uplink, config."""
    cfg = make_cfg(tmp_path)
    config_file = tmp_path / "store.yaml"
    config_file.write_text("# the local config\n")
    async with serving(cfg, FakeAnalytics(), str(config_file)) as (_rt, base), chromium(tmp_path) as ctx:
        page = await ctx.new_page()
        problems = watch_console(page)
        await page.goto(base + "/")
        await page.wait_for_selector("#chart-footfall rect.bar")
        await expect(page.locator("#drivers tbody tr")).to_have_count(3)
        assert await count(page, "#chart-footfall rect.bar") == 11
        assert await count(page, "#chart-footfall rect[data-suppressed]") == 1
        assert await count(page, "#chart-conversion circle.dot") == 11
        assert await count(page, "#chart-occupancy rect.cell") == 3 * 12
        assert await count(page, "#chart-occupancy rect.cell[data-suppressed]") == 2
        assert await count(page, "#chart-dwell rect.bar") == 4
        assert await count(page, "#chart-dwell rect[data-suppressed]") == 1
        for zone in ZONES:
            assert zone in (await page.text_content("#chart-occupancy") or "")
        assert await page.inner_text("#kpi-footfall") == "412"
        assert await page.inner_text("#kpi-receipts") == "95"
        assert await page.inner_text("#kpi-conversion") == "23.1 %"
        assert await page.inner_text("#kpi-staff") == "6"
        assert "7 hidden today" in await page.inner_text("#privacy-note")
        drivers = await page.inner_text("#drivers")
        for name in ("ble", "nfc", "pos:till-1"):
            assert name in drivers
        assert "running" in drivers
        assert "Waiting to send" in await page.inner_text("#buffer")
        assert "disabled" in await page.inner_text("#uplink")
        config_text = await page.inner_text("#config")
        assert str(config_file) in config_text
        assert "layers" not in config_text.lower()  # none applied yet: the local file only
        assert await page.inner_text("#store-name") == "Store s001"
        assert await page.inner_text("#overall") == "All good"
        shot = Path(os.environ.get("EDGE_PAGE_SCREENSHOT") or tmp_path / "page.png")
        await page.screenshot(path=str(shot), full_page=True)
        assert problems == []


async def test_the_page_updates_when_the_data_changes_without_a_reload(tmp_path: Path) -> None:
    """A new interval and a new total reach the open page by its polling; it is never reloaded."""
    cfg = make_cfg(tmp_path)
    fake = FakeAnalytics(intervals=6)
    async with serving(cfg, fake) as (rt, base), chromium(tmp_path) as ctx:
        page = await ctx.new_page()
        problems = watch_console(page)
        loads: list[str] = []
        page.on("load", lambda _p: loads.append("load"))
        await page.goto(base + "/")
        await expect(page.locator("#chart-footfall rect.bar")).to_have_count(5)
        await page.evaluate("window.__same_document = true")
        readings = await page.inner_text("#drivers tbody tr[data-driver='ble'] td:nth-child(3)")
        fake.intervals, fake.footfall_total = 8, 1234
        await expect(page.locator("#chart-footfall rect.bar")).to_have_count(7, timeout=15_000)
        await expect(page.locator("#kpi-footfall")).to_have_text("1,234")
        assert await count(page, "#chart-occupancy rect.cell") == 3 * 8
        await expect(page.locator("#drivers tbody tr[data-driver='ble'] td:nth-child(3)")).not_to_have_text(
            readings, timeout=15_000)
        assert await page.evaluate("window.__same_document") is True
        assert loads == ["load"]
        rt.analytics = None  # analytics switched off: the page says so
        await page.wait_for_selector("#analytics-off", state="visible", timeout=15_000)
        assert problems == []


async def test_no_identifier_or_pseudonym_reaches_the_page_or_its_json(tmp_path: Path) -> None:
    """BLE/NFC/POS readings flow (pseudonymized into the buffer) and a driver's device error quotes a
    raw MAC: page text, HTML and both JSON documents hold neither a MAC/UID nor a pseudonym."""
    cfg = make_cfg(tmp_path)

    def drivers(c: Config, k: Clock) -> list[Driver]:
        from drivers.base import Backoff

        return [*build_drivers(c, k), Driver("ble-door", "ble", _Broken(), k, backoff=Backoff(initial=0.01, max=0.05))]

    async with serving(cfg, FakeAnalytics(), drivers=drivers) as (rt, base), chromium(tmp_path) as ctx:
        door = next(d for d in rt.drivers if d.name == "ble-door")
        await eventually(lambda: rt.buffer.last_committed_id >= 20 and door.state == "degraded")
        page = await ctx.new_page()
        problems = watch_console(page)
        await page.goto(base + "/")
        await expect(page.locator("#drivers tbody tr")).to_have_count(4)
        texts = [await page.inner_text("body"), await page.content()]
        for api in ("/api/status", "/api/analytics"):
            resp = await page.request.get(base + api)
            assert resp.status == 200
            texts.append(await resp.text())
        degraded = await page.inner_text("#drivers tbody tr[data-driver='ble-door']")
        assert "degraded" in degraded
        assert "os_error" in degraded  # the reason code is shown; the error text (with its address) is not
        for t in texts:
            assert MAC not in t.lower()
            assert not IDENTIFIER.search(t), IDENTIFIER.search(t)
            assert not PSEUDONYM.search(t), PSEUDONYM.search(t)
        assert problems == []


async def test_off_loopback_the_page_apis_and_metrics_need_the_token(tmp_path: Path) -> None:
    """Bound to 0.0.0.0 (reached here over loopback only): without the token the page, /api/* and
    /metrics answer 401 and the page shows no data; /healthz stays open; the token is generated
    into the state folder with mode 0600 and `edge status` shows it; /?token= sets the cookie,
    redirects to a clean address, and the page then renders."""
    cfg = make_cfg(tmp_path, listen="0.0.0.0:0")
    config_file = tmp_path / "store.yaml"
    async with serving(cfg, FakeAnalytics()) as (_rt, base), chromium(tmp_path) as ctx:
        token_file = cfg.paths.state_dir / "web-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 16
        page = await ctx.new_page()
        resp = await page.goto(base + "/")
        assert resp is not None
        assert resp.status == 401
        assert "token" in await page.inner_text("body")
        assert await count(page, "#chart-footfall") == 0
        for path in ("/api/status", "/api/analytics", "/metrics", "/static/app.js"):
            assert (await page.request.get(base + path)).status == 401, path
        assert (await page.request.get(base + "/?token=wrong-token-0000000")).status == 401
        assert (await page.request.get(base + "/healthz")).status == 200
        ok = await page.request.get(base + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert ok.status == 200
        assert "edge_buffer_events" in await ok.text()

        problems = watch_console(page)
        await page.goto(f"{base}/?token={token}")
        assert page.url == base + "/"
        await page.wait_for_selector("#chart-footfall rect.bar")
        cookies = await ctx.cookies(base)
        cookie = next(c for c in cookies if c["name"] == "edge_token")
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert problems == []

        config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        doc = collect_status(str(config_file))
        assert doc["page"]["token"] == token


async def test_edge_status_prints_the_page_address_with_its_token(tmp_path: Path, capsys: Any) -> None:
    """While the daemon serves off loopback, `edge status` shows where the page is and its token."""
    cfg = make_cfg(tmp_path, listen="0.0.0.0:0")
    config_file = tmp_path / "store.yaml"
    config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    async with serving(cfg, None) as (rt, _base):
        from edge.supervisor import write_runtime_status

        write_runtime_status(rt)
        assert status_main(str(config_file), as_json=False) == 0
    out = capsys.readouterr().out
    token = (cfg.paths.state_dir / "web-token").read_text().strip()
    line = next(ln for ln in out.splitlines() if ln.startswith("page"))
    assert f"/?token={token}" in line
    assert line.split()[1].startswith("http://0.0.0.0:")
