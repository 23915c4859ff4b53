"""How the daemon builds analytics from the config (used by edge/supervisor.py)."""

from __future__ import annotations

from edge.analytics.engine import StoreAnalytics
from edge.clock import Clock
from edge.config import Config


def build_analytics(cfg: Config, clock: Clock) -> StoreAnalytics | None:
    """The analytics component for `cfg` (None when `analytics.enabled` is false). Zones are
    the BLE presence zones; intervals settle after presence's `exit_after`."""
    if not cfg.analytics.enabled:
        return None
    presence = cfg.drivers.ble.presence
    return StoreAnalytics(cfg.analytics, [z.name for z in presence.zones], clock,
                          exit_after=presence.exit_after, max_visits=2 * presence.max_devices)


def driver_config(cfg: Config) -> Config:
    """`cfg` as the drivers must see it: with analytics, presence emits zone changes."""
    if not cfg.analytics.enabled or cfg.drivers.ble.presence.zone_events:
        return cfg
    ble = cfg.drivers.ble
    presence = ble.presence.model_copy(update={"zone_events": True})
    drivers = cfg.drivers.model_copy(update={"ble": ble.model_copy(update={"presence": presence})})
    return cfg.model_copy(update={"drivers": drivers})
