"""`edge-cloud`: keys create/show, subcommand registration, `edge receive` as an alias."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.cli import build_parser, main
from edge.cli import build_parser as edge_parser


def test_keys_create_writes_a_0600_key_and_prints_its_public_half(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "cloud.key"
    assert main(["keys", "create", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(out.read_text().strip()))
    assert doc["public_key"] == key.public_key().public_bytes_raw().hex()
    assert len(doc["public_key"]) == 64
    assert doc["kid"] == hashlib.sha256(bytes.fromhex(doc["public_key"])).digest()[:8].hex()
    assert main(["keys", "show", "--key", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc


def test_keys_create_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cloud.key"
    assert main(["keys", "create", "--out", str(out)]) == 0
    first = out.read_text()
    capsys.readouterr()
    assert main(["keys", "create", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == first
    assert main(["keys", "create", "--out", str(out), "--force"]) == 0
    assert out.read_text() != first


def test_subcommands_register_from_their_own_modules_and_edge_receive_is_an_alias() -> None:
    """Each group registers through register(subparsers); the receiver's help describes the
    receiver's config, in both commands."""
    ap = build_parser(["cloud.commands.keys"])
    assert ap.parse_args(["keys", "show", "--key", "k"]).keys_cmd == "show"
    for parser, argv in ((build_parser(), ["receive", "--help"]), (edge_parser(), ["receive", "--help"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    full = build_parser().format_help()
    assert "receive" in full
    assert "keys" in full


def test_receive_help_names_the_receivers_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        edge_parser().parse_args(["receive", "--help"])
    text = capsys.readouterr().out
    assert "the receiver's YAML config" in text
    assert "device's" not in text


def test_flat_device_keys_refuse_the_receiver_and_keys_migrate_moves_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only old-layout keys (keys_dir/<device>.pub): `edge-cloud receive` exits 2 before touching the
    broker, saying how to move them; `edge-cloud keys migrate` moves each to <tenant>/<store>/,
    leaves a name that is not an id in place (exit 1), and the receiver's keys then load."""
    from cloud.identity import load_keys_dir

    keys = tmp_path / "keys"
    keys.mkdir()
    pub = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    (keys / "edge-01.pub").write_text(pub + "\n")
    (keys / "edge-02.pub").write_text(pub + "\n")
    cloud_key = tmp_path / "cloud.key"
    assert main(["keys", "create", "--out", str(cloud_key)]) == 0
    conf = tmp_path / "receiver.yaml"
    conf.write_text(f"broker: mqtt://127.0.0.1:1\nkeys_dir: keys\ncloud_key: {cloud_key}\n")
    capsys.readouterr()
    assert main(["receive", "--config", str(conf)]) == 2
    out = capsys.readouterr().out
    assert "old flat layout" in out
    assert f"edge-cloud keys migrate --keys-dir {keys} --tenant TENANT --store STORE" in out

    (keys / "Bad Name.pub").write_text(pub + "\n")
    assert main(["keys", "migrate", "--keys-dir", str(keys), "--tenant", "acme", "--store", "s001"]) == 1
    cap = capsys.readouterr()
    assert "2 key(s) moved, 1 left in place" in cap.out
    assert "Bad Name.pub" in cap.err
    assert (keys / "acme" / "s001" / "edge-01.pub").read_text() == pub + "\n"
    assert not (keys / "edge-01.pub").exists()
    loaded, problems = load_keys_dir(keys)
    assert sorted(loaded) == [("acme", "s001", "edge-01"), ("acme", "s001", "edge-02")]
    assert len(problems) == 1  # the flat file left in place, reported, no longer fatal
    assert main(["keys", "migrate", "--keys-dir", str(keys), "--tenant", "Acme!", "--store", "s001"]) == 2
