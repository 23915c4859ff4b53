"""Configuration of the reference receiver (`edge receive --config receiver.yaml`).

Relative paths in the file are resolved against the folder that holds the file, so the
receiver behaves the same whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge.config import Tls
from edge.errors import ConfigError
from edge.units import Size
from edge.uplink.wire import DEFAULT_PREFIX, MAX_BODY, MAX_PAYLOAD


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ReceiverConfig(_Model):
    # mqtt://host[:1883] or mqtts://host[:8883] (TLS, with tls.ca_file / cert_file / key_file)
    broker: str = "mqtt://127.0.0.1:1883"
    tls: Tls = Field(default_factory=Tls)
    # 3.1.1 works everywhere (amqtt included); mosquitto also supports $share with it
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    client_id: str = Field(default="edge-receiver", min_length=1, max_length=128)
    prefix: str = DEFAULT_PREFIX
    # receivers in one group share the load (`$share/{group}/...`); null = plain subscription,
    # for brokers without shared subscriptions
    shared_group: str | None = Field(default="edge-receivers", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    keys_dir: Path = Path("receiver-keys")  # registered device public keys, *.pub (64 hex chars)
    db: Path = Path("receiver.db")  # dedupe and chain store (SQLite)
    out: Path = Path("events.jsonl")  # accepted events, one JSON object per line
    # cloud Ed25519 private key (32 raw bytes, or 64 hex chars); when set, acks are signed
    cloud_key: Path | None = None
    max_payload: Size = Field(default=MAX_PAYLOAD, ge=1024)
    max_body: Size = Field(default=MAX_BODY, ge=1024)  # decompressed body cap
    keepalive: int = Field(default=30, ge=5, le=3600)
    max_group: int = Field(default=256, ge=1, le=10_000)  # batches per commit/fsync

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
    """Read and validate a receiver YAML file; ConfigError lists every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [f"not valid YAML: {exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(p), ["the top level must be a mapping of settings"])
    try:
        cfg = ReceiverConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(str(p), problems) from None
    return cfg.resolved(p.resolve().parent)
