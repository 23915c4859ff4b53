"""`edge export` on a TTY: a progress bar against the buffer's total, and a complete file."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import yaml

from edge.buffer import Buffer
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending

EDGE = str(Path(sys.executable).parent / "edge")
N = 12_000


async def fill(cfg: Config) -> None:
    buf = await Buffer.open(cfg, FakeClock())
    for i in range(N):
        await buf.put(Pending(ts=1_767_225_600_000 + i, src="pos", type="pos.receipt", data={"i": i}))
    await buf.flush()
    await buf.close()


def test_export_shows_a_progress_bar_with_the_total_on_a_tty(tmp_path: Path) -> None:
    """Every event lands in the file; stderr (a TTY) shows `[####...] 100%  12000/12000 events`."""
    doc = {
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
        "drivers": {"ble": {"enabled": False}, "nfc": {"enabled": False}},
        "uplink": {"enabled": False},
    }
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    asyncio.run(fill(Config.model_validate(doc)))

    master, slave = pty.openpty()
    out = tmp_path / "rescue.jsonl"
    proc = subprocess.run(
        [EDGE, "export", "--config", str(cfg_path), "--out", str(out)],
        stderr=slave,
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )
    os.close(slave)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # EIO once the slave side is closed and drained
        pass
    os.close(master)
    assert proc.returncode == 0
    text = shown.decode()
    assert "[" + "#" * 30 + "] 100%  12000/12000 events" in text
    assert " 5000/12000 events" in text  # redrawn while it runs
    lines = out.read_text().splitlines()
    assert len(lines) == N
    assert json.loads(lines[-1])["data"] == {"i": N - 1}
    assert not out.with_name(out.name + ".partial").exists()
