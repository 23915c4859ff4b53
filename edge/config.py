"""The configuration schema: YAML becomes a typed, validated, immutable `Config`.

Every model forbids unknown keys (a typo must never fall back to a default silently) and
is frozen. Loading with file/line error messages lives in `edge.configload`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from drivers.ble.config import Ble
from drivers.nfc.config import Nfc
from drivers.pos.config import PosLink
from edge.analytics.config import Analytics
from edge.configbase import ID_PATTERN, Model, SimRate, SpecId
from edge.events import IDENT_CLASSES, SOURCES, IdentClass, Source
from edge.units import Duration, Size


class Identity(Model):
    tenant: SpecId
    store: SpecId
    device: SpecId


class Paths(Model):
    state_dir: Path = Path("/var/lib/store-edge")
    keys_dir: Path = Path("/var/lib/store-edge/keys")


Policy = Literal["drop", "ephemeral", "stable"]


class ClassPolicy(Model):
    policy: Policy = "ephemeral"
    # for `stable`: what applies when the identifier's stable pseudonym is not consented
    fallback: Literal["drop", "ephemeral"] = "ephemeral"


def _default_classes() -> dict[IdentClass, ClassPolicy]:
    return {
        "ble_address": ClassPolicy(policy="ephemeral"),
        "nfc_uid": ClassPolicy(policy="ephemeral"),
        "loyalty_id": ClassPolicy(policy="ephemeral"),
        "email": ClassPolicy(policy="drop", fallback="drop"),
        "phone": ClassPolicy(policy="drop", fallback="drop"),
        "card_number": ClassPolicy(policy="drop", fallback="drop"),
    }


class Privacy(Model):
    # events: per-person events (with pseudonyms) go to the buffer and uplink, as always;
    # aggregate: only analytics.* and edge.* events leave the device (needs analytics.enabled)
    mode: Literal["events", "aggregate"] = "events"
    ephemeral_rotation: Duration = Field(default=86400.0, gt=0)
    # file of consented stable pseudonyms, one per line; reloaded when it changes
    consent_file: Path | None = None
    classes: dict[IdentClass, ClassPolicy] = Field(default_factory=_default_classes)

    @field_validator("classes")
    @classmethod
    def _card_numbers_always_dropped(
        cls, v: dict[IdentClass, ClassPolicy]
    ) -> dict[IdentClass, ClassPolicy]:
        card = v.get("card_number")
        if card is not None and (card.policy != "drop" or card.fallback != "drop"):
            raise ValueError("card_number is always dropped: set policy: drop (or leave it out)")
        merged = _default_classes()
        merged.update(v)
        return merged


def _default_priorities() -> list[Source]:
    return ["pos", "nfc", "ble", "edge"]


def _default_retention() -> dict[Source, float]:
    day = 86400.0
    return {"pos": 30 * day, "nfc": 14 * day, "ble": 7 * day, "edge": 7 * day}


class Buffer(Model):
    file: str = "buffer.db"  # inside paths.state_dir
    synchronous: Literal["full", "normal"] = "full"
    commit_max_events: int = Field(default=2000, ge=1, le=100_000)
    commit_interval: Duration = Field(default=0.05, gt=0, le=10)
    max_bytes: Size = Field(default=512 * 1024**2, ge=1024 * 1024)
    max_events: int | None = Field(default=None, ge=1)
    when_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    # highest priority first: when space runs out the last source loses first
    priorities: list[Source] = Field(default_factory=_default_priorities)
    # storage limitation: events older than this are deleted even if unsent
    retention: dict[Source, Duration] = Field(default_factory=_default_retention)
    # bound on events between the pipeline and a commit (backpressure beyond it)
    queue_max: int = Field(default=20_000, ge=100)

    @field_validator("priorities")
    @classmethod
    def _all_sources_once(cls, v: list[Source]) -> list[Source]:
        if sorted(v) != sorted(SOURCES):
            raise ValueError(f"list each of {', '.join(SOURCES)} exactly once, highest priority first")
        return v


KEY_PLACEHOLDER = "SET-ME"  # config/store.yaml ships `cloud_public_key: SET-ME-...`
MAKE_CLOUD_KEY = ("make the cloud key pair with `edge-cloud keys create --out FILE` and set the 64-hex "
                  "public key it prints")


class Tls(Model):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Tls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


class MqttAuth(Model):
    """MQTT user name and password (a store's broker credentials; NATS: user `<tenant>.<store>`).

    The password is read from `password_file` when connecting, never written in the YAML file
    (configs are pushed and shown; a credential in them would travel with them).
    """

    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_file: Path | None = None

    @model_validator(mode="after")
    def _file_needs_user(self) -> MqttAuth:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username: give both, or username alone")
        return self


class Discovery(Model):
    interfaces: list[str] = Field(default_factory=list)  # empty: all
    timeout: Duration = 5.0
    # also accept plain `_mqtt._tcp` adverts (anyone on the LAN can announce one): lab only
    allow_plain: bool = False


class BatchLimits(Model):
    max_events: int = Field(default=1000, ge=1, le=100_000)
    max_bytes: Size = Field(default=256 * 1024, ge=1024, le=64 * 1024**2)
    linger: Duration = Field(default=0.1, ge=0)  # 0.25 missed p99 <= 250 ms at 1,000 events/s (docs/benchmarks.md)
    compression: Literal["zlib", "none"] = "zlib"


class Reconnect(Model):
    initial: Duration = Field(default=1.0, gt=0)
    max: Duration = Field(default=60.0, gt=0)


class Uplink(Model):
    enabled: bool = True
    # mqtt://host:port, mqtts://host:port, or auto (zeroconf _mqtt._tcp / _secure-mqtt._tcp)
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = "edge/v1"
    tls: Tls = Field(default_factory=Tls)
    auth: MqttAuth = Field(default_factory=MqttAuth)
    discovery: Discovery = Field(default_factory=Discovery)
    batch: BatchLimits = Field(default_factory=BatchLimits)
    window: int = Field(default=8, ge=1, le=1024)
    ack_timeout: Duration = Field(default=15.0, gt=0)
    reconnect: Reconnect = Field(default_factory=Reconnect)
    bandwidth: Size | None = None  # bytes per second; None = unlimited
    # cloud Ed25519 public key (64 hex chars): only acks signed by it delete (or quarantine) batches
    cloud_public_key: str | None = None
    # lab only: with no cloud_public_key, trust unsigned acks (anyone on the broker can forge them)
    insecure_unsigned_acks: bool = False
    keepalive: Duration = Field(default=30.0, ge=5)
    # MQTT version: auto tries 5 (inbound packets capped by Maximum Packet Size) and falls back to 3.1.1
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # client id: <tenant>/<store>/<device>/<random suffix kept in the state folder>; `short`
    # hashes it to 23 characters of [0-9a-z] for brokers that enforce MQTT 3.1.1's limit
    client_id: Literal["full", "short"] = "full"

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: object) -> object:
        return str(v) if type(v) in (int, float) else v  # YAML reads an unquoted 5 as a number

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if v == "auto" or v.startswith(("mqtt://", "mqtts://")):
            return v
        raise ValueError("expected mqtt://host:port, mqtts://host:port or auto")

    @field_validator("cloud_public_key")
    @classmethod
    def _hex32(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v.startswith(KEY_PLACEHOLDER) and (info.context or {}).get("placeholders"):
            return None  # `edge install`: the operator still has to set it (load_config(trust=False))
        if v is not None:
            try:
                ok = len(bytes.fromhex(v)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"expected 64 hex characters (a raw Ed25519 public key); {MAKE_CLOUD_KEY}")
        return v

    def trust_problems(self, *, pinned: bool = False) -> list[tuple[str, str]]:
        """(dotted key, message) for each way this uplink would trust what it must not.

        `pinned`: the state folder's cloud_keys.json holds a cloud key (`edge enroll` pinned it),
        which stands in for `cloud_public_key`. `load_config` reports them (so `edge
        check-config` and `edge run` refuse the file with exit 2) and the uplink refuses to start
        with any (for configs built in code).
        """
        if not self.enabled:
            return []
        out: list[tuple[str, str]] = []
        if self.cloud_public_key is None and not pinned and not self.insecure_unsigned_acks:
            out.append(("uplink.cloud_public_key", "is required while the uplink is enabled: only acks "
                        f"signed by the cloud delete buffered data; {MAKE_CLOUD_KEY}, or run edge enroll "
                        "--config FILE --token TOKEN to pin the cloud's keys (for a lab without one: "
                        "uplink.insecure_unsigned_acks: true)"))
        if self.broker == "auto" and self.tls.ca_file is None:
            out.append(("uplink.tls.ca_file", "is required with broker: auto: a discovered broker's "
                        "certificate must come from the store's own CA, never the system CA store"))
        return out


class Drivers(Model):
    ble: Ble = Field(default_factory=Ble)
    nfc: Nfc = Field(default_factory=Nfc)
    pos: list[PosLink] = Field(default_factory=list)

    @field_validator("pos")
    @classmethod
    def _unique_names(cls, v: list[PosLink]) -> list[PosLink]:
        seen: dict[str, int] = {}
        for i, link in enumerate(v):
            if link.name in seen:
                # "@<i>.name: " points the config loader at the duplicate itself (edge.configload)
                raise ValueError(f"@{i}.name: the name is already used by drivers.pos[{seen[link.name]}]; "
                                 "each pos link needs its own name")
            seen[link.name] = i
        return v


def split_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError with the expected form otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9108), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:9108, got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; a wildcard, a LAN address or another name is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as reachable from outside


class HealthTls(Model):
    """The store page and metrics over HTTPS: a server certificate and its key (PEM)."""

    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> HealthTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


TOKEN_PATTERN = r"^[A-Za-z0-9._~+/=-]{16,128}$"  # noqa: S105 - the shape of a token, not one


class Health(Model):
    enabled: bool = True
    listen: str = "127.0.0.1:9108"
    # required by the page, its APIs and /metrics when `listen` is not loopback; when unset one
    # is generated into paths.state_dir/web-token (mode 0600) and shown by `edge status`
    token: str | None = Field(default=None, pattern=TOKEN_PATTERN)
    tls: HealthTls = Field(default_factory=HealthTls)
    drain_timeout: Duration = Field(default=10.0, gt=0, le=300)
    # the watchdog is withheld (and /healthz says 503) after this long without pipeline progress
    stall_timeout: Duration = Field(default=60.0, gt=0, le=3600)
    # announce the device by zeroconf as _store-edge._tcp (TXT: device, version, metrics port)
    advertise: bool = True
    # /healthz says 503 and `edge status` ALARM when sealed batches wait this long without a
    # valid ack (refused acks, e.g. a wrong uplink.cloud_public_key, or none at all)
    ack_timeout_alarm: Duration = Field(default=600.0, gt=0)
    # downlink-v1 §Desired state: a config change must leave every component it touched healthy
    # within this long, or the device returns to the previous effective configuration
    apply_grace: Duration = Field(default=60.0, gt=0, le=3600)

    @field_validator("listen", mode="before")
    @classmethod
    def _host_port(cls, v: object) -> object:
        # a bare port (9108 or "9108") means the default, local-only host
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and v.strip().isdigit():
            v = f"127.0.0.1:{v.strip()}"
        if isinstance(v, str):
            split_host_port(v)  # ValueError names the expected form
        return v

    def address(self) -> tuple[str, int]:
        """(host, port) of `listen`."""
        return split_host_port(self.listen)


class Downlink(Model):
    """Fleet management from the cloud (downlink-v1): desired config layers, signed commands,
    consent shards, reported state. It shares the uplink's MQTT session, so it runs only while
    `uplink.enabled`; not remotely settable (a layer cannot switch the channel it came by off)."""

    enabled: bool = True
    # messages (desired layers, consent shards, commands) waiting to be handled; beyond, dropped and counted
    queue_max: int = Field(default=512, ge=16, le=65536)
    # `reported` is published on every change and at least this often while connected (spec: <= 60s)
    report_interval: Duration = Field(default=60.0, gt=0, le=60)


class Logging(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(Model):
    identity: Identity
    paths: Paths = Field(default_factory=Paths)
    privacy: Privacy = Field(default_factory=Privacy)
    buffer: Buffer = Field(default_factory=Buffer)
    uplink: Uplink = Field(default_factory=Uplink)
    drivers: Drivers = Field(default_factory=Drivers)
    health: Health = Field(default_factory=Health)
    logging: Logging = Field(default_factory=Logging)
    downlink: Downlink = Field(default_factory=Downlink)
    analytics: Analytics = Field(default_factory=Analytics)

    @model_validator(mode="after")
    def _analytics_needs(self) -> Config:
        if self.privacy.mode == "aggregate" and not self.analytics.enabled:
            raise ValueError("privacy.mode needs analytics.enabled: true (aggregate publishes only analytics)")
        if self.analytics.enabled and self.privacy.classes["ble_address"].policy == "drop":
            raise ValueError("privacy.classes.ble_address.policy must not be drop when analytics.enabled: analytics "
                             "follows visits by their pseudonyms (in memory only)")
        return self

    @property
    def buffer_path(self) -> Path:
        return self.paths.state_dir / self.buffer.file

    @property
    def downlink_active(self) -> bool:
        """The downlink runs: enabled, over an enabled uplink."""
        return self.downlink.enabled and self.uplink.enabled

    @property
    def cloud_consent(self) -> bool:
        """Consent of stable pseudonyms comes from the cloud's shards (downlink-v1 §Consent); a
        store with `privacy.consent_file` (or without a downlink) keeps its file."""
        return self.downlink_active and self.privacy.consent_file is None


__all__ = ["IDENT_CLASSES", "ID_PATTERN", "Ble", "Config", "Model", "Nfc", "PosLink", "SimRate", "SpecId"]
