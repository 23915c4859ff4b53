"""One-time enrollment tokens (downlink-v1 §Enrollment): `{token_id}.{secret}`.

The secret is 32 random bytes, shown once as base32 without padding. The cloud needs it in clear
later (to check the request's HMAC and to MAC its `enrolled` reply), so it cannot keep only a
hash; it keeps it sealed with AES-256-GCM under the *token key*, a 32-byte file held beside the
cloud's signing key and never in the database (`token_id` is the associated data, so a sealed
secret cannot be moved to another token). A stolen database backup enrolls nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloud.cluster.natsconf import check_id
from cloud.db.errors import DbError

SECRET_BYTES = 32
_NONCE = 12


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def decode_secret(text: str) -> bytes:
    """The 32 secret bytes of a token's base32 part (no padding; case-insensitive)."""
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        raw = base64.b32decode(padded)
    except ValueError:
        raise DbError("token secret is not base32") from None
    if len(raw) != SECRET_BYTES:
        raise DbError("token secret is not 32 bytes")
    return raw


@dataclass(slots=True, frozen=True)
class TokenKey:
    """The AES-256-GCM key that seals token secrets at rest."""

    key: bytes

    @classmethod
    def load(cls, path: Path, *, create: bool = False) -> TokenKey:
        """Read the key file (32 raw bytes, mode 0600); `create` makes one when missing."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DbError(f"cannot read the token key {path}: {exc.strerror}",
                          hint="pass --token-key FILE (edge-cloud up makes DIR/token.key)") from None
        if len(raw) != 32:
            raise DbError(f"token key {path} is not 32 bytes")
        if path.stat().st_mode & 0o077:
            raise DbError(f"token key {path} is readable by others", hint=f"chmod 600 {path}")
        return cls(raw)

    def seal(self, token_id: str, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, secret, token_id.encode())

    def open(self, token_id: str, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return AESGCM(self.key).decrypt(sealed[:_NONCE], sealed[_NONCE:], token_id.encode())
        except InvalidTag:
            raise DbError(f"token {token_id}: sealed secret does not open with this token key") from None


@dataclass(slots=True, frozen=True)
class IssuedToken:
    token_id: str
    secret: bytes
    tenant: str
    store: str
    expires_at: dt.datetime

    @property
    def text(self) -> str:
        """What the technician types: `{token_id}.{secret as base32 without padding}`."""
        return f"{self.token_id}.{_b32(self.secret)}"


def create_token(
    conn: psycopg.Connection[tuple[object, ...]], key: TokenKey, *, tenant: str, store: str, ttl: float,
    now: dt.datetime | None = None,
) -> IssuedToken:
    """Insert a new token scoped to (tenant, store), valid for `ttl` seconds from now."""
    check_id("tenant", tenant)
    check_id("store", store)
    if ttl <= 0:
        raise DbError("a token's ttl must be positive")
    created = now or dt.datetime.now(dt.UTC)
    token = IssuedToken(
        token_id=secrets.token_hex(8), secret=secrets.token_bytes(SECRET_BYTES), tenant=tenant, store=store,
        expires_at=created + dt.timedelta(seconds=ttl),
    )
    with conn.transaction():
        conn.execute(
            "INSERT INTO enrollment_tokens (token_id, secret_sealed, tenant, store, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (token.token_id, key.seal(token.token_id, token.secret), tenant, store, created, token.expires_at),
        )
    return token
