"""The analytics options and privacy.mode: defaults, check-config errors with file:line, and
what the daemon derives from them (zone events for the drivers, the analytics component)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.analytics.wiring import build_analytics, driver_config
from edge.clock import FakeClock
from edge.config import Config
from edge.configload import load_config
from edge.errors import ConfigError

IDENTITY = "identity: {tenant: t, store: s, device: d}\n"


def problems(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "edge.yaml"
    f.write_text(IDENTITY + text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    return info.value.problems


def test_defaults_keep_todays_behaviour() -> None:
    cfg = Config.model_validate({"identity": {"tenant": "t", "store": "s", "device": "d"}})
    a = cfg.analytics
    assert (cfg.privacy.mode, a.enabled, a.interval, a.k, a.epsilon, a.staff_after) == (
        "events", False, 900.0, 5, None, 10800.0)
    assert build_analytics(cfg, FakeClock()) is None
    assert driver_config(cfg) is cfg


def test_aggregate_mode_without_analytics_is_a_config_error(tmp_path: Path) -> None:
    out = problems(tmp_path, "privacy: {mode: aggregate}\n")
    assert len(out) == 1
    assert out[0] == (f"{tmp_path / 'edge.yaml'}:2: privacy.mode: 'aggregate' is not valid: needs "
                      "analytics.enabled: true (aggregate publishes only analytics)")


@pytest.mark.parametrize(("text", "expect"), [
    ("analytics: {enabled: true, interval: 7m}\n", "analytics.interval: '7m' is not valid: must divide a day"),
    ("analytics: {enabled: true, k: 0}\n", "analytics.k: 0 is not valid"),
    ("analytics: {enabled: true, epsilon: -1}\n", "analytics.epsilon: -1 is not valid"),
    ("analytics: {enabled: true, staff_after: 5m}\n", "analytics.staff_after: '5m' is not valid"),
    ("analytics: {enabled: true, rotation_gap: 10min, rotatoin: true}\n", "did you mean 'rotation'?"),
    ("privacy: {mode: aggregated}\n", "privacy.mode: 'aggregated' is not valid: expected one of 'events', "
                                      "'aggregate'; did you mean 'aggregate'?"),
])
def test_bad_analytics_options_name_key_value_and_what_is_expected(tmp_path: Path, text: str, expect: str) -> None:
    out = problems(tmp_path, text)
    assert any(f"{tmp_path / 'edge.yaml'}:2: " in p and expect in p for p in out), out


def test_analytics_with_dropped_bluetooth_pseudonyms_is_refused(tmp_path: Path) -> None:
    out = problems(tmp_path, "analytics: {enabled: true}\nprivacy: {classes: {ble_address: {policy: drop, "
                             "fallback: drop}}}\n")
    assert any(":3: privacy.classes.ble_address.policy: 'drop' is not valid: must not be drop" in p for p in out), out


def test_enabled_analytics_turns_on_zone_events_and_uses_the_presence_zones() -> None:
    cfg = Config.model_validate({
        "identity": {"tenant": "t", "store": "s", "device": "d"},
        "analytics": {"enabled": True, "interval": "30m"},
        "drivers": {"ble": {"presence": {"exit_after": "20s", "zones": [
            {"name": "floor", "min_rssi": -75}, {"name": "till", "min_rssi": -60}]}}},
    })
    assert driver_config(cfg).drivers.ble.presence.zone_events is True
    assert cfg.drivers.ble.presence.zone_events is False  # the config itself is unchanged
    a = build_analytics(cfg, FakeClock())
    assert a is not None
    assert a.zones == ["till", "floor"]
    assert a.snapshot()["interval_s"] == 1800
