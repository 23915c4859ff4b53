"""The typed event model (uplink-v1 Event) and what drivers hand to the pipeline.

Drivers yield `Reading`s: raw observations that may still carry personal identifiers,
declared as `Ident`s and free text, never hidden in `data`. The pipeline turns a Reading
into a `Pending` event (identifiers pseudonymized or dropped, text scrubbed); the buffer
assigns the per-device `id` when it commits it, which makes it an `Event`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

Source = Literal["ble", "nfc", "pos", "edge"]
SOURCES: tuple[Source, ...] = get_args(Source)

IdentClass = Literal["ble_address", "nfc_uid", "loyalty_id", "email", "phone", "card_number"]
IDENT_CLASSES: tuple[IdentClass, ...] = get_args(IdentClass)

SCHEMA = "edge.event.v1"


@dataclass(slots=True, frozen=True)
class Ident:
    """A raw personal identifier, held only in memory until the privacy stage."""

    cls: IdentClass
    raw: str

    def __repr__(self) -> str:  # never print the raw value, even in a traceback
        return f"Ident({self.cls}, <redacted>)"


# Reading and Pending are built once or twice per event (100k+/s): plain slots classes with a
# hand-written __init__ (a frozen dataclass's __init__ costs ~3x as much). Treat them as
# immutable all the same: a stage that changes something builds a new one.
EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(slots=True, init=False)
class Reading:
    """What a driver backend yields.

    `data` holds non-personal fields. `ids` maps a data field name to the identifier that
    goes there once pseudonymized (or nowhere, if the policy drops it). `text` holds free
    text (e.g. receipt lines) which is scrubbed of card numbers before any other stage
    sees it. Omitted mappings default to one shared, read-only empty mapping.
    """

    src: Source
    type: str
    ts: int
    data: Mapping[str, Any]
    ids: Mapping[str, Ident]
    text: Mapping[str, str]

    def __init__(  # noqa: PLR0917 - the dataclass signature drivers already call positionally
        self,
        src: Source,
        type: str,
        ts: int,
        data: Mapping[str, Any] = EMPTY,
        ids: Mapping[str, Ident] = EMPTY,
        text: Mapping[str, str] = EMPTY,
    ) -> None:
        self.src = src
        self.type = type
        self.ts = ts
        self.data = data
        self.ids = ids
        self.text = text

    def __repr__(self) -> str:
        return f"Reading({self.src}, {self.type}, ts={self.ts}, fields={sorted(self.data)})"


@dataclass(slots=True, init=False)
class Pending:
    """An event past the privacy stage: safe to store, waiting for its `id`."""

    ts: int
    src: Source
    type: str
    data: Mapping[str, Any]

    def __init__(self, ts: int, src: Source, type: str, data: Mapping[str, Any]) -> None:
        self.ts = ts
        self.src = src
        self.type = type
        self.data = data


@dataclass(slots=True, frozen=True)
class Event:
    """uplink-v1 Event: `id` strictly increasing per device, kept across restarts."""

    id: int
    ts: int
    src: Source
    type: str
    data: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "src": self.src, "type": self.type, "data": dict(self.data)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> Event:
        src = m["src"]
        if src not in SOURCES:
            raise ValueError(f"unknown src {src!r}")
        return cls(id=int(m["id"]), ts=int(m["ts"]), src=src, type=str(m["type"]), data=dict(m["data"]))
