"""Configuration of store analytics (`analytics` in the YAML; every option is documented in
config/store.yaml and docs/analytics.md)."""

from __future__ import annotations

from pydantic import Field, field_validator

from edge.configbase import Model
from edge.units import Duration

DAY_S = 86400


class Analytics(Model):
    enabled: bool = False
    # length of one interval; intervals start at local midnight, so it must divide a day
    interval: Duration = Field(default=900.0, ge=60, le=DAY_S)
    k: int = Field(default=5, ge=1, le=1000)  # count cells below k are published as null
    epsilon: float | None = Field(default=None, gt=0, le=100)  # Laplace noise per count cell; null = off
    staff_after: Duration = Field(default=3 * 3600.0, ge=600)  # a visit this long is staff or a fixed device
    rotation: bool = True  # link a visit across a private-address rotation (inferred, never stored)
    rotation_gap: Duration = Field(default=10.0, gt=0, le=120)  # the new address appears this soon after the old
    rotation_rssi: int = Field(default=20, ge=1, le=40)  # dB between the old's last and the new's first RSSI
    sample_every: Duration = Field(default=10.0, ge=1, le=300)  # occupancy sampling period
    max_gtins: int = Field(default=200, ge=1, le=10_000)  # distinct GTINs per interval; the rest: taps_other

    @field_validator("interval")
    @classmethod
    def _divides_a_day(cls, v: float) -> float:
        if v != int(v) or DAY_S % int(v):
            raise ValueError("must divide a day into whole intervals (e.g. 5m, 10m, 15m, 30m, 1h)")
        return v
