#!/usr/bin/env python3
"""Peak RSS of the daemon with the store page served and polled, beside the same daemon without
the page (health disabled), in one run; plus aiohttp's own import cost.

Each variant is a fresh daemon process (simulated BLE/NFC/POS drivers, real SQLite buffer, uplink
off) running for --seconds. In the page variant a client polls /, /api/status, /api/analytics and
/metrics every --poll seconds, as an open page and a Prometheus scrape would, and the runtime carries
an analytics source: the real one when the config enables edge/analytics, else a synthetic day
(96 quarter-hours x 6 zones, every field filled) so the page's share is measured at full size.
Peak RSS is the kernel's VmHWM of the daemon process at the end.

    .venv/bin/python scripts/bench_web.py [--seconds 30] [--poll 0.5] [--ble-rate 200] [--uplink]
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

# The daemon as `edge run` builds it, plus an analytics source when the config has none.
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

def ready(rt):
    if getattr(rt, "analytics", None) is None:
        rt.analytics = SyntheticDay()

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
    return {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-bench"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        # --uplink: the uplink stack loaded and retrying against a closed loopback port (no broker)
        "uplink": {"enabled": uplink, "broker": "mqtt://127.0.0.1:9"},
        "drivers": {
            "ble": {"backend": "sim", "sim": {"rate": ble_rate, "seed": 1}},
            "nfc": {"backend": "sim", "sim": {"rate": 2, "seed": 2}},
            "pos": [{"name": "till-1", "backend": "sim", "framing": "lines", "sim": {"rate": 1, "seed": 3}}],
        },
        "health": {"enabled": page, "listen": "127.0.0.1:0", "advertise": False},
        "logging": {"level": "warning", "format": "json"},
    }


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_variant(
    work: Path, *, page: bool, seconds: float, poll: float, ble_rate: float, uplink: bool
) -> dict[str, float]:
    state = work / ("page" if page else "baseline")
    state.mkdir()
    path = state / "edge.yaml"
    path.write_text(json.dumps(config(state, page=page, ble_rate=ble_rate, uplink=uplink)))
    edge = str(Path(sys.executable).parent / "edge")
    subprocess.run([edge, "keys", "init", "--config", str(path)], check=True, capture_output=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.DEVNULL)
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


def import_cost() -> dict[str, float]:
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
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        runs.append([float(x) for x in out.split()])
    before, after, ms = (sorted(col)[1] for col in zip(*runs, strict=True))
    return {"before_mib": before, "after_mib": after, "added_mib": after - before, "import_ms": ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--ble-rate", type=float, default=200.0)
    ap.add_argument("--uplink", action="store_true", help="uplink enabled (retrying: no broker) in both variants")
    args = ap.parse_args()
    cost = import_cost()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as d:
        common = {"seconds": args.seconds, "poll": args.poll, "ble_rate": args.ble_rate, "uplink": args.uplink}
        base = run_variant(Path(d), page=False, **common)
        page = run_variant(Path(d), page=True, **common)
    print(f"aiohttp.web import: {cost['import_ms']:.0f} ms, +{cost['added_mib']:.1f} MiB max RSS "
          f"(daemon imports {cost['before_mib']:.1f} -> {cost['after_mib']:.1f} MiB), median of 3")
    print(f"{'variant':<34} {'peak RSS':>10} {'RSS at end':>11} {'page polls':>11}")
    print(f"{'baseline: no page (health off)':<34} {base['peak_rss_mib']:>7.1f} MiB {base['rss_mib']:>7.1f} MiB "
          f"{'-':>11}")
    print(f"{'page + analytics, polled':<34} {page['peak_rss_mib']:>7.1f} MiB {page['rss_mib']:>7.1f} MiB "
          f"{page['polls']:>11.0f}")
    delta = page["peak_rss_mib"] - base["peak_rss_mib"]
    ok = page["peak_rss_mib"] <= CEILING_MIB
    print(f"page adds {delta:+.1f} MiB peak; ceiling {CEILING_MIB:.0f} MiB: {'OK' if ok else 'EXCEEDED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
