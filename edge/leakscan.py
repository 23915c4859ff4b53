"""Search files for raw personal identifiers in every encoding we can think of.

Used by the privacy tests, the demo summary and the HIL rig: after a run, none of the
identifiers injected through the simulated devices may appear in the SQLite files
(including -wal), the logs, an export or what the receiver got.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edge.events import IdentClass

_HEX = re.compile(r"[^0-9a-fA-F]")
_DIGITS = re.compile(r"\D")


@dataclass(slots=True, frozen=True)
class Needle:
    cls: IdentClass
    label: str  # a description that does not contain the identifier itself
    pattern: bytes


def _hex_forms(hexstr: str, cls: IdentClass, label: str) -> list[Needle]:
    h = _HEX.sub("", hexstr).lower()
    raw = bytes.fromhex(h)
    pairs = [h[i : i + 2] for i in range(0, len(h), 2)]
    forms: dict[str, bytes] = {
        "hex-lower": h.encode(),
        "hex-upper": h.upper().encode(),
        "raw-bytes": raw,
        "raw-bytes-reversed": raw[::-1],
        "decimal": str(int(h, 16)).encode(),
    }
    for sep in (":", "-", " ", "_"):
        forms[f"hex-lower{sep}"] = sep.join(pairs).encode()
        forms[f"hex-upper{sep}"] = sep.join(pairs).upper().encode()
    return [Needle(cls, f"{label}/{k}", v) for k, v in forms.items()]


def _digit_forms(digits: str, cls: IdentClass, label: str) -> list[Needle]:
    d = _DIGITS.sub("", digits)
    groups4 = " ".join(d[i : i + 4] for i in range(0, len(d), 4))
    forms = {"digits": d, "groups-space": groups4, "groups-dash": groups4.replace(" ", "-")}
    out = [Needle(cls, f"{label}/{k}", v.encode()) for k, v in forms.items()]
    out.append(Needle(cls, f"{label}/utf16", d.encode("utf-16-le")))
    return out


def needles_for(cls: IdentClass, raw: str, label: str | None = None) -> list[Needle]:
    """Every encoding of one raw identifier that must never be found."""
    label = label or cls
    if cls in ("ble_address", "nfc_uid"):
        return _hex_forms(raw, cls, label)
    if cls in ("card_number", "loyalty_id"):
        return _digit_forms(raw, cls, label)
    if cls == "phone":
        d = _DIGITS.sub("", raw)
        forms = {raw, d, "+" + d.lstrip("0"), raw.replace(" ", "")}
        return [Needle(cls, f"{label}/form{i}", f.encode()) for i, f in enumerate(sorted(forms)) if len(f) >= 6]
    forms_e = {raw, raw.lower(), raw.upper()}
    return [Needle(cls, f"{label}/form{i}", f.encode()) for i, f in enumerate(sorted(forms_e))]


@dataclass(slots=True, frozen=True)
class Finding:
    path: str
    needle: str

    def __str__(self) -> str:
        return f"{self.path}: {self.needle}"


def files_under(paths: Iterable[Path]) -> list[Path]:
    """The files among `paths`, folders walked (sorted); paths that do not exist are skipped."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(q for q in sorted(p.rglob("*")) if q.is_file())
        elif p.is_file():
            files.append(p)
    return files


def scan(paths: Iterable[Path], needles: list[Needle]) -> list[Finding]:
    """Files (folders are walked) containing any needle; case-sensitive byte search."""
    found: list[Finding] = []
    for f in files_under(paths):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        for n in needles:
            if n.pattern and n.pattern in data:
                found.append(Finding(str(f), n.label))
    return found
