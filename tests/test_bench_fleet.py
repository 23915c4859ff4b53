"""scripts/bench_fleet.py stays runnable: `--quick --parts a` (drain of a pre-filled EDGE_BATCHES
into PostgreSQL beside a COPY baseline) on its own local cloud, everything verified by SQL.

Only that it runs and its checks pass; the figures themselves are not asserted (a speed target
belongs to the benchmark, not to CI on a loaded machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cloud

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_fleet_quick_drain_runs_and_verifies() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fleet.py"), "--quick", "--parts", "a",
                           "--json"], capture_output=True, text=True, timeout=110, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a = json.loads(done.stdout.strip().splitlines()[-1])["a"]
    assert a["verified"] is True
    assert a["events"] == 50 * 200
    for d in a["drain"].values():
        assert d["acks_verified"] == a["batches"]
        assert d["check"].startswith(f"{a['events']} events (0 lost, 0 duplicates)")
    assert a["copy_events_per_s"][0] > 0
