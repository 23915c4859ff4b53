"""`edge demo --state DIR` run twice on one folder: the second run counts only its own events and
does not sit out the drain timeout; without a terminal the progress is plain lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

EDGE = str(Path(sys.executable).parent / "edge")


def demo(state: Path, summary: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run([EDGE, "demo", "--duration", "3", "--state", str(state), "--summary", str(summary)],
                         capture_output=True, text=True, timeout=100, check=False)
    return res, time.monotonic() - t0


def test_a_reused_state_counts_this_run_only_and_drains_promptly(tmp_path: Path) -> None:
    """Run 2 on run 1's folder: ok, generated == received (this run's), ids continue after run 1's,
    and it ends well before the 60 s drain bound; stderr (a pipe) has no \\r redraws."""
    state = tmp_path / "st"
    first, _ = demo(state, tmp_path / "one.json")
    assert first.returncode == 0, first.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    second, took = demo(state, tmp_path / "two.json")
    assert second.returncode == 0, second.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["events_generated"] > 0
    assert two["events_generated"] == two["events_received"]
    assert two["events_generated"] < one["events_generated"] * 3  # not run 1's plus run 2's
    assert two["kid"] == one["kid"]  # the same device, its keys kept
    assert took < 45, f"the second demo took {took:.0f}s: it waited for the drain timeout"
    assert "\r" not in first.stderr + second.stderr
    assert "[ running]" in second.stderr
    assert "[    done]" in second.stderr
