"""Fleet simulator memory and throughput: `edge-cloud fleet-sim` for several fleet sizes, one run.

    .venv/bin/python scripts/bench_fleetsim.py [--devices 50,500] [--events 200]

Starts its own mosquitto (free loopback port) and the reference receiver (`edge-cloud receive`,
a subprocess: verifies, dedupes in SQLite, signs acks). For each fleet size it registers the
fleet's keys (`fleet-sim --init-only`), then runs `edge-cloud fleet-sim --json` in a fresh
subprocess until every event is acked, and prints its figures. Memory is the simulator
process's own (/proc/self/status): VmRSS before the first device opens (the baseline: the
interpreter and imports, measured in the same process), VmHWM at the end; per device =
(peak - baseline) / devices.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hil.peers.mosquitto import Mosquitto  # noqa: E402 - after the path insert

CLOUD = str(Path(sys.executable).parent / "edge-cloud")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="50,500", help="comma-separated fleet sizes")
    ap.add_argument("--events", type=int, default=200, help="events per device")
    args = ap.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleetsim-") as tmp, Mosquitto(Path(tmp) / "mq") as mq:
        d = Path(tmp)
        subprocess.run([CLOUD, "keys", "create", "--out", str(d / "cloud.key")], check=True, capture_output=True)
        (d / "keys").mkdir()
        (d / "receiver.yaml").write_text(
            f"broker: {mq.url}\nkeys_dir: {d / 'keys'}\ndb: {d / 'r.db'}\nout: {d / 'events.jsonl'}\n"
            f"cloud_key: {d / 'cloud.key'}\nlogging:\n  level: warning\n"
        )
        for n in sizes:
            common = [CLOUD, "fleet-sim", "--devices", str(n), "--events", str(args.events), "--broker", mq.url,
                      "--state", str(d / f"fleet-{n}"), "--keys-dir", str(d / "keys"),
                      "--cloud-key", str(d / "cloud.key"), "--tenant", f"bench{n}"]  # fmt: skip
            subprocess.run([*common, "--init-only"], check=True, capture_output=True)
            with (d / "receiver.log").open("ab") as log:
                receiver = subprocess.Popen([CLOUD, "receive", "--config", str(d / "receiver.yaml")],
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            try:
                time.sleep(1.5)
                done = subprocess.run([*common, "--json", "--timeout", "300"], check=False,
                                      capture_output=True, text=True)  # fmt: skip
            finally:
                receiver.terminate()
                receiver.wait(20)
            if done.returncode != 0:
                print(done.stdout, done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'devices':>8} {'events':>8} {'seconds':>8} {'events/s':>9} {'rss start':>10} {'rss peak':>10} "
          f"{'per device':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['devices']:>8} {r['acked']:>8} {r['seconds']:>8} {r['events_per_s']:>9} "
              f"{r['rss_start_kib'] / 1024:>7.1f} MiB {r['rss_peak_kib'] / 1024:>7.1f} MiB "
              f"{r['rss_per_device_kib']:>7.0f} KiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
