"""Configuration of the receiver (`edge-cloud receive --config receiver.yaml`).

Loaded by the same loader as the device config (edge/configload.py): every problem names
file:line, the dotted key, the bad value and what is expected, with a did-you-mean for unknown
keys. Relative paths are resolved against the folder that holds the file, so the receiver
behaves the same whatever the working directory.

Limits. `batch` mirrors the devices' `uplink.batch` (set it to the largest any of your devices
uses); the payload and body caps and the MessagePack container limits derive from it
(edge.wire.uplink.Limits.for_batches: 4 x max_bytes), unless `max_payload` / `max_body` are set.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.config import Logging, Tls
from edge.configload import load_model
from edge.units import Duration, Size
from edge.wire.uplink import BATCH_MAX_BYTES, BATCH_MAX_EVENTS, DEFAULT_PREFIX, LARGEST_EVENTS, Limits


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BatchLimits(_Model):
    """The largest `uplink.batch` of the devices this receiver serves."""

    max_events: int = Field(default=BATCH_MAX_EVENTS, ge=1, le=LARGEST_EVENTS)
    max_bytes: Size = Field(default=BATCH_MAX_BYTES, ge=1024, le=64 * 1024**2)


class ReceiverConfig(_Model):
    # mqtt://host[:1883] or mqtts://host[:8883] (TLS, with tls.ca_file / cert_file / key_file)
    broker: str = "mqtt://127.0.0.1:1883"
    tls: Tls = Field(default_factory=Tls)
    # 3.1.1 works everywhere (amqtt included); mosquitto also supports $share with it
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # unique per receiver process: unset, each process gets edge-receiver-<8 random hex> (a fixed
    # default made two receivers on defaults take the broker session from each other in turn)
    client_id: str = Field(default_factory=lambda: f"edge-receiver-{secrets.token_hex(4)}", min_length=1,
                           max_length=128)  # fmt: skip
    prefix: str = DEFAULT_PREFIX
    # receivers in one group share the load (`$share/{group}/...`); null = plain subscription,
    # for brokers without shared subscriptions
    shared_group: str | None = Field(default="edge-receivers", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # registered device public keys: <tenant>/<store>/<device>.pub, 64 hex chars each
    keys_dir: Path = Path("receiver-keys")
    db: Path = Path("receiver.db")  # dedupe and chain store (SQLite)
    out: Path = Path("events.jsonl")  # accepted events, one JSON object per line
    # the cloud's Ed25519 private key (edge-cloud keys create --out FILE); every ack is signed
    cloud_key: Path
    batch: BatchLimits = Field(default_factory=BatchLimits)
    max_payload: Size | None = Field(default=None, ge=1024)  # default: 4 x batch.max_bytes + 4 KiB
    max_body: Size | None = Field(default=None, ge=1024)  # decompressed body cap; default 4 x batch.max_bytes
    keepalive: int = Field(default=30, ge=5, le=3600)
    # "already stored" acks: at most one per (device, seq) this often (replays are answered before
    # authentication); keep it below the devices' uplink.ack_timeout (15 s by default)
    duplicate_ack_interval: Duration = Field(default=5.0, ge=0)
    # a batch deferred for a chain ambiguity (cloud/chain.py) is settled (accepted) once it has come
    # back this many times, or this long after its first deferral: a gap that never fills (the
    # device's buffer dropped batches) must not keep its genuine batch unanswered forever
    defer_max_resends: int = Field(default=3, ge=0, le=1000)
    defer_max_age: Duration = Field(default=600.0, ge=0)
    max_group: int = Field(default=256, ge=1, le=10_000)  # batches per commit/fsync
    max_group_bytes: Size = Field(default=16 * 1024**2, ge=1024)  # payload bytes per group (one batch at least)
    # received, not yet handled: beyond either bound further messages are dropped (counted; their
    # devices get no ack and resend later). Memory held is about max_queued_bytes + max_group_bytes.
    max_queued: int = Field(default=1024, ge=1, le=1_000_000)
    max_queued_bytes: Size = Field(default=64 * 1024**2, ge=1024)
    logging: Logging = Field(default_factory=Logging)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        parts = urlsplit(v)
        try:
            parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
        except ValueError:
            raise ValueError("the port must be a number in 1-65535") from None
        bad_shape = parts.path not in ("", "/") or parts.query or parts.username is not None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or bad_shape:
            raise ValueError("expected mqtt://host:port or mqtts://host:port")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or v.startswith("/") or v.endswith("/") or any(c in v for c in "+#$"):
            raise ValueError("a topic prefix such as edge/v1 (no wildcards, no leading/trailing /)")
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.use_tls else 1883)

    @property
    def limits(self) -> Limits:
        derived = Limits.for_batches(max_events=self.batch.max_events, max_bytes=self.batch.max_bytes)
        return Limits(
            max_payload=self.max_payload or derived.max_payload,
            max_body=self.max_body or derived.max_body,
            max_events=derived.max_events,
        )

    @property
    def use_tls(self) -> bool:
        return self.broker.startswith("mqtts://")

    def resolved(self, base: Path) -> ReceiverConfig:
        """A copy with every relative path made absolute against `base`."""

        def fix(p: Path | None) -> Path | None:
            # an absolute path is kept as it is (it used to become None: absolute cloud_key and
            # TLS files were silently dropped, so acks went out unsigned)
            return p if p is None or p.is_absolute() else base / p

        tls = self.tls.model_copy(
            update={k: fix(getattr(self.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
        )
        return self.model_copy(
            update={
                "tls": tls,
                "keys_dir": fix(self.keys_dir),
                "db": fix(self.db),
                "out": fix(self.out),
                "cloud_key": fix(self.cloud_key),
            }
        )


def load_receiver_config(path: str | Path) -> ReceiverConfig:
    """Read and validate a receiver YAML file; ConfigError lists every problem found (file:line: key: ...)."""
    cfg = load_model(path, ReceiverConfig, needs="expected a mapping of receiver settings with at least cloud_key")
    return cfg.resolved(Path(path).resolve().parent)
