"""What the device trusts is decided by its config, and a config that trusts too much is refused.

- With the uplink enabled and no `uplink.cloud_public_key`, `edge check-config` and `edge run` exit 2
  naming `uplink.cloud_public_key`, unless `uplink.insecure_unsigned_acks: true` (lab only; then
  warned at every start and shown in `edge status`).
- `uplink.broker: auto` needs `uplink.tls.ca_file` (never the system CA store).
- The consent file must be a regular file its group and others cannot write; check-config names
  `privacy.consent_file` otherwise, and the daemon fails closed (nobody consented).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs
from support.cloudkey import CLOUD_PUBLIC_HEX

from edge.clock import FakeClock, SystemClock
from edge.privacy.consent import ConsentList, consent_file_problem
from edge.privacy.keys import KeyStore

EDGE = str(Path(sys.executable).parent / "edge")
IDENTITY = {"tenant": "acme", "store": "s001", "device": "edge-01"}


def write(tmp_path: Path, *, keys: bool = True, **sections: object) -> Path:
    doc = {"identity": IDENTITY, "paths": {"state_dir": str(tmp_path / "state"),
                                           "keys_dir": str(tmp_path / "state" / "keys")}, **sections}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))
    keys_dir = tmp_path / "state" / "keys"
    if keys and not keys_dir.exists():  # check-config also runs run's start-up checks: device keys exist
        KeyStore(keys_dir, SystemClock()).init()
    return path


def edge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("command", [["check-config"], ["run", "--config"]], ids=["check-config", "run"])
def test_no_cloud_key_with_the_uplink_enabled_exits_2_naming_the_key(tmp_path: Path, command: list[str]) -> None:
    """The default uplink (enabled) without cloud_public_key: exit 2, the message names
    uplink.cloud_public_key, the command that makes a key pair, and the lab escape hatch."""
    path = write(tmp_path, keys=False)
    res = edge(*command, str(path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"{path}:")
    assert "uplink.cloud_public_key: is required while the uplink is enabled" in first
    assert "edge-cloud keys create --out FILE" in first
    assert "uplink.insecure_unsigned_acks: true" in first
    assert not (tmp_path / "state").exists()  # refused before anything was opened


def test_a_cloud_key_or_the_explicit_lab_flag_or_no_uplink_passes(tmp_path: Path) -> None:
    """check-config exits 0 with a cloud key (summary: signed), with insecure_unsigned_acks (summary
    says UNSIGNED), and with the uplink disabled."""
    res = edge("check-config", str(write(tmp_path, uplink={"cloud_public_key": CLOUD_PUBLIC_HEX})), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "acks signed by the cloud key" in res.stdout
    res = edge("check-config", str(write(tmp_path, uplink={"insecure_unsigned_acks": True})), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "UNSIGNED" in res.stdout
    res = edge("check-config", str(write(tmp_path, uplink={"enabled": False})), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_a_malformed_cloud_key_says_how_to_make_one(tmp_path: Path) -> None:
    """A placeholder or a truncated key: exit 2 at uplink.cloud_public_key, with the command."""
    res = edge("check-config", str(write(tmp_path, uplink={"cloud_public_key": "SET-ME"})), cwd=tmp_path)
    assert res.returncode == 2
    assert "uplink.cloud_public_key: 'SET-ME' is not valid: expected 64 hex characters" in res.stderr
    assert "edge-cloud keys create --out FILE" in res.stderr


def test_broker_auto_requires_the_stores_own_ca(tmp_path: Path) -> None:
    """broker: auto without tls.ca_file: exit 2 naming uplink.tls.ca_file; with it: 0."""
    up = {"broker": "auto", "cloud_public_key": CLOUD_PUBLIC_HEX}
    res = edge("check-config", str(write(tmp_path, uplink=up)), cwd=tmp_path)
    assert res.returncode == 2
    assert "uplink.tls.ca_file: is required with broker: auto" in res.stderr
    assert "never the system CA store" in res.stderr
    (tmp_path / "ca.pem").write_text("the store's CA (check-config only checks it is readable)\n")
    res = edge("check-config", str(write(tmp_path, uplink={**up, "tls": {"ca_file": "ca.pem"}})), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_connect_params_refuse_a_discovered_broker_without_ca_file() -> None:
    """Defence in depth for configs built in code: the uplink never builds a TLS context from the
    system store for a discovered broker."""
    from edge.config import Uplink
    from edge.errors import KeyError_
    from edge.uplink.connect import connect_params

    with pytest.raises(KeyError_, match=r"uplink\.tls\.ca_file"):
        connect_params(Uplink(broker="auto"), url="mqtts://broker.local:8883")


# -- the consent file -------------------------------------------------------------------------------


def _consent(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "consent.txt"
    path.write_text("loy:s1:abc\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602], ids=["world", "group", "others"])
def test_a_consent_file_others_may_write_is_refused_and_nobody_consents(tmp_path: Path, mode: int) -> None:
    """Writable by group or others: a logged error (consent_file_unsafe) and an empty list."""
    path = _consent(tmp_path, mode)
    with capture_logs() as logs:
        consent = ConsentList(path, FakeClock())
        assert "loy:s1:abc" not in consent
    assert [e for e in logs if e["event"] == "consent_file_unsafe"], logs
    assert "chmod go-w" in str(consent_file_problem(path))


def test_a_fifo_as_consent_file_never_blocks_and_counts_as_nobody(tmp_path: Path) -> None:
    """A FIFO (no writer): the lookup returns at once, empty, with consent_file_unsafe logged."""
    fifo = tmp_path / "consent.txt"
    os.mkfifo(fifo, 0o600)
    result: list[bool] = []
    with capture_logs() as logs:
        t = threading.Thread(target=lambda: result.append("x" in ConsentList(fifo, FakeClock())))
        t.start()
        t.join(2.0)
    assert not t.is_alive(), "opening the FIFO blocked"
    assert result == [False]
    assert [e for e in logs if e["event"] == "consent_file_unsafe"]
    assert "not a regular file (a FIFO)" in str(consent_file_problem(fifo))


def test_a_private_consent_file_is_read(tmp_path: Path) -> None:
    """0644 owned by us (only the owner writes): loaded as before."""
    path = _consent(tmp_path, 0o644)
    assert "loy:s1:abc" in ConsentList(path, FakeClock())
    assert consent_file_problem(path) is None
    assert consent_file_problem(tmp_path / "missing.txt") is None  # missing: nobody consented, not an error


def test_check_config_names_privacy_consent_file_when_it_is_unsafe(tmp_path: Path) -> None:
    """check-config exits 2 with a line naming privacy.consent_file and the reason."""
    path = _consent(tmp_path, 0o666)
    cfg = write(tmp_path, uplink={"enabled": False}, privacy={"consent_file": str(path)})
    res = edge("check-config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    assert f"privacy.consent_file: {path} is writable by its group and others" in res.stderr
    path.chmod(0o600)
    assert edge("check-config", str(cfg), cwd=tmp_path).returncode == 0


def test_keys_status_and_export_work_before_the_cloud_key_is_set(tmp_path: Path) -> None:
    """Only `run` and `check-config` enforce the trust rules: with the placeholder key (a fresh
    store.yaml) `edge keys init` and `edge status` still work, so keys can be made and a box
    rescued before the cloud key is known."""
    path = write(tmp_path, uplink={"cloud_public_key": "SET-ME-run-edge-cloud-keys-create"})
    assert edge("keys", "init", "--config", str(path), "--force", cwd=tmp_path).returncode == 0
    res = edge("status", "--config", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert edge("run", "--config", str(path), cwd=tmp_path).returncode == 2


def test_protocol_accepts_an_unquoted_5() -> None:
    """`uplink.protocol: 5` (YAML reads a number) means MQTT 5; unknown versions are refused."""
    from pydantic import ValidationError

    from edge.config import Uplink

    assert Uplink.model_validate({"protocol": 5}).protocol == "5"
    assert Uplink.model_validate({"protocol": "3.1.1"}).protocol == "3.1.1"
    with pytest.raises(ValidationError):
        Uplink.model_validate({"protocol": 4})
