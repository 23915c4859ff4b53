"""Configuration of the NFC driver (`drivers.nfc` in the YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edge.configbase import Model, SimRate


class Nfc(Model):
    enabled: bool = True
    backend: Literal["sim", "nfcpy"] = "sim"
    device: str = "usb"  # nfcpy path: usb, usb:072f:2200, tty:AMA0:pn532, udp:127.0.0.1:54321
    sim: SimRate = Field(default_factory=lambda: SimRate(rate=0.5))
