"""`drivers.ble` configuration: defaults, normalization of beacon identifiers, and the
mistakes an operator can make being rejected at load time (not at the first advertisement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from drivers.ble.config import Ble

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def ble(**kw: Any) -> Ble:
    return Ble.model_validate(kw)


def test_defaults_are_valid_and_conservative() -> None:
    cfg = ble()
    assert (cfg.backend, cfg.adapter, cfg.scan_mode, cfg.power_on) == ("sim", "hci0", "auto", True)
    assert (cfg.presence.enter_rssi, cfg.presence.exit_after, cfg.presence.zones) == (-80, 60.0, [])
    assert (cfg.watchdog.quiet, cfg.watchdog.restarts, cfg.watchdog.power_cycles) == (60.0, 2, 1)
    assert cfg.beacons.known == []


def test_beacon_identifiers_are_normalized() -> None:
    cfg = ble(beacons={"known": [
        {"name": "door", "ibeacon": {"uuid": "e2c56db5-dffb-48d2-b060-d0f5a71096e0", "major": 1, "minor": 2}},
        {"name": "shelf", "eddystone": {"namespace": "0xEDD1EBEAC04E5DEFA017", "instance": "00000000000A"}},
    ], "missing_after": "10m"})
    door, shelf = cfg.beacons.known
    assert door.ibeacon is not None
    assert door.ibeacon.uuid == "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0"
    assert shelf.eddystone is not None
    assert (shelf.eddystone.namespace, shelf.eddystone.instance) == ("edd1ebeac04e5defa017", "00000000000a")
    assert cfg.beacons.missing_after == 600.0


@pytest.mark.parametrize(("section", "message"), [
    ({"adapter": "bluetooth0"}, "String should match pattern"),
    ({"scan_mode": "aggressive"}, "Input should be 'auto', 'passive' or 'active'"),
    ({"beacons": {"known": [{"name": "x", "ibeacon": {"uuid": "nope", "major": 1, "minor": 2}}]}},
     "uuid must look like"),
    ({"beacons": {"known": [{"name": "x", "ibeacon": {"uuid": "E2C56DB5-DFFB-48D2-B060-D0F5A71096E0",
                                                      "major": 70000, "minor": 2}}]}}, "less than or equal to 65535"),
    ({"beacons": {"known": [{"name": "x", "eddystone": {"namespace": "abc", "instance": "000000000001"}}]}},
     "namespace must be 20 hex digits"),
    ({"beacons": {"known": [{"name": "x"}]}}, "exactly one of ibeacon"),
    ({"beacons": {"known": [
        {"name": "x", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000001"}},
        {"name": "x", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000002"}}]}},
     "beacon names must be unique"),
    ({"beacons": {"known": [
        {"name": "a", "eddystone": {"namespace": "edd1ebeac04e5defa017", "instance": "000000000001"}},
        {"name": "b", "eddystone": {"namespace": "EDD1EBEAC04E5DEFA017", "instance": "000000000001"}}]}},
     "same identifier"),
    ({"presence": {"zones": [{"name": "a", "min_rssi": -60}, {"name": "a", "min_rssi": -70}]}}, "unique"),
    ({"presence": {"smoothing": 0}}, "greater than 0"),
    ({"presence": {"exit_after": "forever"}}, "expected a duration"),
    ({"watchdog": {"power_cycles": 9}}, "less than or equal to 5"),
    ({"queue_max": 10}, "greater than or equal to 100"),
])
def test_operator_mistakes_are_config_errors(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ble(**section)
    assert message in str(err.value)


def test_zones_are_sorted_strongest_first() -> None:
    cfg = ble(presence={"zones": [{"name": "floor", "min_rssi": -85}, {"name": "till", "min_rssi": -60}]})
    assert [z.name for z in cfg.presence.zones] == ["till", "floor"]


def test_store_yaml_ble_section_uses_every_option_and_is_valid() -> None:
    raw = yaml.safe_load((CONFIG_DIR / "store.yaml").read_text())["drivers"]["ble"]
    cfg = Ble.model_validate(raw)
    assert cfg.backend == "bleak"
    assert set(raw) == set(Ble.model_fields)
    for name in ("presence", "beacons", "watchdog"):
        assert set(raw[name]) == set(type(getattr(cfg, name)).model_fields), name
    assert [b.name for b in cfg.beacons.known] == ["entrance", "shelf-7"]
