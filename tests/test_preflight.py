"""Start-up checks without network (edge/preflight.py): what `edge check-config` passes, `edge run`
does not refuse at start-up, because both run the same checks. Each problem is one line naming
the config key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cloudkey import CLOUD_PUBLIC_HEX

from edge.clock import SystemClock
from edge.configload import load_config
from edge.preflight import startup_problems
from edge.privacy.keys import KeyStore

EDGE = str(Path(sys.executable).parent / "edge")


KEY = {"cloud_public_key": CLOUD_PUBLIC_HEX}  # the uplink is trusted only with a cloud key


def config(tmp_path: Path, *, keys: bool = True, **sections: Any) -> Path:
    """A simulated device config under tmp_path (keys made unless keys=False); `sections` override."""
    state = tmp_path / "state"
    doc: dict[str, Any] = {
        "identity": {"tenant": "acme", "store": "s001", "device": "edge-pf"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": {"enabled": False},
        "drivers": {"ble": {"backend": "sim"}, "nfc": {"backend": "sim"}},
        "health": {"enabled": False, "advertise": False},
        **sections,
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))
    if keys:
        KeyStore(Path(doc["paths"]["keys_dir"]), SystemClock()).init()
    return path


def problems(path: Path) -> list[str]:
    return startup_problems(load_config(path), str(path))


def test_a_ready_device_has_no_problems(tmp_path: Path) -> None:
    """Keys made, state folder writable, sim drivers: nothing to report."""
    assert problems(config(tmp_path)) == []


def test_missing_keys_name_paths_keys_dir_and_the_command(tmp_path: Path) -> None:
    """No signing key: one line naming paths.keys_dir and how to create the keys."""
    path = config(tmp_path, keys=False)
    (line,) = problems(path)
    assert line.startswith(f"{path}: paths.keys_dir: no device keys in ")
    assert f"edge keys init --config {path}" in line


def test_a_key_readable_by_others_is_a_problem(tmp_path: Path) -> None:
    """A signing key with mode 0644 would stop the daemon: check-config says so first."""
    path = config(tmp_path)
    (tmp_path / "state" / "keys" / "signing.key").chmod(0o644)
    (line,) = problems(path)
    assert line.startswith(f"{path}: paths.keys_dir: ")
    assert "accessible by group or others" in line


def test_stable_without_a_tenant_key_names_the_class(tmp_path: Path) -> None:
    """policy stable needs the tenant key: the problem names privacy.classes.<class>.policy; with
    the key provisioned it is gone."""
    path = config(tmp_path, privacy={"classes": {"loyalty_id": {"policy": "stable"}}})
    (line,) = problems(path)
    assert line.startswith(f"{path}: privacy.classes.loyalty_id.policy: 'stable' needs a tenant key")
    KeyStore(tmp_path / "state" / "keys", SystemClock()).provision_tenant_key(bytes(range(32)))
    assert problems(path) == []


def test_missing_tls_files_are_named_by_key_for_mqtts(tmp_path: Path) -> None:
    """mqtts:// with absent CA, cert and key files: one line each; plain mqtt:// ignores them."""
    tls = {"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "c.pem"),
           "key_file": str(tmp_path / "tls")}
    (tmp_path / "tls").mkdir()
    path = config(tmp_path, uplink={"broker": "mqtts://127.0.0.1:8883", "tls": tls, **KEY})
    got = problems(path)
    assert [ln.split(": ")[1] for ln in got] == ["uplink.tls.ca_file", "uplink.tls.cert_file", "uplink.tls.key_file"]
    assert got[0].endswith("ca.pem does not exist")
    assert got[2].endswith("is a folder, expected a file")
    path = config(tmp_path, keys=False, uplink={"broker": "mqtt://127.0.0.1:1883", "tls": tls, **KEY})
    assert problems(path) == []


def test_a_serial_port_that_does_not_exist_is_named(tmp_path: Path) -> None:
    """backend serial: the port must exist (a pty does); sim links are not checked."""
    master, slave = os.openpty()
    try:
        pos = [{"name": "till-1", "backend": "serial", "port": str(tmp_path / "ttyUSB9")},
               {"name": "till-2", "backend": "serial", "port": os.ttyname(slave)},
               {"name": "till-3", "backend": "sim", "port": "/dev/nothing"}]
        path = config(tmp_path, drivers={"pos": pos})
        (line,) = problems(path)
        assert line.startswith(f"{path}: drivers.pos[0].port: serial port {tmp_path / 'ttyUSB9'} of pos link "
                               "'till-1' does not exist")
    finally:
        os.close(master)
        os.close(slave)


def test_a_state_folder_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    """state_dir under a regular file cannot be created; a file as state_dir is not a folder."""
    (tmp_path / "afile").write_text("x")
    path = config(tmp_path, paths={"state_dir": str(tmp_path / "afile" / "state"),
                                   "keys_dir": str(tmp_path / "keys")})
    (line,) = problems(path)
    assert line.startswith(f"{path}: paths.state_dir: {tmp_path / 'afile' / 'state'} does not exist and cannot "
                           "be created")
    path = config(tmp_path, keys=False, paths={"state_dir": str(tmp_path / "afile"),
                                               "keys_dir": str(tmp_path / "keys")})
    assert problems(path) == [f"{path}: paths.state_dir: {tmp_path / 'afile'} is not a folder"]


def test_a_missing_state_folder_that_can_be_created_is_fine(tmp_path: Path) -> None:
    """The daemon creates state_dir; check-config only checks that it could, and creates nothing."""
    path = config(tmp_path, paths={"state_dir": str(tmp_path / "new" / "state"), "keys_dir": str(tmp_path / "k")})
    assert problems(path) == []
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("form", [["PATH"], ["--config", "PATH"]], ids=["positional", "--config"])
def test_check_config_and_run_refuse_the_same_problems_with_exit_2(tmp_path: Path, form: list[str]) -> None:
    """Both commands print the same lines (one per problem) and exit 2; check-config takes the
    path positionally or as --config."""
    tls = {"ca_file": str(tmp_path / "ca.pem")}
    path = config(tmp_path, keys=False, uplink={"broker": "mqtts://127.0.0.1:8883", "tls": tls, **KEY},
                  privacy={"classes": {"loyalty_id": {"policy": "stable"}}})
    args = [str(path) if a == "PATH" else a for a in form]
    check = subprocess.run([EDGE, "check-config", *args], capture_output=True, text=True, timeout=60, check=False)
    run = subprocess.run([EDGE, "run", "--config", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert (check.returncode, run.returncode) == (2, 2), check.stderr + run.stderr
    lines = check.stderr.splitlines()
    assert [ln.split(": ")[1] for ln in lines[:-1]] == [
        "paths.keys_dir", "privacy.classes.loyalty_id.policy", "uplink.tls.ca_file"]
    assert lines[-1] == f"3 problem(s) in {path}"
    assert run.stderr.splitlines() == lines
    assert "Traceback" not in check.stderr + run.stderr


def test_check_config_wants_the_path_once(tmp_path: Path) -> None:
    """Neither or both of PATH and --config: a usage message and exit 2."""
    path = config(tmp_path)
    for args in ([], [str(path), "--config", str(path)]):
        res = subprocess.run([EDGE, "check-config", *args], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2
        assert "as PATH or --config PATH" in res.stderr
