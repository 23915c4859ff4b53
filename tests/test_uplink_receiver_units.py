"""Receiver pieces without a broker: config paths, and the JSON-lines encoder.

Paths: relative ones resolve against the YAML file's folder, absolute ones stay. Regression:
absolute `cloud_key` and `tls.*` paths used to be dropped (became null), so a receiver configured
with an absolute cloud key path sent unsigned acks, which a device with a cloud public key rejects
as forged: nothing was ever deleted on the device.

Encoder: the receiver's fast encoder gives exactly what `json.JSONEncoder` with the same settings
gives, for anything a MessagePack body can decode to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.config import load_receiver_config
from cloud.jsonlines import json_line_encoder


def test_absolute_paths_are_kept_and_relative_ones_resolved(tmp_path: Path) -> None:
    """Absolute cloud_key, TLS files, keys_dir, db and out are used as written; relative ones
    are taken relative to the folder holding the YAML file."""
    elsewhere = tmp_path / "elsewhere"
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    conf = conf_dir / "receiver.yaml"
    conf.write_text(
        "broker: mqtts://127.0.0.1:8883\n"
        f"cloud_key: {elsewhere / 'cloud.key'}\n"
        f"keys_dir: {elsewhere / 'keys'}\n"
        f"db: {elsewhere / 'r.db'}\n"
        "out: out/events.jsonl\n"
        f"tls: {{ca_file: {elsewhere / 'ca.pem'}, cert_file: client.pem, key_file: {elsewhere / 'client.key'}}}\n"
    )
    cfg = load_receiver_config(conf)
    assert cfg.cloud_key == elsewhere / "cloud.key"
    assert cfg.keys_dir == elsewhere / "keys"
    assert cfg.db == elsewhere / "r.db"
    assert cfg.out == conf_dir / "out" / "events.jsonl"
    assert cfg.tls.ca_file == elsewhere / "ca.pem"
    assert cfg.tls.cert_file == conf_dir / "client.pem"
    assert cfg.tls.key_file == elsewhere / "client.key"


def test_unset_optional_paths_stay_unset(tmp_path: Path) -> None:
    """No TLS files configured: they stay None (no client cert)."""
    conf = tmp_path / "receiver.yaml"
    conf.write_text("broker: mqtt://127.0.0.1:1883\ncloud_key: cloud.key\n")
    cfg = load_receiver_config(conf)
    assert (cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file) == (None, None, None)
    assert cfg.db == tmp_path / "receiver.db"


_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary()
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _reference(o: Any) -> str:
    def default(v: object) -> object:
        return v.hex() if isinstance(v, bytes) else str(v)

    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=default).encode(o)


@settings(derandomize=True, max_examples=120, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _VALUES, max_size=5))
def test_json_line_encoder_matches_the_stdlib_encoder(event: dict[str, Any]) -> None:
    """Same text as JSONEncoder(separators=(",", ":"), ensure_ascii=False, bytes as hex), and never a
    raw newline (one event per line)."""
    line = json_line_encoder()(event)
    assert line == _reference(event)
    assert "\n" not in line
