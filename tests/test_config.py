"""Config loading: shipped files validate, and every malformed file gets an operator-grade message.

A problem message names the file, the 1-based line, the dotted key path, the bad value and
what is expected: `cfg.yaml:5: buffer.max_bytes: '12xb' is not valid: expected a size ...`.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from support.cloudkey import CLOUD_PUBLIC_HEX

from edge.config import Config
from edge.configload import check_config_main, load_config, summarize
from edge.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# config/ also holds files of other programs; everything else there is a device config
# `edge receive`'s and `edge-cloud ingest`'s configs, validated by their own tests
NOT_DEVICE_CONFIGS = {"receiver.yaml", "cloud.yaml"}
SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name not in NOT_DEVICE_CONFIGS)
IDENTITY = "identity:\n  tenant: demo\n  store: store-001\n  device: edge-1\n"  # lines 1-4
PLACEHOLDER = "cloud_public_key: SET-ME-run-edge-cloud-keys-create"  # what config/store.yaml ships
FUZZ = settings(derandomize=True, max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(tmp_path: Path, text: str, name: str = "cfg.yaml", *, trusted: bool = True) -> str:
    """The config `text`; `trusted` gives a device config without an uplink section of its own
    the test cloud key, as a last line (so the line numbers the tests check stay put)."""
    text = textwrap.dedent(text)
    if trusted and re.search(r"^identity:", text, re.M) and not re.search(r"^uplink:", text, re.M):
        text += f"uplink: {{cloud_public_key: {CLOUD_PUBLIC_HEX}}}\n"
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def store_yaml_with_a_cloud_key() -> str:
    """config/store.yaml as an operator has it once the cloud key is set."""
    text = (CONFIG_DIR / "store.yaml").read_text()
    assert PLACEHOLDER in text
    return text.replace(PLACEHOLDER, f"cloud_public_key: {CLOUD_PUBLIC_HEX}")


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    return info.value.problems


def only_problem(tmp_path: Path, text: str) -> tuple[str, str]:
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return path, problems[0]


# --- the shipped files -------------------------------------------------------------------


def test_config_dir_has_the_demo_and_store_files() -> None:
    """The glob below really covers the shipped files (a moved folder must not pass vacuously)."""
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "store.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, tmp_path: Path) -> None:
    """Each config/*.yaml loads (store.yaml once its cloud key is set), and documents how relative
    paths are resolved."""
    if path.name == "store.yaml":
        copy = tmp_path / "store.yaml"
        copy.write_text(store_yaml_with_a_cloud_key())
        path = copy
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    header = path.read_text().split("\n\n", 1)[0]
    assert "resolved relative to the directory of this file" in header.replace("\n# ", " ")


def test_store_yaml_ships_a_placeholder_cloud_key_that_check_config_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    """config/store.yaml carries no real-looking key: check-config exits 2 with one problem at the
    key's line naming uplink.cloud_public_key and the command that makes a key pair."""
    path = str(CONFIG_DIR / "store.yaml")
    assert check_config_main(path) == 2
    err = capsys.readouterr().err.splitlines()
    line = next(n for n, ln in enumerate(Path(path).read_text().splitlines(), 1) if PLACEHOLDER in ln)
    assert err[0].startswith(f"{path}:{line}: uplink.cloud_public_key: ")
    assert "edge-cloud keys create --out FILE" in err[0]
    assert err[1:] == [f"1 problem(s) in {path}"]


def test_demo_config_is_simulated_and_rootless() -> None:
    """demo.yaml: all three device kinds simulated, two tills, state in the repo's demo-state/."""
    cfg = load_config(CONFIG_DIR / "demo.yaml")
    ident = cfg.identity
    assert (ident.tenant, ident.store, ident.device) == ("demo", "store-001", "edge-demo")
    assert cfg.drivers.ble.backend == "sim"
    assert cfg.drivers.nfc.backend == "sim"
    assert [(p.name, p.backend) for p in cfg.drivers.pos] == [("till-1", "sim"), ("till-2", "sim")]
    assert cfg.paths.state_dir == CONFIG_DIR.parent / "demo-state"
    assert cfg.paths.keys_dir.is_relative_to(CONFIG_DIR.parent / "demo-state")
    assert cfg.uplink.broker == "mqtt://127.0.0.1:1883"
    assert cfg.health.listen == "127.0.0.1:9108"
    assert cfg.logging.format == "auto"


def test_store_config_uses_real_backends_and_signed_tls_uplink(tmp_path: Path) -> None:
    """store.yaml: bleak, nfcpy, two serial tills by-id, mqtts with client cert, signed acks."""
    cfg = load_config(write(tmp_path, store_yaml_with_a_cloud_key(), "store.yaml"))
    ident = cfg.identity
    assert (ident.tenant, ident.store, ident.device) == ("acme", "berlin-mitte-042", "edge-01")
    assert (cfg.drivers.ble.backend, cfg.drivers.ble.adapter) == ("bleak", "hci0")
    assert (cfg.drivers.nfc.backend, cfg.drivers.nfc.device) == ("nfcpy", "usb")
    assert [(p.backend, p.framing) for p in cfg.drivers.pos] == [("serial", "escpos"), ("serial", "stx_etx")]
    assert all(str(p.port).startswith("/dev/serial/by-id/") for p in cfg.drivers.pos)
    assert cfg.uplink.broker.startswith("mqtts://")
    assert cfg.uplink.tls.ca_file == Path("/etc/store-edge/tls/ca.pem")
    assert cfg.uplink.tls.cert_file is not None
    assert str(cfg.uplink.tls.cert_file).startswith("/etc/store-edge/tls/")
    assert cfg.uplink.cloud_public_key == CLOUD_PUBLIC_HEX
    assert cfg.uplink.insecure_unsigned_acks is False
    assert cfg.uplink.discovery.allow_plain is False
    assert (cfg.privacy.classes["loyalty_id"].policy, cfg.privacy.classes["loyalty_id"].fallback) == (
        "stable", "ephemeral")
    assert cfg.privacy.consent_file is not None


def _missing_options(model: type[BaseModel], raw: Any, prefix: str) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if not isinstance(raw, dict) or name not in raw:
            missing.append(key)
            continue
        sub, ann = raw[name], field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            missing += _missing_options(ann, sub, key + ".")
        elif name == "pos":
            for i, link in enumerate(sub):
                missing += _missing_options(get_args(ann)[0], link, f"{key}[{i}].")  # list[PosLink]
    return missing


def test_store_config_lists_every_schema_option() -> None:
    """store.yaml is the reference: every option of the schema appears in it (with a comment)."""
    raw = yaml.safe_load((CONFIG_DIR / "store.yaml").read_text())
    assert _missing_options(Config, raw, "") == []
    assert set(raw["privacy"]["classes"]) == {
        "ble_address", "nfc_uid", "loyalty_id", "email", "phone", "card_number"}
    assert set(raw["buffer"]["retention"]) == {"ble", "nfc", "pos", "edge"}
    lines = (CONFIG_DIR / "store.yaml").read_text().splitlines()
    bare = [ln for n, ln in enumerate(lines) if re.match(r"^ *(- )?[a-z_]+:", ln)
            and "#" not in ln and not lines[n - 1].lstrip().startswith("#")]
    # repeated or self-explanatory keys may go without a comment of their own
    obvious = {"tenant", "store", "device", "enabled", "name", "port", "baudrate", "backend", "framing",
               "sim", "pos", "nfc", "ble", "edge", "email", "phone", "nfc_uid", "key_file", "max", "initial",
               "privacy", "buffer", "paths", "health", "logging", "batch", "uplink", "drivers"}
    assert [ln for ln in bare if ln.strip().removeprefix("- ").split(":")[0] not in obvious] == []


# --- malformed files: one clear problem each ---------------------------------------------


def test_bad_size_names_file_line_key_value_and_expectation(tmp_path: Path) -> None:
    """A size that does not parse is reported at its own line with the accepted forms."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n  max_bytes: 12xb\n")
    assert msg.startswith(f"{path}:6: buffer.max_bytes: '12xb' is not valid: expected a size such as 512MiB")


def test_size_below_minimum_shows_the_bound_in_bytes_and_units(tmp_path: Path) -> None:
    """ge=1MiB on buffer.max_bytes reads as a size, not a bare number."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n  max_bytes: 1KiB\n")
    assert msg == f"{path}:6: buffer.max_bytes: '1KiB' is not valid: expected at least 1048576 bytes (1.0MiB)"


def test_bad_duration(tmp_path: Path) -> None:
    """A duration with an unknown unit names the accepted units."""
    path, msg = only_problem(tmp_path, IDENTITY + "uplink:\n  ack_timeout: 15 parsecs\n")
    assert msg.startswith(
        f"{path}:6: uplink.ack_timeout: '15 parsecs' is not valid: expected a duration such as")
    assert "250ms" in msg


def test_bad_duration_in_dict_keyed_field(tmp_path: Path) -> None:
    """buffer.retention.<src> errors carry the source name in the key path."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n  retention:\n    pos: 30d\n    ble: forever\n")
    assert msg.startswith(f"{path}:8: buffer.retention.ble: 'forever' is not valid: expected a duration")


def test_bad_enum_lists_allowed_values_and_suggests(tmp_path: Path) -> None:
    """A literal error in a list element names its index and the allowed values."""
    text = IDENTITY + "drivers:\n  pos:\n    - name: till-1\n    - name: till-2\n      framing: escpo\n"
    path, msg = only_problem(tmp_path, text)
    assert msg == (f"{path}:9: drivers.pos[1].framing: 'escpo' is not valid: expected one of 'lines', "
                   "'stx_etx', 'escpos', 'jsonl'; did you mean 'escpos'?")


def test_unknown_dict_key_lists_allowed_keys(tmp_path: Path) -> None:
    """privacy.classes.<typo> is rejected with the known identifier classes and a suggestion."""
    path, msg = only_problem(tmp_path, IDENTITY + "privacy:\n  classes:\n    emial: {policy: drop}\n")
    assert msg.startswith(f"{path}:7: privacy.classes.emial: key 'emial' is not valid: expected one of "
                          "'ble_address', 'nfc_uid', 'loyalty_id', 'email'")
    assert msg.endswith("did you mean 'email'?")


def test_unknown_key_suggests_the_close_field(tmp_path: Path) -> None:
    """A typo never falls back to a default: it is an error with a did-you-mean."""
    path, msg = only_problem(tmp_path, IDENTITY + "uplink:\n  windw: 8\n")
    assert msg == f"{path}:6: uplink.windw: unknown key 'windw'; did you mean 'window'?"


def test_unknown_key_without_close_match_lists_the_keys(tmp_path: Path) -> None:
    """Without a close match the allowed keys of that section are listed."""
    path, msg = only_problem(tmp_path, IDENTITY + "logging:\n  zzz: 1\n")
    assert msg == f"{path}:6: logging.zzz: unknown key 'zzz'; expected one of: level, format"


def test_wrong_id_pattern(tmp_path: Path) -> None:
    """Ids must match the topic rules of uplink-v1."""
    path, msg = only_problem(tmp_path, "identity:\n  tenant: demo\n  store: Berlin Mitte\n  device: edge-1\n")
    assert msg == (f"{path}:3: identity.store: 'Berlin Mitte' is not valid: expected an id: 1-63 characters "
                   "of a-z, 0-9, '_' and '-', starting with a letter or digit")


def test_card_number_policy_other_than_drop_is_rejected_at_its_line(tmp_path: Path) -> None:
    """Card numbers are always dropped; the message points at card_number, not at the whole classes map."""
    text = IDENTITY + "privacy:\n  classes:\n    email: {policy: drop}\n"
    text += "    card_number: {policy: ephemeral}\n"
    path, msg = only_problem(tmp_path, text)
    assert msg.startswith(f"{path}:8: privacy.classes.card_number: {{'policy': 'ephemeral'}} is not valid: ")
    assert "card_number is always dropped" in msg
    assert "policy: drop" in msg


def test_missing_identity(tmp_path: Path) -> None:
    """identity has no default; the message says what to add and where."""
    path, msg = only_problem(tmp_path, "logging:\n  level: info\n")
    assert msg == (f"{path}:1: identity: required key 'identity' is missing from the top level "
                   "(expected a mapping with keys tenant, store, device)")


def test_missing_nested_key_points_at_the_parent_mapping(tmp_path: Path) -> None:
    """A missing key is reported at the line of the mapping it belongs in."""
    path, msg = only_problem(tmp_path, "logging:\n  level: info\nidentity:\n  tenant: demo\n  store: s1\n")
    assert msg == (f"{path}:3: identity.device: required key 'device' is missing from 'identity' "
                   "(expected an id such as 'store-001')")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    """YAML would silently keep the last value; we name both lines."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n  max_bytes: 1GiB\n  when_full: reject_new\n"
                                                  "  max_bytes: 2GiB\n")
    assert msg == (f"{path}:8: buffer.max_bytes: '2GiB' is a duplicate: the key is already set at line 6; "
                   "each key may appear once per mapping")


def test_invalid_yaml_syntax_gives_line_and_column(tmp_path: Path) -> None:
    """A syntax error is one problem with the YAML mark's line and column."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n  max_bytes: [1, 2\n  when_full: x\n")
    assert re.match(rf"^{re.escape(path)}:7:\d+: invalid YAML: ", msg), msg


def test_tab_indentation_is_invalid_yaml(tmp_path: Path) -> None:
    """The classic: a tab where YAML wants spaces."""
    path, msg = only_problem(tmp_path, IDENTITY + "buffer:\n\tmax_bytes: 1GiB\n")
    assert msg.startswith(f"{path}:6:1: invalid YAML: ")
    assert "'\\t'" in msg


def test_impossible_date_is_invalid_yaml_not_a_crash(tmp_path: Path) -> None:
    """PyYAML raises ValueError for 2024-13-45; we report it with its position."""
    path, msg = only_problem(tmp_path, IDENTITY + "note: 2024-13-45\n")
    assert msg == f"{path}:5:7: invalid YAML: cannot read '2024-13-45' as timestamp: month must be in 1..12"


def test_explicit_tag_on_wrong_scalar_is_invalid_yaml(tmp_path: Path) -> None:
    """`!!int abc` makes PyYAML raise ValueError; it becomes a positioned YAML problem."""
    path, msg = only_problem(tmp_path, IDENTITY + "uplink:\n  window: !!int eight\n")
    assert msg.startswith(f"{path}:6:11: invalid YAML: cannot read 'eight' as int: ")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is one problem, no traceback."""
    path = str(tmp_path / "nope.yaml")
    assert problems_of(path) == [f"{path}: cannot read the file: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory is not a config file."""
    assert problems_of(str(tmp_path)) == [f"{tmp_path}: cannot read the file: Is a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_permission_denied(tmp_path: Path) -> None:
    """An unreadable file says so."""
    path = write(tmp_path, IDENTITY)
    Path(path).chmod(0)
    assert problems_of(path) == [f"{path}: cannot read the file: Permission denied"]


def test_not_utf8(tmp_path: Path) -> None:
    """Binary garbage is reported with the line of the first bad byte."""
    path = tmp_path / "cfg.yaml"
    path.write_bytes(IDENTITY.encode() + b"x: \xff\n")
    assert problems_of(str(path)) == [f"{path}:5: not UTF-8 text (byte 0xff)"]


def test_non_mapping_top_level(tmp_path: Path) -> None:
    """A list at the top level is one problem naming what was found."""
    path, msg = only_problem(tmp_path, "- identity\n- buffer\n")
    assert msg.startswith(f"{path}:1: the top level must be a mapping of sections; found a list")


def test_empty_file_says_identity_is_required(tmp_path: Path) -> None:
    """Empty (or comments only) is one problem that names what is required."""
    path, msg = only_problem(tmp_path, "# nothing here yet\n")
    assert msg == (f"{path}:1: the file is empty: expected a mapping with at least "
                   "identity: {tenant, store, device}")


def test_yes_no_hint_for_booleans_where_text_is_expected(tmp_path: Path) -> None:
    """YAML 1.1 reads `on` as true; the message explains it."""
    path, msg = only_problem(tmp_path, IDENTITY + "drivers:\n  ble:\n    backend: on\n")
    assert msg.startswith(f"{path}:7: drivers.ble.backend: true is not valid: expected one of 'sim', 'bleak'")
    assert "put the value in quotes" in msg


def test_empty_section_is_explained(tmp_path: Path) -> None:
    """`health:` with nothing under it is null, not an empty mapping."""
    path, msg = only_problem(tmp_path, IDENTITY + "health:\n")
    assert msg == (f"{path}:5: health: null is not valid: expected a mapping "
                   "(the section is empty: remove it to use the defaults)")


def test_long_values_are_truncated(tmp_path: Path) -> None:
    """A huge bad value does not flood the terminal."""
    _, msg = only_problem(tmp_path, IDENTITY + f"logging:\n  level: {'x' * 500}\n")
    value = msg.split("logging.level: ", 1)[1].split(" is not valid", 1)[0]
    assert value.endswith("...")
    assert len(value) <= 60


def test_several_problems_are_reported_at_once_in_line_order(tmp_path: Path) -> None:
    """One line per problem, sorted by line, so an operator fixes them all in one pass."""
    text = ("identity:\n  tenant: demo\n  store: Store 1\n  device: edge-1\n"  # 3: id pattern
            "buffer:\n  max_bytes: 12xb\n  max_bytes: 1GiB\n"  # 7: duplicate
            "uplink:\n  windw: 8\n  ack_timeout: soon\n"  # 9: unknown key, 10: duration
            "logging:\n  level: verbose\n")  # 12: enum
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert [p.split(":")[1] for p in problems] == ["3", "7", "9", "10", "12"]
    assert [p.split(": ")[1] for p in problems] == [
        "identity.store", "buffer.max_bytes", "uplink.windw", "uplink.ack_timeout", "logging.level"]


# --- paths and immutability --------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """state_dir, keys_dir, consent_file and tls.* follow the file, not the working directory."""
    conf = tmp_path / "etc"
    conf.mkdir()
    write(conf, IDENTITY + textwrap.dedent("""\
        paths:
          state_dir: state
          keys_dir: ../keys
        privacy:
          consent_file: consent.txt
        uplink:
          insecure_unsigned_acks: true
          tls:
            ca_file: tls/ca.pem
            cert_file: /abs/cert.pem
            key_file: tls/key.pem
        """))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("etc/cfg.yaml")
    assert cfg.paths.state_dir == conf / "state"
    assert cfg.paths.keys_dir == tmp_path / "keys"
    assert cfg.privacy.consent_file == conf / "consent.txt"
    assert cfg.uplink.tls.ca_file == conf / "tls" / "ca.pem"
    assert cfg.uplink.tls.cert_file == Path("/abs/cert.pem")
    assert cfg.uplink.tls.key_file == conf / "tls" / "key.pem"
    assert cfg.buffer_path == conf / "state" / "buffer.db"


def test_loaded_config_is_immutable(tmp_path: Path) -> None:
    """The resolved Config (a model_copy) is still frozen at every level."""
    cfg = load_config(write(tmp_path, IDENTITY + "paths:\n  state_dir: state\n"))
    with pytest.raises(ValidationError, match="frozen"):
        cfg.identity = cfg.identity
    with pytest.raises(ValidationError, match="frozen"):
        cfg.paths.state_dir = Path("/tmp/elsewhere")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.uplink.tls.ca_file = None


# --- summary and the check-config command ------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_summary_fits_one_screen(path: Path, tmp_path: Path) -> None:
    """The check-config summary of each shipped file is at most 25 lines and names the essentials."""
    if path.name == "store.yaml":
        path = Path(write(tmp_path, store_yaml_with_a_cloud_key(), "store.yaml"))
    cfg = load_config(path)
    text = summarize(cfg, path)
    assert len(text.splitlines()) <= 25
    for needle in (cfg.identity.tenant, cfg.identity.device, str(cfg.paths.state_dir), cfg.uplink.broker,
                   cfg.health.listen, "card_number drop", cfg.buffer.when_full):
        assert needle in text


def test_summary_of_many_pos_links_still_fits(tmp_path: Path) -> None:
    """A store with 30 tills does not scroll the summary off screen."""
    links = "".join(f"    - name: till-{i}\n" for i in range(30))
    text = summarize(load_config(write(tmp_path, IDENTITY + "drivers:\n  pos:\n" + links)), "cfg.yaml")
    assert len(text.splitlines()) <= 25
    assert "more pos links" in text


def test_check_config_ok_prints_summary_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file whose start-up checks pass (keys made): summary on stdout, nothing on stderr, exit 0."""
    from edge.clock import SystemClock
    from edge.privacy.keys import KeyStore

    text = (CONFIG_DIR / "demo.yaml").read_text().replace("../demo-state", "state")
    path = write(tmp_path, text, "demo.yaml")
    KeyStore(tmp_path / "state" / "keys", SystemClock()).init()
    capsys.readouterr()  # the key store's log line
    assert check_config_main(path) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK\n")
    assert err == ""


def test_check_config_problems_exit_2_one_line_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file: one line per problem plus a count on stderr, exit 2, no traceback."""
    path = write(tmp_path, IDENTITY + "uplink:\n  windw: 8\nlogging:\n  level: verbose\n")
    assert check_config_main(path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:6: uplink.windw: ")
    assert lines[1].startswith(f"{path}:8: logging.level: ")
    assert lines[2] == f"2 problem(s) in {path}"
    assert "Traceback" not in err


@pytest.mark.parametrize("bad", ["missing.yaml", ".", "nul\0byte.yaml"])
def test_check_config_unreadable_exit_2(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Missing file, directory, or a path the OS rejects: a message and exit 2, never a traceback."""
    monkeypatch.chdir(tmp_path)
    assert check_config_main(bad) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith(f"1 problem(s) in {bad}\n")
    assert "Traceback" not in err


def test_check_config_unexpected_error_is_a_message_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Even a bug in the loader ends as one line and exit 2."""
    import edge.configload

    def boom(path: object) -> Config:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(edge.configload, "load_config", boom)
    assert check_config_main("x.yaml") == 2
    _, err = capsys.readouterr()
    assert err == "x.yaml: unexpected error while checking: RuntimeError: kaboom\n1 problem(s) in x.yaml\n"


# --- fuzz: garbage in, ConfigError (with file:line) out ----------------------------------

_TOKENS = ["identity:", "\n", "  ", "tenant: a", "store: b", "device: c", "buffer:", "max_bytes: ", "12xb",
           "- ", "[", "]", "{", "}", ",", ": ", "'", '"', "&a ", "*a", "!!int ", "!!binary ", "<<: ", "? ",
           "2024-13-45", "|", ">", "#", "~", "null", "yes", "\t", "%YAML 1.1", "---", "...", "\\x", "é"]
PROBLEM = re.compile(r"^(?P<file>[^\n]+?)(:\d+(:\d+)?)?: \S")


@FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join) | st.binary(max_size=200).map(
    lambda b: b.decode("latin-1")))
def test_garbage_yields_config_error_only(tmp_path: Path, text: str) -> None:
    """Any bytes: either a Config or ConfigError whose problems start with the file name."""
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        load_config(path)
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    for p in problems:
        assert p.startswith(f"{path}"), p
        assert PROBLEM.match(p), p


_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


_STORE = yaml.safe_load(store_yaml_with_a_cloud_key())
_STORE_PATHS = _paths(_STORE)


@FUZZ
@given(st.sampled_from(_STORE_PATHS), _VALUE)
def test_every_validation_problem_has_a_line_and_key_path(tmp_path: Path, where: tuple[Any, ...],
                                                          value: Any) -> None:
    """Replacing any value of store.yaml by junk gives file:line: key.path: problems, in its section,
    each line pointing at the key it names."""
    data = yaml.safe_load(yaml.safe_dump(_STORE))
    node = data
    for seg in where[:-1]:
        node = node[seg]
    node[where[-1]] = value
    path = tmp_path / "mut.yaml"
    text = yaml.safe_dump(data)
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    for p in problems:
        assert re.match(rf"^{re.escape(str(path))}:\d+: \S.*: \S", p), p
        plain = re.match(rf"^{re.escape(str(path))}:(\d+): ([a-zA-Z0-9_.\[\]-]+): ", p)
        if plain and "missing" not in p:
            line, keypath = int(plain[1]), plain[2]
            assert keypath.split(".")[0].split("[")[0] == where[0], p
            last = keypath.rsplit(".", 1)[-1]
            if not last.endswith("]"):
                assert last in text.splitlines()[line - 1], (p, text.splitlines()[line - 1])


# --- unambiguous units, a duplicate pos name ------------------------------------------------


@pytest.mark.parametrize(("key", "value", "hint"), [
    ("max_bytes", "512M", "512M is ambiguous: write 512MiB (powers of 1024) or 512MB (powers of 1000)"),
    ("max_bytes", "64k", "64k is ambiguous: write 64KiB (powers of 1024) or 64KB (powers of 1000)"),
    ("max_bytes", "2G", "2G is ambiguous: write 2GiB (powers of 1024) or 2GB (powers of 1000)"),
])
def test_a_bare_size_prefix_is_refused_with_both_spellings(tmp_path: Path, key: str, value: str, hint: str) -> None:
    """`512M` could be MiB or MB (and `5M` looks like minutes): refused, naming what to write."""
    path, msg = only_problem(tmp_path, IDENTITY + f"buffer:\n  {key}: {value}\n")
    assert msg == f"{path}:6: buffer.{key}: {value!r} is not valid: {hint}"


def test_sizes_with_a_byte_unit_still_read_as_before(tmp_path: Path) -> None:
    """MiB is 1024², MB is 1000², plain numbers are bytes."""
    for text, n in (("512MiB", 512 * 1024**2), ("512MB", 512 * 1000**2), ("2000000", 2_000_000)):
        assert load_config(write(tmp_path, IDENTITY + f"buffer:\n  max_bytes: {text}\n")).buffer.max_bytes == n


def test_a_capital_m_duration_is_refused_and_a_small_m_is_minutes(tmp_path: Path) -> None:
    """`5M` is refused (write 5m or 5min); `5m` and `5min` are 300 s."""
    path, msg = only_problem(tmp_path, IDENTITY + "uplink:\n  ack_timeout: 5M\n")
    assert msg == (f"{path}:6: uplink.ack_timeout: '5M' is not valid: 5M is ambiguous: write 5m or 5min for "
                   "minutes (sizes are written 512MiB or 512MB)")
    for text in ("5m", "5min"):
        cfg = load_config(write(tmp_path, IDENTITY + f"uplink:\n  ack_timeout: {text}\n"), trust=False)
        assert cfg.uplink.ack_timeout == 300


def test_a_duplicate_pos_name_names_only_the_duplicate(tmp_path: Path) -> None:
    """The third link repeats the first's name: the problem is at its line, names both indexes and
    does not dump the whole list."""
    links = "    - name: till-1\n    - name: till-2\n    - name: till-1\n"  # lines 7-9
    path, msg = only_problem(tmp_path, IDENTITY + "drivers:\n  pos:\n" + links)
    assert msg == (f"{path}:9: drivers.pos[2].name: 'till-1' is not valid: the name is already used by "
                   "drivers.pos[0]; each pos link needs its own name")


def test_health_listen_takes_a_bare_port(tmp_path: Path) -> None:
    """`listen: 9108` (a YAML number) and `listen: "9108"` mean 127.0.0.1:9108."""
    for text in ("9108", '"9108"'):
        cfg = load_config(write(tmp_path, IDENTITY + f"health:\n  listen: {text}\n"))
        assert cfg.health.address() == ("127.0.0.1", 9108)
