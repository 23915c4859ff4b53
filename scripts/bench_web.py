#!/usr/bin/env python3
"""Peak RSS of the daemon with analytics and the store page on, served and polled, beside the same
daemon without either (health and analytics off), in one run; plus aiohttp's own import cost.

Each variant is a fresh daemon process (simulated BLE/NFC/POS drivers, real SQLite buffer, uplink
off unless --uplink) running for --seconds. In the page variant `analytics.enabled` is true (the
real edge/analytics engine, fed by the simulated drivers) and a client polls /, app.js,
/api/status, /api/analytics and /metrics every --poll seconds, as an open page and a Prometheus
scrape would. So that the page's documents are measured at full size, the page reads a synthetic
full day (96 quarter-hours x 6 zones, every field filled) through the real engine, which keeps
running underneath. Peak RSS is the kernel's VmHWM of the daemon process at the end.

--before DIR runs the same variants with the code of DIR (a checkout of the revision to compare
with, e.g. `git worktree add /tmp/edge-main main`) and prints both columns side by side.

    .venv/bin/python scripts/bench_web.py [--seconds 30] [--poll 0.5] [--ble-rate 200] [--uplink]
                                          [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CEILING_MIB = 64.0
CLOUD_KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # RFC 8032 test 1 public key

# The daemon as `edge run` builds it; the page reads a full day through the real engine.
CHILD = r"""
import asyncio, sys
from edge.clock import SystemClock
from edge.configload import load_config
from edge.daemon import components_for
from edge.health import Liveness
from edge.logs import configure_logging
from edge.supervisor import Supervisor, install_signal_handlers

ZONES = ["entrance", "fresh", "grocery", "drinks", "household", "checkout"]
START = 1_796_630_400_000

class SyntheticDay:
    def snapshot(self):
        ivs = [{"start": START + i * 900_000, "end": START + (i + 1) * 900_000, "footfall": 20 + i % 7,
                "receipts": 5 + i % 3, "conversion": 0.25,
                "dwell": {"mean_s": 610.0, "p50_s": 480.0, "p90_s": 1500.0},
                "occupancy": {z: {"mean": 2.5 + j, "peak": 6 + j} for j, z in enumerate(ZONES)}}
               for i in range(96)]
        return {"interval_s": 900, "day": "2026-12-04", "k": 5, "zones": ZONES, "intervals": ivs,
                "dwell_histogram": [{"bucket": b, "visits": 40} for b in ("0-5m", "5-15m", "15-30m", "30-60m", "60m+")],
                "totals": {"footfall": 2100, "receipts": 480, "conversion": 0.229, "staff": 6}, "suppressed": 3}

class FullDay:
    # the real engine (ticker, status, flush, health) with a full day's snapshot for the page
    def __init__(self, real):
        self._real = real
    def __getattr__(self, name):
        return getattr(self._real, name)
    def snapshot(self):
        self._real.snapshot()  # the engine's own work stays in the figure
        return SyntheticDay().snapshot()

def ready(rt):
    if getattr(rt, "analytics", None) is not None:
        rt.analytics = FullDay(rt.analytics)

async def main(path):
    cfg = load_config(path)
    configure_logging(cfg.logging.level, cfg.logging.format)
    clock = SystemClock()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    liveness = Liveness(clock, cfg.health.stall_timeout)
    sup = Supervisor(cfg, clock, components=components_for(cfg, liveness, path), config_path=path, on_ready=ready)
    await sup.run(stop)

asyncio.run(main(sys.argv[1]))
"""


def config(state: Path, *, page: bool, ble_rate: float, uplink: bool) -> dict[str, Any]:
    zones = [{"name": "till", "min_rssi": -60}, {"name": "floor", "min_rssi": -85}]
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-bench"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        # --uplink: the uplink stack loaded and retrying against a closed loopback port (no broker)
        "uplink": {"enabled": uplink, "broker": "mqtt://127.0.0.1:9", "cloud_public_key": CLOUD_KEY},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": ble_rate, "seed": 1}, "presence": {"zones": zones}},
            "nfc": {"backend": "sim", "sim": {"rate": 2, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 1, "seed": 3}}],
        },
        "health": {"enabled": page, "listen": "127.0.0.1:0", "advertise": False},
        "logging": {"level": "warning", "format": "json"},
        "analytics": {"enabled": page},
    }


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_variant(
    work: Path, *, page: bool, seconds: float, poll: float, ble_rate: float, uplink: bool, tree: Path | None
) -> dict[str, float]:
    """One daemon run; `tree`: the source checkout to run (None: this one)."""
    state = work / (("page" if page else "baseline") + ("-before" if tree else ""))
    state.mkdir()
    path = state / "edge.yaml"
    path.write_text(json.dumps(config(state, page=page, ble_rate=ble_rate, uplink=uplink)))
    edge = str(Path(sys.executable).parent / "edge")
    subprocess.run([edge, "keys", "init", "--config", str(path)], check=True, capture_output=True)
    env = dict(os.environ)
    if tree is not None:  # ahead of the editable install (and of the cwd, which -c puts first)
        env["PYTHONPATH"] = str(tree)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.DEVNULL,
                             env=env, cwd=tree or state)
    polls = 0
    try:
        runtime = state / "runtime.json"
        deadline = time.monotonic() + 30
        while not runtime.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        base = None
        if page:
            listen = json.loads(runtime.read_text())["components"]["health"]["listen"]
            base = f"http://{listen}"
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if base is not None:
                for p in ("/", "/static/app.js", "/api/status", "/api/analytics", "/metrics"):
                    with urllib.request.urlopen(base + p, timeout=10) as r:  # noqa: S310 - loopback only
                        r.read()
                polls += 1
            time.sleep(poll)
        return {"peak_rss_mib": vm(child.pid, "VmHWM"), "rss_mib": vm(child.pid, "VmRSS"), "polls": polls}
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def import_cost(tree: Path | None = None) -> dict[str, float]:
    """aiohttp.web's import time and the max-RSS it adds on top of the daemon's own imports."""
    code = (
        "import resource, time\n"
        "import edge.daemon, edge.health, edge.uplink.service, drivers.registry\n"
        "a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter(); import aiohttp.web; dt = time.perf_counter() - t\n"
        "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(a / 1024, b / 1024, dt * 1000)\n"
    )
    runs = []
    for _ in range(3):
        env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else None
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env=env, cwd=tree or tempfile.gettempdir()).stdout
        runs.append([float(x) for x in out.split()])
    before, after, ms = (sorted(col)[1] for col in zip(*runs, strict=True))
    return {"before_mib": before, "after_mib": after, "added_mib": after - before, "import_ms": ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--ble-rate", type=float, default=200.0)
    ap.add_argument("--uplink", action="store_true", help="uplink enabled (retrying: no broker) in both variants")
    ap.add_argument("--before", type=Path, help="a checkout of the code to compare with, run side by side")
    args = ap.parse_args()
    trees: list[tuple[str, Path | None]] = [("now", None)]
    if args.before is not None:
        if not (args.before / "edge" / "daemon.py").is_file():
            ap.error(f"--before {args.before}: not a store-edge checkout")
        trees.insert(0, ("before", args.before.resolve()))
    cols: dict[str, tuple[dict[str, float], dict[str, float], dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-web-") as d:
        common = {"seconds": args.seconds, "poll": args.poll, "ble_rate": args.ble_rate, "uplink": args.uplink}
        for label, tree in trees:
            cost = import_cost(tree)
            base = run_variant(Path(d), page=False, tree=tree, **common)
            page = run_variant(Path(d), page=True, tree=tree, **common)
            cols[label] = (cost, base, page)
    for label, (cost, _, _) in cols.items():
        print(f"{label}: aiohttp.web import {cost['import_ms']:.0f} ms, +{cost['added_mib']:.1f} MiB max RSS "
              f"(daemon imports {cost['before_mib']:.1f} -> {cost['after_mib']:.1f} MiB), median of 3")
    uplink = "uplink on (retrying)" if args.uplink else "uplink off"
    head = "".join(f"{label + ' peak/end':>22}" for label in cols)
    print(f"{'variant (' + uplink + ')':<40}{head}")
    for name, ix in (("baseline: no page, no analytics", 1), ("page + analytics, polled", 2)):
        row = "".join(f"{c[ix]['peak_rss_mib']:>10.1f} /{c[ix]['rss_mib']:>5.1f} MiB" for c in cols.values())
        print(f"{name:<40}{row}")
    print(f"{'page polls':<40}" + "".join(f"{c[2]['polls']:>22.0f}" for c in cols.values()))
    now = cols["now"]
    delta = now[2]["peak_rss_mib"] - now[1]["peak_rss_mib"]
    ok = now[2]["peak_rss_mib"] <= CEILING_MIB
    if "before" in cols:
        print(f"page + analytics peak: {cols['before'][2]['peak_rss_mib']:.1f} -> {now[2]['peak_rss_mib']:.1f} MiB "
              f"({now[2]['peak_rss_mib'] - cols['before'][2]['peak_rss_mib']:+.1f})")
    print(f"now: page + analytics add {delta:+.1f} MiB peak; ceiling {CEILING_MIB:.0f} MiB: "
          f"{'OK' if ok else 'EXCEEDED'} ({CEILING_MIB - now[2]['peak_rss_mib']:+.1f} MiB margin)")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
