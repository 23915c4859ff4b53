"""Who may read the page: nobody needs a token on loopback; off loopback, the page, its APIs and
/metrics need `health.token`, or the token generated once into the state folder.

The token travels as `Authorization: Bearer <token>` (Prometheus: `authorization.credentials_file`)
or, for a browser, once as `/?token=<token>`: the server answers with an HttpOnly, SameSite=Strict
cookie and a redirect to `/`, so the token leaves the address bar and is not in the history.
`/healthz` stays open (see docs in README): probes need it and it shows only states.
"""

from __future__ import annotations

import hmac
import os
import secrets
import ssl
from pathlib import Path

from edge.config import Health

TOKEN_FILE = "web-token"  # noqa: S105 - a file name inside paths.state_dir (mode 0600)
COOKIE = "edge_token"


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def read_token(state_dir: Path) -> str | None:
    """The generated token, or None when there is none (yet) or it cannot be read."""
    try:
        text = token_path(state_dir).read_text().strip()
    except OSError:
        return None
    return text or None


def load_or_create_token(health: Health, state_dir: Path) -> str:
    """`health.token` when set; else the state folder's token, created (0600) on first use."""
    if health.token:
        return health.token
    existing = read_token(state_dir)
    if existing:
        return existing
    path = token_path(state_dir)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def server_tls(health: Health) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context from `health.tls`, or None; OSError/ssl.SSLError when it cannot load."""
    tls = health.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
