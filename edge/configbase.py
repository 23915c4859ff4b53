"""Shared pieces of the configuration schema, used by `edge.config` and each driver's own
config model (`drivers/<kind>/config.py`): the strict base model and the spec's id type."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SpecId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class Model(BaseModel):
    """Unknown keys are errors, instances are immutable, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SimRate(Model):
    """Simulated backend: how busy the simulated store is."""

    rate: float = Field(default=5.0, gt=0, le=1_000_000)  # device input per second (BLE adverts, NFC taps, receipts)
    seed: int | None = None
