"""`edge export --out` with a path that cannot be the file: a clear error, exit 2, nothing left behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.buffer import Buffer
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending

EDGE = str(Path(sys.executable).parent / "edge")


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A device config whose buffer holds 100 events; returns the config's path."""
    doc = {
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
        "drivers": {"ble": {"enabled": False}, "nfc": {"enabled": False}},
        "uplink": {"enabled": False},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))

    async def fill() -> None:
        buf = await Buffer.open(Config.model_validate(doc), FakeClock())
        for i in range(100):
            await buf.put(Pending(ts=1_767_225_600_000 + i, src="pos", type="pos.receipt", data={"i": i}))
        await buf.flush()
        await buf.close()

    asyncio.run(fill())
    return path


def export(cfg: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, "export", "--config", str(cfg), "--out", str(out)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_out_is_a_folder(device: Path, tmp_path: Path) -> None:
    """--out names a folder: exit 2, the message names it and suggests a file in it; no <dir>.partial."""
    stick = tmp_path / "stick"
    stick.mkdir()
    res = export(device, stick)
    assert res.returncode == 2
    assert res.stderr == (f"edge: export --out {stick}: is a folder; name a file in it, e.g. "
                          f"{stick / 'events.jsonl'}\n")
    assert list(tmp_path.glob("*.partial")) == []
    assert list(stick.iterdir()) == []


def test_out_parent_is_missing(device: Path, tmp_path: Path) -> None:
    """--out in a folder that does not exist: exit 2 naming the folder; nothing created."""
    out = tmp_path / "nostick" / "events.jsonl"
    res = export(device, out)
    assert res.returncode == 2
    assert res.stderr == f"edge: export --out {out}: the folder {out.parent} does not exist\n"
    assert "Traceback" not in res.stderr
    assert not out.parent.exists()


def test_out_parent_is_a_file(device: Path, tmp_path: Path) -> None:
    """--out under a regular file: exit 2, not a traceback."""
    (tmp_path / "f").write_text("x")
    res = export(device, tmp_path / "f" / "events.jsonl")
    assert res.returncode == 2
    assert "is not a folder" in res.stderr


def test_a_write_failure_leaves_no_partial_file(device: Path, tmp_path: Path) -> None:
    """A stick that fills up mid-export (/dev/full): exit 1, the partial file is removed."""
    out = tmp_path / "full.jsonl"
    (tmp_path / "full.jsonl.partial").symlink_to("/dev/full")
    res = export(device, out)
    assert res.returncode == 1
    assert "cannot write" in res.stderr
    assert "nothing was written" in res.stderr
    assert not out.exists()
    assert not (tmp_path / "full.jsonl.partial").exists()


def test_a_good_path_still_exports_everything(device: Path, tmp_path: Path) -> None:
    """The checks do not get in the way: 100 events written, no .partial left."""
    out = tmp_path / "events.jsonl"
    res = export(device, out)
    assert res.returncode == 0, res.stderr
    assert len(out.read_text().splitlines()) == 100
    assert list(tmp_path.glob("*.partial")) == []
