"""Pure decoders for the advertisement payloads the BLE driver understands.

Input is what BlueZ (and bleak) hand over per advertisement: manufacturer data keyed by
the 16-bit Bluetooth SIG company identifier (the two company-id bytes already removed)
and service data keyed by 128-bit service UUID string. Nothing here raises on garbage:
a payload that claims a format and breaks it becomes a `Malformed(reason)`; a payload
that claims nothing is a `Manufacturer(company_id, length)` (or ignored, for service data).

Formats (byte layouts as in the public specifications):

- iBeacon (Apple, "Proximity Beacon Specification" R1): company 0x004C, payload
  `02 15` + UUID (16) + major (2, big endian) + minor (2, BE) + measured power (int8, dBm at 1 m).
- AltBeacon (github.com/AltBeacon/spec): any company id, payload `BE AC` + beacon id (20:
  read as UUID 16 + major 2 + minor 2, as the reference layout does) + reference RSSI
  (int8) + manufacturer reserved (1).
- Eddystone (github.com/google/eddystone/protocol-specification.md), service data of
  UUID 0xFEAA, first byte the frame type:
  `00` UID: tx power at 0 m (int8) + namespace (10) + instance (6) [+ 2 RFU];
  `10` URL: tx power + scheme (00 http://www. 01 https://www. 02 http:// 03 https://) +
  up to 17 encoded bytes (00-0D expand to .com/ .org/ ... .gov);
  `20` TLM: version `00` + battery mV (2, BE; 0 = not supported) + temperature (int16 BE,
  8.8 fixed point; 0x8000 = not supported) + advertising PDU count (4) + time since
  power-on (4, 0.1 s); version `01` is encrypted TLM (recognized, not decoded);
  `30` EID: tx power + 8-byte ephemeral id (recognized; resolving it needs the registrar).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

APPLE = 0x004C
EDDYSTONE_UUID = "0000feaa-0000-1000-8000-00805f9b34fb"

_URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
_URL_EXPANSIONS = (".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
                   ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov")  # fmt: skip


@dataclass(slots=True, frozen=True)
class IBeacon:
    uuid: str  # upper case, with dashes
    major: int
    minor: int
    tx_power: int  # measured power, dBm at 1 m


@dataclass(slots=True, frozen=True)
class AltBeacon:
    company_id: int
    uuid: str  # first 16 bytes of the 20-byte beacon id
    major: int
    minor: int
    tx_power: int  # reference RSSI, dBm at 1 m
    reserved: int


@dataclass(slots=True, frozen=True)
class EddystoneUid:
    namespace: str  # 20 lower-case hex digits
    instance: str  # 12 lower-case hex digits
    tx_power: int  # dBm at 0 m


@dataclass(slots=True, frozen=True)
class EddystoneUrl:
    url: str
    tx_power: int


@dataclass(slots=True, frozen=True)
class EddystoneTlm:
    battery_mv: int | None  # None: not supported (mains powered)
    temperature_c: float | None  # None: not supported
    adv_count: int
    uptime_s: float


@dataclass(slots=True, frozen=True)
class EddystoneEtlm:
    """Encrypted TLM: recognized, not decoded (needs the beacon's key)."""


@dataclass(slots=True, frozen=True)
class EddystoneEid:
    eid: str  # 16 lower-case hex digits; rotates, resolvable only by the registrar
    tx_power: int


@dataclass(slots=True, frozen=True)
class Manufacturer:
    """Manufacturer data in no format decoded here (phones, wearables, tags)."""

    company_id: int
    length: int


@dataclass(slots=True, frozen=True)
class Malformed:
    reason: str  # short snake_case, e.g. "ibeacon_length"


Frame = IBeacon | AltBeacon | EddystoneUid | EddystoneUrl | EddystoneTlm | EddystoneEtlm | EddystoneEid | Manufacturer


@dataclass(slots=True, frozen=True)
class Decoded:
    frames: tuple[Frame, ...]
    malformed: tuple[str, ...]  # reasons, one per malformed payload


NOTHING = Decoded((), ())


def _i8(b: int) -> int:
    return b - 256 if b > 127 else b


def _uuid(b: bytes) -> str:
    h = b.hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def decode_manufacturer(company_id: int, payload: bytes) -> Frame | Malformed:
    """One manufacturer-data entry (payload without the company id)."""
    n = len(payload)
    if company_id == APPLE and n >= 2 and payload[0] == 0x02 and payload[1] == 0x15:
        if n != 23:
            return Malformed("ibeacon_length")
        return IBeacon(
            _uuid(payload[2:18]),
            (payload[18] << 8) | payload[19],
            (payload[20] << 8) | payload[21],
            _i8(payload[22]),
        )
    if n >= 2 and payload[0] == 0xBE and payload[1] == 0xAC:
        if n != 24:
            return Malformed("altbeacon_length")
        return AltBeacon(
            company_id,
            _uuid(payload[2:18]),
            (payload[18] << 8) | payload[19],
            (payload[20] << 8) | payload[21],
            _i8(payload[22]),
            payload[23],
        )
    return Manufacturer(company_id, n)


def _url(tx: int, body: bytes) -> EddystoneUrl | Malformed:
    if not body or len(body) > 18:
        return Malformed("eddystone_url_length")
    if body[0] >= len(_URL_SCHEMES):
        return Malformed("eddystone_url_scheme")
    parts = [_URL_SCHEMES[body[0]]]
    for b in body[1:]:
        if b < len(_URL_EXPANSIONS):
            parts.append(_URL_EXPANSIONS[b])
        elif 0x20 < b < 0x7F:
            parts.append(chr(b))
        else:
            return Malformed("eddystone_url_char")
    return EddystoneUrl("".join(parts), tx)


def decode_eddystone(payload: bytes) -> Frame | Malformed:  # noqa: PLR0911 - one return per frame type / defect
    """The service data of UUID 0xFEAA."""
    n = len(payload)
    if n == 0:
        return Malformed("eddystone_empty")
    kind = payload[0]
    if kind == 0x00:
        if n not in (18, 20):
            return Malformed("eddystone_uid_length")
        return EddystoneUid(payload[2:12].hex(), payload[12:18].hex(), _i8(payload[1]))
    if kind == 0x10:
        if n < 3:
            return Malformed("eddystone_url_length")
        return _url(_i8(payload[1]), payload[2:])
    if kind == 0x20:
        if n < 2:
            return Malformed("eddystone_tlm_length")
        if payload[1] == 0x01:
            return EddystoneEtlm() if n == 18 else Malformed("eddystone_tlm_length")
        if payload[1] != 0x00:
            return Malformed("eddystone_tlm_version")
        if n != 14:
            return Malformed("eddystone_tlm_length")
        mv = (payload[2] << 8) | payload[3]
        raw_t = (payload[4] << 8) | payload[5]
        temp = None if raw_t == 0x8000 else (raw_t - 65536 if raw_t > 32767 else raw_t) / 256.0
        return EddystoneTlm(
            mv or None,
            temp,
            int.from_bytes(payload[6:10], "big"),
            int.from_bytes(payload[10:14], "big") / 10.0,
        )
    if kind == 0x30:
        if n != 10:
            return Malformed("eddystone_eid_length")
        return EddystoneEid(payload[2:10].hex(), _i8(payload[1]))
    return Malformed("eddystone_frame")


def decode(manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]) -> Decoded:
    """Every frame in one advertisement, and the reasons of every malformed payload."""
    if not manufacturer_data and not service_data:
        return NOTHING
    frames: list[Frame] = []
    bad: list[str] = []
    for cid, payload in manufacturer_data.items():
        if not 0 <= cid <= 0xFFFF:
            bad.append("company_id")
            continue
        f = decode_manufacturer(cid, bytes(payload))
        if isinstance(f, Malformed):
            bad.append(f.reason)
        else:
            frames.append(f)
    for key, payload in service_data.items():
        if key != EDDYSTONE_UUID and key.lower() != EDDYSTONE_UUID:
            continue
        f = decode_eddystone(bytes(payload))
        if isinstance(f, Malformed):
            bad.append(f.reason)
        else:
            frames.append(f)
    return Decoded(tuple(frames), tuple(bad))
