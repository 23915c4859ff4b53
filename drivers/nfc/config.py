"""Configuration of the NFC driver (`drivers.nfc` in the YAML).

Every option is documented next to its value in config/store.yaml. Store tag UIDs are
normalized here (upper-case hex without separators), so the backend compares bytes, and
classification rules are checked here, so a rule that can never match is a config error.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.configbase import Model, SimRate, SpecId
from edge.units import Duration

# nfcpy bitrate + technology strings a reader polls for (`rdwr` targets)
Target = Literal["106A", "106B", "212F", "424F"]
RuleKind = Literal["product", "loyalty"]

UID_BYTES = (4, 7, 8, 10)  # NFC-A single/double/triple size UIDs; 8 = FeliCa IDm (Type 3)
_HEX = re.compile(r"^[0-9A-F]+$")
_DEVICE = (
    r"^(usb(:[0-9a-fA-F]{3,4}){0,2}|tty:[A-Za-z0-9_.-]+(:[a-z0-9_]+)?|com:[A-Za-z0-9]+(:[a-z0-9_]+)?"
    r"|udp(:[A-Za-z0-9_.-]*)?(:[0-9]{1,5})?)$"
)
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")


def normalize_uid(value: str) -> str:
    """`04:a1:b2...` / `04-A1-...` / `04a1b2...` -> `04A1B2...`; ValueError when not a UID."""
    v = re.sub(r"[\s:-]", "", value).upper()
    if not _HEX.match(v) or len(v) % 2 or len(v) // 2 not in UID_BYTES:
        raise ValueError("store tag UIDs are 4, 7, 8 or 10 bytes of hex, e.g. 04A1B2C3D4E5F6")
    return v


class NfcRule(Model):
    """One classification rule. Every condition the rule sets must hold; rules are tried
    in order and the first that matches decides the tap's `kind` (no match: `unknown`).

    - `gs1_digital_link`: a URI or Smart Poster record is a GS1 Digital Link with a valid GTIN
    - `uri_prefix`: a URI or Smart Poster record starts with this (case-insensitive)
    - `mime_type`: a MIME record of this type (case-insensitive)
    - `number_prefix`: a number on the tag (digits with optional single spaces or dashes)
      starts with this issuer prefix and has `number_length` digits. Where the number is
      looked for: after `uri_prefix` in the URI if set, else in the `mime_type` record's
      payload if set, else in every URI, Text, Smart Poster title and MIME payload.

    For `kind: loyalty` the number found (also without `number_prefix`, where `uri_prefix`
    or `mime_type` point at one) becomes the `loyalty_id` identifier, never data.
    """

    name: SpecId
    kind: RuleKind
    gs1_digital_link: bool = False
    uri_prefix: str | None = Field(default=None, min_length=3, max_length=200)
    mime_type: str | None = None
    number_prefix: str | None = Field(default=None, pattern=r"^[0-9]{1,12}$")
    number_length: tuple[int, int] = (6, 19)

    @field_validator("mime_type")
    @classmethod
    def _mime(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if not _MIME.match(v):
            raise ValueError("must be a MIME type such as application/vnd.acme.loyalty")
        return v

    @field_validator("number_length")
    @classmethod
    def _length(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1 <= lo <= hi <= 30:
            raise ValueError("must be [min, max] digits with 1 <= min <= max <= 30, e.g. [12, 12]")
        return v

    @model_validator(mode="after")
    def _conditions(self) -> NfcRule:
        if not (self.gs1_digital_link or self.uri_prefix or self.mime_type or self.number_prefix):
            raise ValueError("a rule needs a condition: gs1_digital_link, uri_prefix, mime_type or number_prefix")
        if self.gs1_digital_link and self.kind != "product":
            raise ValueError("gs1_digital_link applies to kind product only")
        if self.number_prefix and len(self.number_prefix) > self.number_length[1]:
            raise ValueError("number_prefix is longer than the longest number_length")
        return self


def _default_targets() -> list[Target]:
    return ["106A", "106B", "212F"]  # nfcpy's default: NFC-A, NFC-B, FeliCa


def _default_rules() -> list[NfcRule]:
    return [NfcRule(name="gs1", kind="product", gs1_digital_link=True)]


class Nfc(Model):
    enabled: bool = True
    backend: Literal["sim", "nfcpy"] = "sim"
    # nfcpy path: usb, usb:072f:2200 (vendor:product), usb:001:023 (bus:device), tty:AMA0:pn532, udp:host:port
    device: str = Field(default="usb", pattern=_DEVICE)
    targets: list[Target] = Field(default_factory=_default_targets, min_length=1)
    poll_interval: Duration = Field(default=0.25, gt=0, le=5)  # pause between two polls for a tag
    debounce: Duration = Field(default=2.0, ge=0, le=3600)  # same tag back within this after lifting: same tap
    beep: bool = True  # let readers that can (ACR122U) beep / light up on a tap
    stall_timeout: Duration = Field(default=30.0, ge=5, le=600)  # nfcpy silent this long: reader wedged
    store_tags: dict[str, SpecId] = Field(default_factory=dict)  # UID -> label: infrastructure, not personal
    rules: list[NfcRule] = Field(default_factory=_default_rules)
    sim: SimRate = Field(default_factory=lambda: SimRate(rate=0.5))

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[Target]) -> list[Target]:
        if len(set(v)) != len(v):
            raise ValueError("each target once")
        return v

    @field_validator("store_tags")
    @classmethod
    def _uids(cls, v: dict[str, str]) -> dict[str, str]:
        out = {normalize_uid(k): label for k, label in v.items()}
        if len(out) != len(v):
            raise ValueError("the same UID is listed twice (written differently)")
        return out

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, v: list[NfcRule]) -> list[NfcRule]:
        names = [r.name for r in v]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        return v
