"""Command-line messages: every option says what it does; packaging metadata builds without warnings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _help(*cmd: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*cmd, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(("cmd", "option", "words"), [
    (("export",), "--out", "the file to write"),
    (("status",), "--json", "JSON document"),
    (("keys", "show"), "--json", "JSON object"),
    (("demo",), "--duration", "how long the simulated store produces readings"),
    (("check-config",), "--config", "the device's YAML config"),
    (("install",), "--keep-config", "identity differs"),
    (("receive",), "--config", "the receiver's YAML config"),
])
def test_options_have_help(cmd: tuple[str, ...], option: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--out, --json, --duration (and the new --config / --keep-config) explain themselves in --help."""
    text = " ".join(_help(*cmd, capsys=capsys).split())
    assert option in text
    assert words in text


def test_receive_help_names_the_receivers_config(capsys: pytest.CaptureFixture[str]) -> None:
    """`edge receive --config` is the receiver's file (config/receiver.yaml), never the device's."""
    text = " ".join(_help("receive", capsys=capsys).split())
    assert "the receiver's YAML config" in text
    assert "config/receiver.yaml" in text
    assert "the device's YAML config" not in text


def test_license_is_an_spdx_string_and_the_build_backend_supports_it() -> None:
    """project.license as a TOML table is deprecated (setuptools warns on every install): an SPDX
    string, with a setuptools that reads it (>= 77)."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in doc["build-system"]["requires"]
