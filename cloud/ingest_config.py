"""Configuration of an ingest worker (`edge-cloud ingest --config cloud.yaml`).

Loaded by the same loader as the receiver's (edge/configload.py): every problem names
file:line, the dotted key, the bad value and what is expected; relative paths are resolved
against the folder that holds the file. config/cloud.yaml ships every option, commented.

Secrets never sit in the YAML: the NATS password and the PostgreSQL password are read from
one-line files (`password_file`; under systemd, the unit's credentials) or, for PostgreSQL,
from an environment variable (`password_env`); a DSN that carries a password is refused. The
values are read once at start (`read_secret`) and never logged.

Limits are the receiver's (`batch`, `max_payload`, `max_body`; cloud/config.py): set `batch` to
the largest `uplink.batch` any device uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud.config import BatchLimits
from edge.config import Logging, Tls
from edge.configload import load_model
from edge.errors import KeyError_
from edge.units import Duration, Size
from edge.wire.uplink import DEFAULT_PREFIX, Limits

MAX_SECRET_BYTES = 4096


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NatsSettings(_Model):
    """How the worker reaches the NATS cluster (any node; the client learns the others)."""

    servers: list[str] = Field(min_length=1)
    user: str = Field(default="worker", min_length=1, max_length=256)
    password_file: Path | None = None
    tls: Tls = Field(default_factory=Tls)
    stream: str = Field(default="EDGE_BATCHES", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    consumer: str = Field(default="ingest", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    connect_timeout: Duration = Field(default=5.0, gt=0, le=300)

    @field_validator("servers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            scheme, sep, rest = url.partition("://")
            if "@" in rest:  # never echoed: it may be a password
                raise ValueError("a server URL holds credentials: put them in nats.user and nats.password_file")
            if not sep or scheme not in ("nats", "tls") or not rest:
                raise ValueError(f"{url!r}: expected nats://host:port or tls://host:port")
        return v


class PostgresSettings(_Model):
    """The store of record. The DSN names host, port, database and role, never the password."""

    dsn: str = Field(min_length=1)
    password_file: Path | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    connect_timeout: Duration = Field(default=10.0, gt=0, le=300)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        try:
            parts = conninfo_to_dict(v)
        except Exception as exc:  # psycopg raises ProgrammingError on unparseable conninfo
            raise ValueError(f"not a PostgreSQL connection string: {str(exc)[:120]}") from None
        if "password" in parts:
            raise ValueError("the DSN holds a password: remove it and set postgres.password_file "
                             "(or postgres.password_env)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> PostgresSettings:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        return self


class MetricsSettings(_Model):
    """The Prometheus listener (`/metrics`); `listen: null` turns it off."""

    listen: str | None = "127.0.0.1:9310"
    lag_interval: Duration = Field(default=5.0, ge=0.2, le=3600)  # consumer lag is asked this often

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9310 or [::]:9310 (port 0: any free port)")
        return v

    @property
    def host(self) -> str:
        return (self.listen or "").rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int((self.listen or ":0").rpartition(":")[2])


class Backoff(_Model):
    """Reconnect and retry delays: jittered, doubling from `initial` up to `max`, forever."""

    initial: Duration = Field(default=0.5, gt=0)
    max: Duration = Field(default=5.0, gt=0)  # also how soon ingest resumes after PostgreSQL returns


class IngestConfig(_Model):
    nats: NatsSettings
    postgres: PostgresSettings
    # the cloud's Ed25519 private key (edge-cloud keys create --out FILE); every ack is signed
    cloud_key: Path
    # the key sealing enrollment token secrets (edge-cloud up: DIR/token.key); without it this
    # worker answers no enrollment request (it leaves them to workers that have it)
    token_key: Path | None = None
    prefix: str = DEFAULT_PREFIX
    batch: BatchLimits = Field(default_factory=BatchLimits)
    max_payload: Size | None = Field(default=None, ge=1024)  # default: 4 x batch.max_bytes + 4 KiB
    max_body: Size | None = Field(default=None, ge=1024)  # decompressed body cap; default 4 x batch.max_bytes
    duplicate_ack_interval: Duration = Field(default=5.0, ge=0)
    max_group: int = Field(default=64, ge=1, le=4096)  # batches fetched at once = one PostgreSQL transaction
    fetch_wait: Duration = Field(default=1.0, gt=0, le=60)  # a fetch waits this long for a first batch
    key_refresh: Duration = Field(default=1.0, gt=0, le=3600)  # registry changes (revocations) seen this soon
    backoff: Backoff = Field(default_factory=Backoff)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: Logging = Field(default_factory=Logging)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        levels = v.split("/")
        if not all(lv and all(c.isalnum() or c in "_-" for c in lv) for lv in levels):
            raise ValueError("a topic prefix such as edge/v1 (levels of letters, digits, '_', '-')")
        return v

    @property
    def limits(self) -> Limits:
        derived = Limits.for_batches(max_events=self.batch.max_events, max_bytes=self.batch.max_bytes)
        return Limits(max_payload=self.max_payload or derived.max_payload,
                      max_body=self.max_body or derived.max_body, max_events=derived.max_events)

    def resolved(self, base: Path) -> IngestConfig:
        """A copy with every relative path made absolute against `base`."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        tls = self.nats.tls.model_copy(
            update={k: fix(getattr(self.nats.tls, k)) for k in ("ca_file", "cert_file", "key_file")})
        nats = self.nats.model_copy(update={"tls": tls, "password_file": fix(self.nats.password_file)})
        pg = self.postgres.model_copy(update={"password_file": fix(self.postgres.password_file)})
        return self.model_copy(update={"nats": nats, "postgres": pg, "cloud_key": fix(self.cloud_key),
                                       "token_key": fix(self.token_key)})


def load_ingest_config(path: str | Path) -> IngestConfig:
    """Read and validate a worker's YAML file; ConfigError lists every problem found (file:line: key: ...)."""
    cfg = load_model(path, IngestConfig, needs="expected a mapping with at least nats, postgres and cloud_key")
    return cfg.resolved(Path(path).resolve().parent)


def read_secret(path: Path, what: str) -> str:
    """A password from a one-line file (the trailing newline an editor adds is not part of it)."""
    try:
        raw = path.read_bytes()[: MAX_SECRET_BYTES + 1]
    except OSError as exc:
        raise KeyError_(f"{what} {path} cannot be read: {exc.strerror or exc}",
                        hint="check the path and that the service user may read it") from None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        text = ""
    if len(raw) > MAX_SECRET_BYTES or not text or "\n" in text:
        raise KeyError_(f"{what} {path} must hold exactly one non-empty line of UTF-8 text",
                        hint="put only the password in the file")
    return text


def nats_password(cfg: IngestConfig) -> str | None:
    return None if cfg.nats.password_file is None else read_secret(cfg.nats.password_file, "nats.password_file")


def postgres_dsn(cfg: IngestConfig, env: dict[str, str] | None = None) -> str:
    """The DSN to connect with, password included (NEVER log it); KeyError_ when a source is unreadable."""
    pg = cfg.postgres
    if pg.password_file is not None:
        password = read_secret(pg.password_file, "postgres.password_file")
    elif pg.password_env is not None:
        environ = os.environ if env is None else env
        password = environ.get(pg.password_env, "")
        if not password:
            raise KeyError_(f"postgres.password_env names {pg.password_env}, which is not set or empty",
                            hint="set it in the service's environment (or use postgres.password_file)")
    else:
        return make_conninfo(pg.dsn, connect_timeout=max(1, int(pg.connect_timeout)))
    return make_conninfo(pg.dsn, password=password, connect_timeout=max(1, int(pg.connect_timeout)))


def redacted_target(cfg: IngestConfig) -> dict[str, str]:
    """Where the worker connects, for logs: hosts, ports, database and role, no secret."""
    parts = conninfo_to_dict(cfg.postgres.dsn)
    keep = ("host", "port", "dbname", "user")
    return {f"pg_{k}": str(parts[k]) for k in keep if k in parts}

