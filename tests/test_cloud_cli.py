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
