"""The HIL rig's parts, without running a scenario: the scenario format, the leak scan, the
chain walk, the report, the stand-ins' replay, and the hardware adapters' clean skips."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from drivers.base import SimOptions
from drivers.ble.config import Ble
from drivers.ble.sim import BleSim
from drivers.nfc.config import Nfc
from drivers.nfc.sim import NfcSim
from edge.clock import FakeClock
from edge.configbase import SimRate
from edge.leakscan import needles_for
from edge.leakscan import scan as slow_scan
from hil import leaks
from hil.checks import Analysis, chain_of
from hil.hardware import HciBleHw, Pn532NfcHw, Rig, SerialPosHw
from hil.report import junit
from hil.runner import RunData, expand
from hil.scenario import PosReceipt, Scenario, ScenarioError, UplinkDown, UplinkUp, load_scenario
from hil.session import run_scenario
from hil.standin import replay_identifiers

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "hil" / "scenarios"


def _scenario(**kw: object) -> Scenario:
    return Scenario.model_validate({"name": "t", "duration": "10s", **kw})


# ------------------------------------------------------------------------------ scenario format


def test_every_shipped_scenario_loads_and_asserts_figures() -> None:
    """Each CI scenario parses and asserts more than that it ran: leaks and the chain at least."""
    files = sorted(SCENARIOS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"store-day", "weekend-offline", "flaky-uplink", "ble-wedge",
                                       "pos-garbage", "corrupt-db", "disk-full"}  # fmt: skip
    for f in files:
        sc = load_scenario(f)
        assert sc.name == f.stem
        assert sc.duration <= 60, f"{f.name}: CI scenarios stay under a minute"
        assert sc.expect.leaks == 0
        assert sc.expect.events or sc.expect.degraded or sc.expect.dropped.min


def test_a_typo_in_a_step_names_the_file_line_and_key(tmp_path: Path) -> None:
    """An unknown key in a step is an error at its line, never a silently ignored stimulus."""
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nduration: 10s\ntimeline:\n  - {at: 1s, do: uplink.down}\n"
                 "  - {at: 2s, do: pos.receipt, tilll: till-1}\n")  # fmt: skip
    with pytest.raises(ScenarioError) as err:
        load_scenario(f)
    assert any(p.startswith(f"{f}:5: timeline.1") and "tilll" in p for p in err.value.problems), err.value.problems


def test_steps_after_the_end_and_unknown_tills_are_refused() -> None:
    with pytest.raises(ValueError, match="after the end"):
        _scenario(timeline=[{"at": "11s", "do": "uplink.down"}])
    with pytest.raises(ValueError, match="till 'till-9'"):
        _scenario(timeline=[{"at": "1s", "do": "pos.receipt", "till": "till-9"}])
    with pytest.raises(ValueError, match="tmpfs"):
        _scenario(timeline=[{"at": "1s", "do": "disk.fill"}])


def test_a_flap_unrolls_into_downs_and_ups_within_its_span() -> None:
    sc = _scenario(timeline=[{"at": "1s", "do": "uplink.flap", "period": "3s", "down": "1s", "until": "8s"},
                             {"at": "2s", "do": "pos.receipt"}])  # fmt: skip
    steps = expand(sc)
    flips = [(type(s).__name__, s.at) for s in steps if isinstance(s, UplinkDown | UplinkUp)]
    assert flips == [("UplinkDown", 1.0), ("UplinkUp", 2.0), ("UplinkDown", 4.0), ("UplinkUp", 5.0),
                     ("UplinkDown", 7.0), ("UplinkUp", 8.0)]  # fmt: skip
    assert isinstance(steps[2], PosReceipt)  # time order, stable


# ------------------------------------------------------------------------------ leak scan


def test_fast_scan_finds_every_encoding_the_slow_scan_finds(tmp_path: Path) -> None:
    """Planted identifiers in several encodings, at chunk edges too: both scanners agree."""
    rng = random.Random(5)
    idents = [("ble_address", "5C:F3:70:8B:21:D4"), ("nfc_uid", "04A1B2C3D4E5F6"), ("loyalty_id", "927364518203"),
              ("card_number", "4539 1488 0343 6467"), ("email", "jane.doe@example.com"), ("phone", "+49 30 9876543")]
    ns = leaks.needles(idents)  # type: ignore[arg-type]  # literals of the IdentClass values
    data = bytearray(rng.randbytes(300_000))
    for i, n in enumerate(ns[::3]):
        at = 1000 + i * 4000
        data[at : at + len(n.pattern)] = n.pattern
    data[-len(ns[1].pattern) :] = ns[1].pattern
    (tmp_path / "blob.bin").write_bytes(bytes(data))
    (tmp_path / "clean.bin").write_bytes(rng.randbytes(100_000))
    fast = {(f.path, f.needle) for f in leaks.scan([tmp_path], ns)}
    slow = {(f.path, f.needle) for f in slow_scan([tmp_path], ns)}
    assert fast == slow
    assert len(fast) >= len(ns[::3])
    assert not any(p.endswith("clean.bin") for p, _ in fast)


def test_needles_of_a_malformed_identifier_fall_back_to_its_text() -> None:
    """A peer's odd identifier is still searched for, as text, instead of crashing the scan."""
    assert [n.pattern for n in leaks.needles([("nfc_uid", "not-hex")])] == [b"not-hex"]
    assert leaks.needles([("email", "a@b.example")]) == needles_for("email", "a@b.example")


# ------------------------------------------------------------------------------ stand-ins


async def test_replayed_identifiers_are_the_ones_the_daemons_sim_used() -> None:
    """The sim's identifiers do not depend on its pace: a replay at full speed finds every
    identifier a paced run used (the stand-in's leak-scan needles are complete)."""
    clock = FakeClock()

    async def tick(s: float) -> None:
        clock.advance(s)

    sim = NfcSim(Nfc(sim=SimRate(rate=3.0, seed=8102)), clock, sleep=tick, limit=300)
    seen = {(i.cls, i.raw) for r in [r async for r in sim.readings()] for i in r.ids.values()}
    replayed = set(await replay_identifiers("nfc", 8102, 300, ["till-1"]))
    assert seen
    assert seen <= replayed
    assert SimOptions().inject == ()  # the daemon's sims run without injection under `edge run`


async def test_replayed_ble_addresses_cover_a_paced_sim_run() -> None:
    """Every address a paced BLE sim run reported is among the replayed ones (the sim's
    addresses do not depend on its pace)."""
    clock = FakeClock()

    async def tick(s: float) -> None:
        clock.advance(s)
        await asyncio.sleep(0)

    sim = BleSim(Ble(sim=SimRate(rate=5.0, seed=8101)), clock, sleep=tick, limit=300)
    seen = {(i.cls, i.raw) for r in [r async for r in sim.readings()] for i in r.ids.values()}
    replayed = set(await replay_identifiers("ble", 8101, 300, ["till-1"]))
    assert seen
    assert seen <= replayed


# ------------------------------------------------------------------------------ chain and report


def _receiver_db(path: Path, rows: list[tuple[int, int, bytes, bytes]]) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE batches (tenant, store, device, seq, epoch, hh, prev)")
        conn.executemany("INSERT INTO batches VALUES ('t','s','d',?,?,?,?)", rows)


def test_chain_walk_counts_holes_and_broken_links_per_epoch(tmp_path: Path) -> None:
    h = [bytes([i]) * 32 for i in range(8)]
    _receiver_db(tmp_path / "r.db", [(1, 1, h[1], bytes(32)), (2, 1, h[2], h[1]), (4, 1, h[4], h[3]),
                                     (5, 1, h[5], h[7]), (1, 2, h[6], bytes(32))])  # fmt: skip
    facts = chain_of(tmp_path / "r.db")
    assert (facts.batches, facts.epochs, facts.holes, facts.broken) == (5, 2, 1, 1)


def test_junit_has_one_case_per_check_with_failures_and_skips(tmp_path: Path) -> None:
    data = RunData(_scenario(), "sim", tmp_path)
    a = Analysis(known={"c": "bug 1"})
    a.add("a", True, 1, ">= 1")
    a.add("b", False, 0, ">= 1")
    a.add("c", False, 0, ">= 1")
    a.add("d", None, 0, ">= 1", "stand-in")
    suite = ET.fromstring(junit(data, a, 1.0)).find("testsuite")  # noqa: S314 - our own output
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "2")
    assert not a.ok


# ------------------------------------------------------------------------------ hardware target


def test_hardware_adapters_say_what_is_missing() -> None:
    sc = _scenario(timeline=[{"at": "1s", "do": "pos.receipt"}])
    assert "not configured" in (SerialPosHw(sc, Rig()).unavailable() or "")
    rig = Rig(pos_port="/dev/ttyHIL-none", pos_rig_port="/dev/ttyHIL-none2", nfc_reader="usb:0000:0000",
              nfc_target="tty:HILNONE:pn532", ble_advertiser="hci97", ble_adapter="hci98")  # fmt: skip
    assert "does not exist" in (SerialPosHw(sc, rig).unavailable() or "")
    assert Pn532NfcHw(sc, rig).unavailable()
    assert HciBleHw(sc, rig).unavailable()


async def test_hw_run_without_hardware_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """`--target hw` on a machine without the rig: skipped (JUnit <skipped>), never failed."""
    sc = load_scenario(SCENARIOS / "pos-garbage.yaml")
    result = await run_scenario(sc, target="hw", report=tmp_path)
    assert result.ok
    assert result.skipped is not None
    assert "pos" in result.skipped
    suite = ET.parse(result.paths["junit"]).getroot().find("testsuite")  # noqa: S314 - our own output
    assert suite is not None
    assert suite.get("skipped") == "1"


async def test_serial_pos_hardware_prints_escpos_receipts_on_its_port(tmp_path: Path) -> None:
    """The hw POS adapter against a pty pair (a serial port as far as pyserial knows)."""
    master, slave = os.openpty()
    try:
        port = os.ttyname(slave)
        sc = _scenario(timeline=[{"at": "1s", "do": "pos.receipt", "loyalty": True, "pan": "full"}])
        peer = SerialPosHw(sc, Rig(pos_port=port, pos_rig_port=port))
        assert peer.unavailable() is None
        await peer.start()
        outcome = await peer.apply(sc.timeline[0])
        await peer.stop()
        out = await asyncio.to_thread(os.read, master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert outcome.applied == "applied"
    assert b"TOTAL" in out
    assert b"\x1dV" in out  # the paper cut
    ledger = await peer.ledger({})
    assert ledger.expected["pos.receipt"] == 1
    assert {c for c, _ in ledger.identifiers} == {"loyalty_id", "card_number"}


def test_cli_refuses_a_bad_scenario_with_exit_code_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nduration: -1\n")
    proc = subprocess.run([sys.executable, "-m", "hil", "run", str(f)], capture_output=True, text=True,
                          cwd=ROOT, check=False, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert f"{f}:2: duration" in proc.stderr
