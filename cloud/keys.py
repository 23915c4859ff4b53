"""The cloud's Ed25519 key: create it, show its public half, load it for signing acks.

File format: 64 lowercase hex characters and a newline (32 raw bytes are read too), mode 0600.
The public key (64 hex) goes into every device's `uplink.cloud_public_key`; its kid is derived
as uplink-v1 says (first 8 bytes of SHA-256 over the raw public key, hex).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import KeyError_
from edge.wire.uplink import kid_of, public_raw

log = structlog.get_logger()


@dataclass(slots=True, frozen=True)
class PublicInfo:
    public_key: str  # 64 hex chars
    kid: str


def public_info(key: Ed25519PrivateKey) -> PublicInfo:
    raw = public_raw(key.public_key())
    return PublicInfo(public_key=raw.hex(), kid=kid_of(raw))


class KeyExistsError(KeyError_):
    """The key file exists and --force was not given."""


def create_cloud_key(path: Path, *, force: bool = False) -> tuple[Ed25519PrivateKey, PublicInfo]:
    """Write a new key to `path` (mode 0600, created atomically); KeyExistsError unless `force`."""
    if (path.exists() or path.is_symlink()) and not force:
        raise KeyExistsError(f"{path} already exists; it may be the key every device trusts",
                             hint="pass --force to replace it (devices then reject acks until updated)")  # fmt: skip
    key = Ed25519PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key.private_bytes_raw().hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KeyError_(f"cannot write the cloud key {path}: {exc.strerror or exc}") from None
    return key, public_info(key)


def load_cloud_key(path: Path) -> Ed25519PrivateKey:
    """The cloud's private key: 64 hex characters (or 32 raw bytes). Warns when group/others can read it."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyError_(f"cannot read the cloud key {path}: {exc.strerror or exc}",
                        hint="make one with: edge-cloud keys create --out FILE") from None  # fmt: skip
    raw = data
    if len(data) != 32:
        try:
            raw = bytes.fromhex(data.decode("ascii").strip())
        except ValueError:
            raw = b""
    if len(raw) != 32:
        raise KeyError_(f"cloud key {path} is not an Ed25519 private key",
                        hint="expected 64 hex characters (edge-cloud keys create --out FILE makes one)")  # fmt: skip
    if mode & 0o077:
        log.warning("cloud_key_permissions", path=str(path), mode=oct(mode & 0o777), hint="chmod 600")
    return Ed25519PrivateKey.from_private_bytes(raw)
