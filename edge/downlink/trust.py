"""Trusted cloud keys: which Ed25519 keys may sign downlink documents (downlink-v1 §Signed document).

`cloud_keys.json` in the state folder (0600, written atomically) holds the keys added at run time
(`cloud-key.add`, enrollment) and the ids retired (`cloud-key.retire`):

    {"v": 1, "keys": ["<64 hex>", ...], "retired": ["<kid>", ...]}

The trusted set is the provisioned keys (`uplink.cloud_public_key`) plus the file's keys, minus the
retired kids, so retiring the provisioned key survives a restart even though the YAML still names
it, and adding a retired key again trusts it again. Retiring the last trusted key is refused: a
device with no cloud key could never be told anything again. An unreadable or malformed file is
logged and counts as "no added keys, nothing retired" (the provisioned key still works), and the
next change rewrites it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.errors import EdgeError
from edge.wire.uplink import kid_of

log = structlog.get_logger("edge.downlink.trust")

TRUST_FILE = "cloud_keys.json"
_MAX_FILE = 256 * 1024
MAX_KEYS = 64  # trusted cloud keys at most (a rotation needs two or three)


class TrustError(EdgeError):
    """A trust change that is refused (the last key, an unknown kid, a bad key)."""


class TrustedKeys(Protocol):
    """The cloud keys a device trusts, by kid."""

    def keys(self) -> Mapping[str, Ed25519PublicKey]: ...

    def add(self, pub: bytes) -> str:
        """Trust the 32-byte raw public key `pub`; returns its kid."""
        ...

    def retire(self, kid: str) -> None:
        """Stop trusting `kid`; TrustError when it is unknown or the last one."""
        ...


def pinned_kids(state_dir: Path) -> list[str]:
    """Kids of the keys `cloud_keys.json` adds (enrollment, cloud-key.add), minus the retired ones:
    whether a device without `uplink.cloud_public_key` has a cloud key to verify acks with."""
    return FileTrustedKeys(state_dir).kids()


def _parse_pub(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise TrustError("a cloud key is 32 raw bytes (Ed25519 public key)")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise TrustError("not an Ed25519 public key") from exc


class FileTrustedKeys:
    """TrustedKeys persisted in `state_dir/cloud_keys.json`, seeded with the provisioned keys."""

    def __init__(self, state_dir: Path, provisioned: Iterable[bytes] = ()) -> None:
        self._path = Path(state_dir) / TRUST_FILE
        self._seed = {kid_of(p): p for p in provisioned}
        self._added: dict[str, bytes] = {}
        self._retired: set[str] = set()
        self._load()
        self._keys = self._compute()

    @property
    def path(self) -> Path:
        return self._path

    def keys(self) -> Mapping[str, Ed25519PublicKey]:
        return self._keys

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def add(self, pub: bytes) -> str:
        _parse_pub(pub)
        kid = kid_of(pub)
        if kid not in self._keys and len(self._keys) >= MAX_KEYS:
            raise TrustError(f"already {MAX_KEYS} trusted cloud keys; retire one first")
        self._added[kid] = bytes(pub)
        self._retired.discard(kid)
        self._save()
        self._keys = self._compute()
        log.info("cloud_key_added", kid=kid, trusted=len(self._keys))
        return kid

    def retire(self, kid: str) -> None:
        if kid not in self._keys:
            raise TrustError("not a trusted cloud key id")
        if len(self._keys) <= 1:
            raise TrustError("refused: the last trusted cloud key cannot be retired")
        self._added.pop(kid, None)
        if kid in self._seed:
            self._retired.add(kid)
        self._save()
        self._keys = self._compute()
        log.info("cloud_key_retired", kid=kid, trusted=len(self._keys))

    def _compute(self) -> dict[str, Ed25519PublicKey]:
        merged = {**self._seed, **self._added}
        return {k: Ed25519PublicKey.from_public_bytes(v) for k, v in sorted(merged.items()) if k not in self._retired}

    def _load(self) -> None:
        try:
            with open(self._path, "rb") as fh:
                data = fh.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cloud_keys_unreadable", file=str(self._path), error=exc.strerror)
            return
        try:
            doc = json.loads(data[:_MAX_FILE])  # a longer file is cut, so it does not parse
            keys = [bytes.fromhex(h) for h in doc["keys"]]
            for raw in keys:
                _parse_pub(raw)
            retired = {str(k) for k in doc.get("retired", [])}
        except (ValueError, TypeError, KeyError, TrustError) as exc:
            log.error("cloud_keys_malformed", file=str(self._path), error=type(exc).__name__,
                      effect="only the provisioned cloud key is trusted until the next change")
            return
        self._added = {kid_of(k): k for k in keys[:MAX_KEYS]}
        self._retired = retired

    def _save(self) -> None:
        doc = {"v": 1, "keys": [k.hex() for _, k in sorted(self._added.items())], "retired": sorted(self._retired)}
        write_atomic(self._path, json.dumps(doc, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """temp file (0600) + fsync + rename + fsync of the folder: old or new, never torn."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
