"""Human-readable sizes (`512MiB`) and durations (`7d`, `250ms`) for the config.

Units are unambiguous on purpose. A size needs a byte unit: `KiB`/`MiB`/`GiB`/`TiB`
(powers of 1024) or `KB`/`MB`/`GB`/`TB` (powers of 1000); a bare `K`, `M`, `G` or `T`
is refused, because `512M` could be either and `5M` looks like five minutes. Durations
are `ms`, `s`, `m`/`min`, `h`, `d`, `w`; a capital `M` is refused (write `5m` or `5min`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_BARE_SIZE = {"k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti"}  # a prefix without B: 1000 or 1024?
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NUM_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """`512MiB` -> 536870912. Plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB, 64KiB or 1000000")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _NUM_UNIT.match(value)
        if m and m.group(2).lower() in _BARE_SIZE:
            num, unit = m.group(1), m.group(2).upper()
            raise ValueError(f"{num}{m.group(2)} is ambiguous: write {num}{_BARE_SIZE[unit.lower()]}B "
                             f"(powers of 1024) or {num}{unit}B (powers of 1000)")
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError("expected a size such as 512MiB, 64KiB, 2GB or a number of bytes")


def parse_duration(value: Any) -> float:
    """`250ms` -> 0.25, `7d` -> 604800.0. Plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 30s, 5m, 12h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _NUM_UNIT.match(value)
        if m and m.group(2) == "M":
            raise ValueError(f"{m.group(1)}M is ambiguous: write {m.group(1)}m or {m.group(1)}min for minutes "
                             "(sizes are written 512MiB or 512MB)")
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ValueError("expected a duration such as 250ms, 30s, 5m, 12h or 7d")


def format_size(n: int) -> str:
    for unit, f in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.1f}{unit}"
    return f"{n}B"


def format_duration(s: float) -> str:
    for unit, f in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if s >= f:
            v = s / f
            return f"{v:g}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{s * 1000:g}ms"


Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
