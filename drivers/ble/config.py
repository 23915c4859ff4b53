"""Configuration of the BLE driver (`drivers.ble` in the YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edge.configbase import Model, SimRate


class Ble(Model):
    enabled: bool = True
    backend: Literal["sim", "bleak"] = "sim"
    adapter: str = "hci0"
    sim: SimRate = Field(default_factory=SimRate)
