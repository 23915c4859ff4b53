"""The shipped systemd/ files, checked by the tools that will read them, and logging under journald.

- systemd/verify.sh (what CI runs): `systemd-analyze verify` prints nothing for edge.service,
  and `systemd-analyze security --offline=true` rates it OK (exposure <= 2.5); a unit with a
  typo, or with its hardening removed, makes the script fail.
- edge.service says what the issue asks for (notify, watchdog, restart, directories, user and
  groups, hardening, device access, a stop timeout longer than the drain timeout).
- 60-store-edge.rules is well-formed udev syntax, gives the NFC readers to group store-edge and
  stable names to USB serial adapters; the BlueZ policy is accepted by a real dbus-daemon.
- Logs: JSON when stdout is the journal (JOURNAL_STREAM), even on a terminal; console on a
  terminal otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from edge.config import Health
from edge.logs import configure_logging, is_journal_stream

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
VERIFY = SYSTEMD / "verify.sh"
MAX_EXPOSURE = 2.5


def directives(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    out, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(unit: Path, key: str) -> list[str]:
    return [v for _, k, v in directives(unit) if k == key]


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", text)
    assert m is not None, text
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def run_verify(unit: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd; scripts/bootstrap.sh test)")
    args = ["bash", str(VERIFY)] + (["", str(unit)] if unit is not None else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


# -- the unit, by systemd-analyze -------------------------------------------------------------------


def test_verify_is_silent_and_exposure_is_ok() -> None:
    """verify.sh exits 0 with nothing on stderr; the recorded exposure is <= 2.5 and rated OK."""
    res = run_verify()
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    m = re.search(r"Overall exposure level for edge\.service: (\d+\.\d) (\w+)", res.stdout)
    assert m is not None, res.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE
    assert m.group(2) == "OK"


def test_verify_checks_every_shipped_unit() -> None:
    """No unit argument: every systemd/*.service is verified and rated, the worker's unit too."""
    res = run_verify()
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    for unit in sorted(SYSTEMD.glob("*.service")):
        m = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d) (\w+)", res.stdout)
        assert m is not None, (unit.name, res.stdout)
        assert float(m.group(1)) <= MAX_EXPOSURE
        assert m.group(2) == "OK"


def test_ingest_unit_runs_the_worker_as_its_own_user_hardened_with_its_secrets_as_credentials() -> None:
    unit = SYSTEMD / "edge-cloud-ingest.service"
    (execstart,) = values(unit, "ExecStart")
    assert execstart == "/opt/store-edge/venv/bin/edge-cloud ingest --config /etc/edge-cloud/cloud.yaml"
    for key, want in {
        "DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
        "LimitCORE": "0", "RestartPreventExitStatus": "2", "KillSignal": "SIGTERM",
    }.items():  # fmt: skip
        assert values(unit, key) == [want], key
    assert set(" ".join(values(unit, "RestrictAddressFamilies")).split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    creds = {v.split(":", 1)[0] for v in values(unit, "LoadCredential")}
    assert creds == {"nats-password", "pg-password", "cloud-key", "token-key"}
    # the shipped config reads exactly those credentials
    shipped = (ROOT / "config" / "cloud.yaml").read_text()
    for name in creds:
        assert f"/run/credentials/edge-cloud-ingest.service/{name}" in shipped


def test_verify_fails_on_any_warning_and_on_weak_hardening(tmp_path: Path) -> None:
    """systemd-analyze exits 0 on an unknown key; verify.sh must not. Nor may hardening erode."""
    unit = (SYSTEMD / "edge.service").read_text()
    typo = tmp_path / "typo.service"
    typo.write_text(unit.replace("Restart=on-failure", "Restrat=on-failure"))
    res = run_verify(typo)
    assert res.returncode != 0
    assert "Restrat" in res.stderr
    weak = tmp_path / "weak.service"
    weak.write_text("\n".join(ln for ln in unit.splitlines()
                              if not ln.startswith(("Protect", "Restrict", "SystemCall", "Capability"))))
    res = run_verify(weak)
    assert res.returncode != 0
    assert "exposure above 2.5" in res.stderr


def test_unit_is_a_notify_service_with_watchdog_restart_and_its_directories() -> None:
    unit = SYSTEMD / "edge.service"
    assert values(unit, "Type") == ["notify"]
    assert values(unit, "NotifyAccess") == ["main"]
    assert values(unit, "Restart") == ["on-failure"]
    assert seconds(values(unit, "WatchdogSec")[0]) >= 10
    assert values(unit, "StateDirectory") == ["store-edge"]
    assert values(unit, "ConfigurationDirectory") == ["store-edge"]
    assert values(unit, "LogsDirectory") == ["store-edge"]
    (execstart,) = values(unit, "ExecStart")
    assert execstart == "/opt/store-edge/venv/bin/edge run --config /etc/store-edge/store.yaml"
    # ProcSubset=pid hides /proc/sys/kernel/random/boot_id: retention marks get it from here
    assert "EDGE_BOOT_ID=%b" in values(unit, "Environment")


def test_stop_timeout_outlasts_the_daemons_own_drain() -> None:
    """TimeoutStopSec exceeds health.drain_timeout (the default) with room for closing."""
    stop = seconds(values(SYSTEMD / "edge.service", "TimeoutStopSec")[0])
    assert stop >= Health().drain_timeout + 10


def test_unit_runs_as_a_dedicated_user_with_hardening_and_only_serial_and_usb_devices() -> None:
    unit = SYSTEMD / "edge.service"
    assert values(unit, "User") == ["store-edge"]
    assert values(unit, "SupplementaryGroups") == ["dialout"]
    for key, want in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "DevicePolicy": "closed", "MemoryDenyWriteExecute": "yes",
    }.items():  # fmt: skip
        assert values(unit, key) == [want], key
    # ProtectClock= would deny reading adjtimex too (see test_clock.py): the clock's sync state
    # must stay knowable; setting the clock is impossible anyway without CAP_SYS_TIME
    assert values(unit, "ProtectClock") == ["no"]
    families = set(" ".join(values(unit, "RestrictAddressFamilies")).split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_BLUETOOTH"}
    filters = values(unit, "SystemCallFilter")
    assert filters[0] == "@system-service"
    # @system-service (and ~@privileged) leave out adjtimex; it is allowed again last
    assert filters[-1].split() == ["adjtimex", "clock_adjtime", "clock_adjtime64"]
    assert set(values(unit, "DeviceAllow")) == {"char-ttyUSB rw", "char-ttyACM rw", "char-usb_device rw"}


def test_unit_forbids_core_dumps_of_a_process_holding_raw_identifiers() -> None:
    """LimitCORE=0, exactly once: a missed watchdog (SIGABRT) must not write the daemon's memory
    (raw BLE addresses, NFC UIDs, unscrubbed POS lines) to disk. tests/test_coredump.py checks
    that `edge run` also sets the limit itself."""
    unit = SYSTEMD / "edge.service"
    assert values(unit, "WatchdogSec")  # the reason it matters: the watchdog kills with SIGABRT
    assert values(unit, "LimitCORE") == ["0"]
    assert [s for s, k, _ in directives(unit) if k == "LimitCORE"] == ["Service"]


# -- udev and D-Bus --------------------------------------------------------------------------------

_UDEV_TOKEN = re.compile(r'^\s*([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*$')


def test_udev_rules_are_well_formed_and_cover_the_readers_and_serial_adapters() -> None:
    """Every rule is KEY op "value" tokens; GOTOs land on LABELs; ACR122U, SCL3711 and PN533
    readers get group store-edge; ttyUSB/ttyACM get names under /dev/store-edge/."""
    rules = (SYSTEMD / "60-store-edge.rules").read_text()
    labels, gotos, nfc = set(), set(), set()
    for line in rules.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = dict[str, str]()
        for part in line.split(", "):
            m = _UDEV_TOKEN.match(part)
            assert m is not None, f"malformed udev token {part!r} in {line!r}"
            tokens[m.group(1)] = m.group(3)
            if m.group(1) == "LABEL":
                labels.add(m.group(3))
            if m.group(1) == "GOTO":
                gotos.add(m.group(3))
        if tokens.get("GROUP") == "store-edge":
            assert tokens["MODE"] == "0660"
            nfc.add((tokens["ATTR{idVendor}"], tokens["ATTR{idProduct}"]))
    assert gotos <= labels
    assert {("072f", "2200"), ("04e6", "5591"), ("04cc", "2533")} <= nfc  # ACR122U, SCL3711, PN533
    assert 'SYMLINK+="store-edge/pos-port-$env{ID_PATH_TAG}"' in rules
    assert 'KERNEL!="ttyUSB[0-9]*|ttyACM[0-9]*"' in rules


def test_bluez_policy_is_accepted_by_a_real_dbus_daemon(tmp_path: Path) -> None:
    """A private dbus-daemon whose config includes store-edge-bluez.conf starts and answers."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus)")
    conf = tmp_path / "bus.conf"
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={tmp_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow send_destination="*"/><allow own="*"/></policy>
  <include>{SYSTEMD / "store-edge-bluez.conf"}</include>
</busconfig>
""")
    proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1", "--nopidfile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:"), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    # the fd-limit line depends on the sandbox's rlimits, not on the policy file
    problems = [line for line in err.splitlines() if "fd limit" not in line and ("Failed" in line or "Error" in line)]
    assert not problems, err


# -- logs under journald --------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def _log_to_pty(monkeypatch: pytest.MonkeyPatch, journal: bool) -> str:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w", buffering=1) as tty:
        if journal:
            st = os.fstat(tty.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        configure_logging("info", "auto", tty)
        structlog.get_logger("edge.test").info("hello_journal", n=1)
        tty.flush()
        data = os.read(master, 65536).decode()
    os.close(master)
    return data.strip()


@pytest.mark.usefixtures("restore_logging")
def test_logs_are_json_for_the_journal_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout is a terminal but JOURNAL_STREAM names it: JSON lines (systemd's StandardOutput=tty case)."""
    line = _log_to_pty(monkeypatch, journal=True)
    doc = json.loads(line)
    assert (doc["event"], doc["n"], doc["level"]) == ("hello_journal", 1, "info")


@pytest.mark.usefixtures("restore_logging")
def test_logs_are_for_humans_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal without JOURNAL_STREAM: the console renderer, not JSON."""
    line = _log_to_pty(monkeypatch, journal=False)
    assert "hello_journal" in line
    assert not line.startswith("{")


def test_journal_stream_must_name_the_stream_itself() -> None:
    """A JOURNAL_STREAM inherited from a parent (another file) or garbage does not count."""
    buf = io.StringIO()
    assert not is_journal_stream(buf, {"JOURNAL_STREAM": "1:2"})
    with Path(os.devnull).open("w") as null:  # a real file descriptor is the point
        st = os.fstat(null.fileno())
        assert is_journal_stream(null, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not is_journal_stream(null, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not is_journal_stream(null, {"JOURNAL_STREAM": "nonsense"})

