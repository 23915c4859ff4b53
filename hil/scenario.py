"""The scenario format: a timeline of stimuli and faults, and what must hold afterwards.

    name: store-day
    duration: 40s                      # stimuli stop here; then the rig drains and checks
    device: {buffer: {commit_interval: 20ms}}   # merged into the daemon's config
    timeline:
      - {at: 0s, do: traffic, kind: ble, rate: 20}
      - {at: 2s, do: phone.appear, phone: alice, rssi: -70}
      - {at: 10s, do: uplink.down}
      - {at: 20s, do: uplink.up}
      - {at: 25s, do: power.cut, down_for: 1s}
    expect:
      events: {presence.enter: {min: 1}, pos.receipt: {min: 3}}
      latency: {p50_ms: 1500, p99_ms: 5000}
      backlog: {peak_min: 200}

Every model forbids unknown keys, so a typo is an error with its file and line, never a
silently ignored stimulus. Steps are ordered by `at` (seconds from the daemon's first start).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.units import Duration, Size

Kind = Literal["ble", "nfc", "pos"]
KINDS: tuple[Kind, ...] = ("ble", "nfc", "pos")
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Step(_Model):
    at: Duration


# -- stimuli of the three device kinds ---------------------------------------------------------


class Traffic(_Step):
    """Background traffic of one kind from `at` until `until` (default: the end), per second."""

    do: Literal["traffic"]
    kind: Kind
    rate: float = Field(gt=0, le=500)
    until: Duration | None = None


class PhoneAppear(_Step):
    """A shopper's phone comes into range (a new random private address)."""

    do: Literal["phone.appear"]
    phone: Label
    rssi: int = Field(default=-70, ge=-100, le=-20)


class PhoneMove(_Step):
    do: Literal["phone.move"]
    phone: Label
    rssi: int = Field(ge=-100, le=-20)


class PhoneLeave(_Step):
    do: Literal["phone.leave"]
    phone: Label


class Beacon(_Step):
    """One advertisement of a store beacon with its battery telemetry."""

    do: Literal["beacon"]
    beacon: Label
    frame: Literal["ibeacon", "eddystone_uid"] = "ibeacon"
    battery_pct: int = Field(default=80, ge=0, le=100)


class BleQuiet(_Step):
    """The BLE adapter goes quiet: scanning seems on, but no advertisement arrives."""

    do: Literal["ble.quiet"]


class BleBack(_Step):
    do: Literal["ble.back"]


class NfcTap(_Step):
    """A tap on the reader: a shelf tag (product) or a loyalty card (`card` names the customer)."""

    do: Literal["nfc.tap"]
    tag: Literal["product", "loyalty"]
    card: Label | None = None


class PosReceipt(_Step):
    """One receipt printed on a till's line; `pan: full` prints the whole card number."""

    do: Literal["pos.receipt"]
    till: Label = "till-1"
    items: int = Field(default=3, ge=1, le=40)
    loyalty: bool = False
    pan: Literal["cash", "masked", "full"] = "masked"
    email: bool = False
    phone: bool = False


class PosGarbage(_Step):
    """Line noise on a till's line: random bytes (wrong baud rate, a loose cable)."""

    do: Literal["pos.garbage"]
    till: Label = "till-1"
    size: Size = 4096
    seed: int = 0


# -- faults ----------------------------------------------------------------------------------


class UplinkDown(_Step):
    """The uplink goes away: the broker stops (`broker`: connections reset) or freezes
    (`stall`: SIGSTOP, TCP accepts but nothing answers, like a dead route)."""

    do: Literal["uplink.down"]
    how: Literal["broker", "stall"] = "broker"


class UplinkUp(_Step):
    do: Literal["uplink.up"]


class UplinkFlap(_Step):
    """Down for `down` every `period`, from `at` until `until`."""

    do: Literal["uplink.flap"]
    period: Duration = Field(gt=0)
    down: Duration = Field(gt=0)
    until: Duration
    how: Literal["broker", "stall"] = "broker"


class PowerCut(_Step):
    """SIGKILL of the daemon (no flush, no close), restart after `down_for`."""

    do: Literal["power.cut"]
    down_for: Duration = 1.0


class DiskFill(_Step):
    """The state filesystem fills up until only `leave` bytes are free."""

    do: Literal["disk.fill"]
    leave: Size = 64 * 1024


class DiskFree(_Step):
    do: Literal["disk.free"]


class DbCorrupt(_Step):
    """Power cut, then `pages` pages in the middle of the buffer database are overwritten
    (`garbage`: the whole file), then the daemon starts on the corrupt file."""

    do: Literal["db.corrupt"]
    how: Literal["pages", "garbage"] = "pages"
    pages: int = Field(default=8, ge=1, le=10_000)
    down_for: Duration = 0.5


Step = Annotated[
    Traffic | PhoneAppear | PhoneMove | PhoneLeave | Beacon | BleQuiet | BleBack | NfcTap
    | PosReceipt | PosGarbage | UplinkDown | UplinkUp | UplinkFlap | PowerCut | DiskFill
    | DiskFree | DbCorrupt,
    Field(discriminator="do"),
]

STEP_KIND: dict[str, Kind] = {
    "phone.appear": "ble", "phone.move": "ble", "phone.leave": "ble", "beacon": "ble",
    "ble.quiet": "ble", "ble.back": "ble", "nfc.tap": "nfc", "pos.receipt": "pos", "pos.garbage": "pos",
}  # fmt: skip


def step_kind(step: Any) -> Kind | None:
    """The device kind a stimulus drives; None for faults."""
    if isinstance(step, Traffic):
        return step.kind
    return STEP_KIND.get(getattr(step, "do", ""))


# -- expectations ----------------------------------------------------------------------------


class Count(_Model):
    min: int = Field(default=0, ge=0)
    max: int | None = Field(default=None, ge=0)


class Chain(_Model):
    """Checked on the batches the receiver stored: a broken link (prev != hh of the batch
    before) always fails; holes are runs of seqs never stored (lost sealed batches)."""

    rejected: int = 0  # batches the receiver refused (bad signature, chain-broken, ...)
    resets: int = 0  # the device started a new chain (a new epoch at the receiver)
    holes_max: int = 0


class Latency(_Model):
    """Capture -> receiver, for events captured outside every fault window (plus `grace`)."""

    p50_ms: int | None = None
    p99_ms: int | None = None
    max_ms: int | None = None
    grace: Duration = 3.0


class Backlog(_Model):
    peak_min: int = 0  # the backlog (stored, not acked) must reach this (faults make it grow)
    drained: bool = True  # and be empty at the end


class Expect(_Model):
    events: dict[str, Count] = Field(default_factory=dict)  # by event type, at the receiver
    # the receiver's counts by type against what real peers emitted: `exact`, `lossy` (no more
    # than emitted, and short only by what was emitted around power cuts) or `off`; stand-ins
    # emit unknown counts and are skipped
    from_peers: Literal["exact", "lossy", "off"] = "lossy"
    missing_max: int = 0  # event ids missing at the receiver beyond what edge.dropped reports
    duplicates: int = 0  # event ids twice in the receiver's output (after its dedupe)
    chain: Chain = Field(default_factory=Chain)
    latency: Latency = Field(default_factory=Latency)
    recovery: Duration | None = None  # events captured during a fault arrive within this after it
    backlog: Backlog = Field(default_factory=Backlog)
    dropped: Count = Field(default_factory=lambda: Count(max=0))  # sum of edge.dropped counts
    leaks: int = 0
    degraded: dict[str, bool] = Field(default_factory=dict)  # driver name -> seen degraded (or never)
    salvaged: bool | None = None  # the buffer was salvaged at some start
    storage_degraded: bool | None = None  # the buffer reported a full disk / I/O error (buffer_degraded)
    clean_stop: bool = True  # SIGTERM at the end: exit code 0 within the drain timeout
    # check name -> why it is known to fail today (an open bug): reported as `known`, does not
    # fail the run; once it passes the report says the issue no longer reproduces
    known_issues: dict[str, str] = Field(default_factory=dict)


class Scenario(_Model):
    name: Label
    description: str = ""
    duration: Duration = Field(gt=0, le=3600)
    drain_timeout: Duration = 30.0
    tills: list[Label] = Field(default_factory=lambda: ["till-1"], min_length=1)
    tmpfs: Size | None = None  # put the state dir on a tmpfs of this size (disk.fill needs one)
    device: dict[str, Any] = Field(default_factory=dict)  # merged into the daemon config
    timeline: list[Step] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        for i, s in enumerate(self.timeline):
            if s.at > self.duration:
                raise ValueError(f"timeline[{i}] at {s.at:g}s is after the end ({self.duration:g}s)")
            till = getattr(s, "till", None)
            if till is not None and till not in self.tills:
                raise ValueError(f"timeline[{i}]: till {till!r} is not in tills {self.tills}")
        if any(isinstance(s, DiskFill) for s in self.timeline) and self.tmpfs is None:
            raise ValueError("disk.fill needs `tmpfs: <size>` (the state dir on a small filesystem)")
        return self

    def steps(self) -> list[Step]:
        """The timeline in time order (stable for equal `at`)."""
        return sorted(self.timeline, key=lambda s: s.at)

    def of_kind(self, kind: Kind) -> list[Step]:
        return [s for s in self.steps() if step_kind(s) == kind]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; `problems` are `file:line: key: message` strings."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = list(problems)


def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate a scenario file; every problem names its file and line."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(where, [f"cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(where, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ScenarioError(where, ["expected a mapping with name, duration, timeline, expect"])
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]  # drop validator names
            line = _line_of(node, loc)
            key = ".".join(str(p) for p in loc) or "(top)"
            problems.append(f"{where}:{line}: {key}: {err['msg']}")
        raise ScenarioError(where, problems) from None


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """1-based line of the deepest YAML node on `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            continue  # a union tag (the step's `do`) in the error path, or a missing key
        node = child
        line = node.start_mark.line + 1
    return line
