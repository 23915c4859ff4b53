"""The desired-state rules without a broker (edge/downlink/desired.py, desiredfile.py): what a
change touched, which changes apply live, problems as key paths, and what `edge run` starts with
from the persisted documents: the same layers offline, a trial the last daemon never decided
rolled back, a document whose key is no longer trusted set aside, a malformed file ignored."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.cloudkey import CLOUD_KEY, signed_uplink

from edge.clock import SystemClock
from edge.configload import load_config
from edge.downlink.desired import boot_config, build_effective, key_paths, live_change, touched
from edge.downlink.desiredfile import STATE_FILE, DesiredFile, read_state, write_state
from edge.privacy.keys import KeyStore
from edge.wire.downlink import document, sign_document, verify_document
from edge.wire.uplink import kid_of, public_raw

IDS = ("acme", "s001", "edge-dd")


def _config(tmp_path: Path) -> str:
    state = tmp_path / "state"
    doc = {
        "identity": dict(zip(("tenant", "store", "device"), IDS, strict=True)),
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "uplink": signed_uplink(broker="mqtt://127.0.0.1:1"),
        "drivers": {"ble": {"backend": "sim"}, "nfc": {"enabled": False},
                    "pos": [{"name": "till-1", "backend": "sim", "framing": "lines"}]},
        "health": {"enabled": False, "advertise": False},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(doc))
    KeyStore(state / "keys", SystemClock()).init(force=True)
    return str(path)


def _raw(ver: int, config: dict[str, Any], key: Ed25519PrivateKey = CLOUD_KEY) -> bytes:
    doc = document("desired", *IDS, kid_of(public_raw(key.public_key())), int(time.time() * 1000),
                   layer="device", ver=ver, config=config)
    return sign_document(doc, key)


def test_touched_names_sections_and_drivers_and_only_driver_changes_are_live() -> None:
    ble = {"sim": {"rate": 1}}
    old: dict[str, Any] = {"drivers": {"ble": ble, "pos": [{"name": "a", "baudrate": 9600}, {"name": "b"}]},
                           "buffer": {"max_events": 10}}
    new: dict[str, Any] = {"drivers": {"ble": ble, "pos": [{"name": "a", "baudrate": 19200}, {"name": "c"}]},
                           "buffer": {"max_events": 10}}
    what = touched(old, new)
    assert what == {"sections": ["drivers"], "drivers": ["pos:a", "pos:b", "pos:c"]}
    assert live_change(old, new, what)
    presence = {**new, "drivers": {**new["drivers"], "ble": {"presence": {"zones": []}}}}
    assert not live_change(old, presence, touched(old, presence))  # analytics is built from it at start
    other = {**new, "buffer": {"max_events": 11}}
    assert touched(old, other)["sections"] == ["buffer", "drivers"]
    assert not live_change(old, other, touched(old, other))


def test_problems_become_key_paths_without_file_or_line() -> None:
    assert key_paths(["effective:12: buffer.max_events: 0 is not valid: expected at least 1",
                      "effective: drivers.pos[0].port: serial port /dev/x does not exist"]) == [
        "buffer.max_events: 0 is not valid: expected at least 1",
        "drivers.pos[0].port: serial port /dev/x does not exist"]


def test_a_reboot_offline_runs_the_persisted_layers_with_the_same_hash(tmp_path: Path) -> None:
    path = _config(tmp_path)
    local = load_config(path)
    state = local.paths.state_dir
    layer = _raw(4, {"drivers": {"ble": {"sim": {"rate": 3}}}})
    doc = verify_document(layer, topic=f"edge/v1/{'/'.join(IDS)}/desired", prefix="edge/v1",
                          trusted={kid_of(public_raw(CLOUD_KEY.public_key())): CLOUD_KEY.public_key()})
    eff = build_effective(path, {"device": doc})
    write_state(state, DesiredFile(current={"device": layer}, attempted={"device": 4}))
    for _ in range(2):  # twice: the same result every boot
        boot = boot_config(path, local)
        assert boot.effective.hash == eff.hash
        assert boot.effective.cfg.drivers.ble.sim.rate == 3
        assert boot.docs["device"].ver == 4
    summary = json.loads((state / STATE_FILE).read_text())
    assert summary["layers"] == {"tenant": 0, "store": 0, "device": 4}
    assert summary["effective"] == eff.hash
    assert stat.S_IMODE((state / STATE_FILE).stat().st_mode) == 0o600


def test_a_trial_the_last_daemon_never_decided_is_rolled_back_at_start(tmp_path: Path) -> None:
    path = _config(tmp_path)
    local = load_config(path)
    state = local.paths.state_dir
    good, bad = _raw(1, {"drivers": {"ble": {"sim": {"rate": 3}}}}), _raw(2, {"buffer": {"max_events": 50}})
    # the daemon restarted into the trial (boots 1) and died before it decided
    write_state(state, DesiredFile(current={"device": bad}, previous={"device": good}, attempted={"device": 2},
                                   trial={"layer": "device", "ver": 2, "boots": 1}))
    boot = boot_config(path, local)
    assert boot.docs["device"].ver == 1
    assert boot.effective.cfg.buffer.max_events is None
    st = read_state(state)
    assert st.trial is None
    assert st.apply is not None
    assert (st.apply["state"], st.apply["ver"]) == ("rolled-back", 2)
    assert st.attempted == {"device": 2}  # its retained copy is not tried again


def test_a_document_of_an_untrusted_key_or_a_malformed_file_is_set_aside(tmp_path: Path) -> None:
    path = _config(tmp_path)
    local = load_config(path)
    state = local.paths.state_dir
    write_state(state, DesiredFile(current={"device": _raw(1, {"buffer": {"max_events": 50}},
                                                           key=Ed25519PrivateKey.generate())}))
    boot = boot_config(path, local)
    assert boot.docs == {}
    assert boot.effective.cfg.buffer.max_events is None
    (state / STATE_FILE).write_text("{not json")
    assert read_state(state) == DesiredFile()
    assert boot_config(path, local).docs == {}
