"""Configuration of one POS serial link (an entry of `drivers.pos` in the YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edge.configbase import Model, SimRate, SpecId


class PosLink(Model):
    name: SpecId
    backend: Literal["sim", "serial"] = "sim"
    port: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    framing: Literal["lines", "stx_etx", "escpos", "jsonl"] = "lines"
    sim: SimRate = Field(default_factory=lambda: SimRate(rate=0.2))

    @model_validator(mode="after")
    def _serial_needs_port(self) -> PosLink:
        if self.backend == "serial" and not self.port:
            raise ValueError("backend serial needs port (e.g. /dev/serial/by-id/usb-FTDI_...)")
        return self
