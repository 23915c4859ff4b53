"""Enrollment on the cloud side (downlink-v1 §Enrollment): a request in, a signed answer out.

Design. `Enroller.answer(topic, payload)` is the whole decision for one request, blocking (the
control loop runs it in a thread, cloud/control.py): parse and check the device's signature
(edge/wire/downlink.py), rate-limit per store, then ONE PostgreSQL transaction that locks the
token row (`SELECT ... FOR UPDATE`, so two workers or two devices racing for one token
serialize), checks it, registers the key for exactly (tenant, store, device) and marks the
token used. The answer is built only after COMMIT; the caller publishes it on `enrolled` and
only then acks the request to JetStream, so a lost answer is a redelivered request, answered
again as a repeat.

Checks, in this order (each answer but `bad-mac` is MACed with the token's secret):

    unknown token_id        -> bad-mac (no `m`)
    mac does not verify     -> bad-mac (no `m`)
    token of another store  -> token-scope
    token already used      -> ok again for a repeat of the accepted request (same token,
                               identity and pub, within `repeat_window` of the first use, key
                               still active), else token-used
    token expired           -> token-expired
    key registered for another (tenant, store, device) -> token-scope (a key belongs to one device)
    otherwise               -> register, mark used, ok

Choices the spec leaves open. An unknown token id is answered exactly like a wrong secret,
`bad-mac`: the cloud has no secret to MAC it with, and a requester must not learn which token
ids exist. A `bad-mac` answer therefore carries no `m`; the device cannot authenticate it and
pins nothing on it (edge/enroll.py only shows it). The MAC is checked before scope, use and
expiry, so without the secret nothing about a token is revealed. A repeat of an accepted request
is answered `ok` for `repeat_window` (24 h) after the first use while the key it registered is
still active: the requester proved it holds both the secret and the device key, so the repeat
gives it nothing new; after a revocation it gets `token-used`. Requests are rate-limited per
(tenant, store) (`RateLimiter`): over the limit they are counted and not answered (the device
repeats with backoff). No freshness check on the request's `t`: a device's clock is often not
synchronized before its first start, and a replayed request can only be answered.

Unparseable requests (malformed, oversized, wrong topic, a device signature that does not
verify) get no answer at all: they are counted under their reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.db.errors import DbError
from cloud.db.registry import add_device
from cloud.db.tokens import TokenKey
from edge.clock import Clock
from edge.wire.downlink import (
    DocumentError,
    EnrollRequest,
    document,
    enrolled_topic,
    parse_enroll_request,
    sign_document,
)
from edge.wire.uplink import kid_of, public_raw

log = structlog.get_logger("cloud.enroll")

REPEAT_WINDOW = 24 * 3600.0  # s after its first use that an accepted request is answered ok again
RATE = 0.5  # requests/s per (tenant, store), sustained
BURST = 30  # requests per (tenant, store) at once (a store's devices enrolling together)
MAX_BUCKETS = 100_000  # stores tracked by the limiter at most (full buckets are forgotten first)
ACCEPTED = frozenset({"accepted", "repeated"})


class EnrollUnavailable(DbError):
    """The request cannot be decided now (e.g. a sealed secret does not open with this worker's
    token key); the caller leaves it for a retry, possibly by another worker."""


@dataclass(slots=True)
class RateLimiter:
    """Token buckets per key: `burst` at once, `rate` per second sustained (monotonic clock)."""

    clock: Clock
    rate: float = RATE
    burst: int = BURST
    max_keys: int = MAX_BUCKETS
    _buckets: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, at)

    def allow(self, key: tuple[str, str]) -> bool:
        now = self.clock.monotonic()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]


@dataclass(slots=True, frozen=True)
class Answer:
    """What became of one request: `result` (a metric label), and the reply to publish, if any
    (`topic` in MQTT form)."""

    result: str
    topic: str | None = None
    payload: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.result in ACCEPTED


class Enroller:
    """Decides enrollment requests against PostgreSQL (see the module doc). Not thread-safe:
    one control loop calls it, one request at a time."""

    def __init__(self, dsn: str, *, token_key: TokenKey, cloud_key: Ed25519PrivateKey, prefix: str, clock: Clock,
                 repeat_window: float = REPEAT_WINDOW, limiter: RateLimiter | None = None) -> None:  # fmt: skip
        self._dsn = dsn
        self._token_key = token_key
        self._key = cloud_key
        self._pub = public_raw(cloud_key.public_key())
        self._kid = kid_of(self._pub)
        self._prefix = prefix
        self._clock = clock
        self._window = dt.timedelta(seconds=repeat_window)
        self._limiter = limiter or RateLimiter(clock)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def answer(self, topic: str, payload: bytes) -> Answer:
        """The decision for one request on `topic` (MQTT form). Raises psycopg.Error when the
        database cannot be reached and EnrollUnavailable when the token cannot be opened: the
        caller retries later, nothing was decided."""
        try:
            req = parse_enroll_request(payload, topic=topic, prefix=self._prefix)
        except DocumentError as exc:
            log.warning("enroll_unparseable", reason=exc.reason)
            return Answer(exc.reason if exc.reason in _UNPARSEABLE else "malformed")
        if not self._limiter.allow((req.tenant, req.store)):
            log.warning("enroll_rate_limited", tenant=req.tenant, store=req.store)
            return Answer("rate-limited")
        result, secret = self._decide(req)
        fields: dict[str, Any] = {"ok": result in ACCEPTED, "cloud_keys": [self._pub]}
        if result not in ACCEPTED:
            fields["err"] = result
        doc = document("enrolled", req.tenant, req.store, req.device, self._kid, self._clock.wall_ms(), **fields)
        event = "enroll_accepted" if result in ACCEPTED else "enroll_refused"
        log.info(event, result=result, tenant=req.tenant, store=req.store, device=req.device, kid=req.kid,
                 token_id=req.token_id)  # fmt: skip
        return Answer(result, enrolled_topic(self._prefix, req.tenant, req.store, req.device),
                      sign_document(doc, self._key, mac_secret=secret))

    # ---------------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        return self._conn

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock.wall_ms() / 1000, dt.UTC)

    def _decide(self, req: EnrollRequest) -> tuple[str, bytes | None]:  # noqa: PLR0911 - one return per spec check
        """(result, the token's secret to MAC the answer with; None for bad-mac)."""
        conn = self._connection()
        now = self._now()
        with conn.transaction():
            row = conn.execute(
                "SELECT secret_sealed, tenant, store, expires_at, used_at, used_by_device, used_by_pub"
                " FROM enrollment_tokens WHERE token_id = %s FOR UPDATE", (req.token_id,)).fetchone()  # fmt: skip
            if row is None:
                return "bad-mac", None
            sealed, tenant, store, expires_at, used_at, used_device, used_pub = row
            try:
                secret = self._token_key.open(req.token_id, bytes(sealed))
            except DbError as exc:
                log.error("enroll_token_unopenable", token_id=req.token_id, error=str(exc)[:200],
                          hint="every worker needs the same token_key as edge-cloud tokens create")  # fmt: skip
                raise EnrollUnavailable(str(exc)) from None
            if not req.verify_mac(secret):
                return "bad-mac", None
            if (tenant, store) != (req.tenant, req.store):
                return "token-scope", secret
            if used_at is not None:
                same = (used_device, bytes(used_pub or b"")) == (req.device, req.pub)
                if same and now - used_at <= self._window and self._active(conn, req):
                    return "repeated", secret
                return "token-used", secret
            if expires_at <= now:
                return "token-expired", secret
            owner = conn.execute("SELECT tenant, store, device FROM devices WHERE kid = %s", (req.kid,)).fetchone()
            if owner is not None and tuple(owner) != (req.tenant, req.store, req.device):
                return "token-scope", secret  # a key belongs to one device (the token stays unused)
            add_device(conn, tenant=req.tenant, store=req.store, device=req.device, public_key=req.pub,
                       enrolled_with=req.token_id)  # a savepoint inside this transaction
            conn.execute("UPDATE enrollment_tokens SET used_at = %s, used_by_device = %s, used_by_pub = %s"
                         " WHERE token_id = %s", (now, req.device, req.pub, req.token_id))  # fmt: skip
        return "accepted", secret

    @staticmethod
    def _active(conn: psycopg.Connection[tuple[Any, ...]], req: EnrollRequest) -> bool:
        row = conn.execute("SELECT 1 FROM devices WHERE kid = %s AND tenant = %s AND store = %s"
                           " AND device = %s AND state = 'active'",
                           (req.kid, req.tenant, req.store, req.device)).fetchone()  # fmt: skip
        return row is not None


_UNPARSEABLE = frozenset({"malformed", "too-large", "unsupported-version", "bad-signature", "topic-mismatch"})
