"""Device key material: the Ed25519 signing key, ephemeral pseudonymization keys, the tenant key.

Layout of `keys_dir` (mode 0700, every file 0600, written atomically):

- `signing.key`: raw 32-byte Ed25519 private key; signs uplink batches.
- `ephemeral-<epoch>.key`: the current pseudonymization key, JSON with the epoch (1, 2, ...),
  its creation time (wall ms and whether the clock was synchronized) and 32 random bytes.
  Rotation writes the next epoch, then overwrites the previous file with zeros and unlinks
  it (crypto-shredding: pseudonyms of the old epoch can no longer be linked to anything).
  Zeroing is best effort on flash storage and journaling file systems; the unlink is what
  the software can promise.
- `tenant.key`: optional, provisioned: 32 raw bytes (or 64 hex characters) shared by the
  stores of one tenant, for stable pseudonyms of consented customers.

A key file that is readable or writable by group or others is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.clock import Clock
from edge.errors import KeyError_

log = structlog.get_logger("edge.privacy.keys")

SIGNING_FILE = "signing.key"
TENANT_FILE = "tenant.key"
_EPHEMERAL_RE = re.compile(r"^ephemeral-(\d{1,12})\.key$")
_MAX_KEY_FILE = 4096
RECHECK_S = 5.0  # how often (monotonic s) a running process looks for a key rotated by another


@dataclass(slots=True, frozen=True)
class EphemeralKey:
    epoch: int
    created_ms: int
    synced: bool  # was the wall clock synchronized when the key was created
    key: bytes

    def __repr__(self) -> str:  # never print key bytes
        return f"EphemeralKey(epoch={self.epoch}, created_ms={self.created_ms}, synced={self.synced})"


def _ephemeral_name(epoch: int) -> str:
    return f"ephemeral-{epoch:06d}.key"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """temp file (0600) + fsync + rename + fsync dir: the file is either old or new, never torn."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _shred(path: Path) -> None:
    """Overwrite with zeros, fsync, unlink, fsync dir. Missing file: nothing to do."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _read_private(path: Path) -> bytes:
    """Read a key file, refusing group/world access (checked on the open fd: no race)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeyError_(
            f"cannot read key file {path}: {exc.strerror}", hint=f"check owner and mode of {path}"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyError_(f"key file {path} is not a regular file", hint=f"remove {path}, re-create keys")
        if st.st_mode & 0o077:
            raise KeyError_(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"chmod 600 {path}",
            )
        return os.read(fd, _MAX_KEY_FILE)
    finally:
        os.close(fd)


def _parse_tenant(data: bytes) -> bytes | None:
    if len(data) == 32:
        return data
    text = data.strip()
    if len(text) == 64:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text.decode("ascii"))
    return None


def _ed25519() -> type[Ed25519PrivateKey]:
    """cryptography's Ed25519 key class, imported when a signing key is first made or loaded:
    its Rust module costs ~7 MiB of RSS that a process which only pseudonymizes never needs."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey


def tenant_kid(key: bytes) -> str:
    """Key id of a tenant key: first 4 bytes of SHA-256 of the key, lowercase hex."""
    return hashlib.sha256(key).digest()[:4].hex()


class KeyStore:
    """All key material of one device. Loads lazily and caches in memory.

    `ephemeral()` is on the per-event hot path: after the first call it is one monotonic
    clock read and one comparison against a precomputed deadline.
    """

    def __init__(self, keys_dir: Path, clock: Clock) -> None:
        self._dir = Path(keys_dir)
        self._clock = clock
        self._lock = threading.Lock()
        self._signing: Ed25519PrivateKey | None = None
        self._eph: EphemeralKey | None = None
        self._eph_value: tuple[int, bytes] = (0, b"")
        self._deadline = float("-inf")  # monotonic time at which the ephemeral key is due
        self._next_check = float("-inf")  # min(deadline, next look for a rotation by another process)
        self._rotation_s = -1.0
        self._tenant: tuple[str, bytes] | None = None
        self._tenant_loaded = False

    @property
    def keys_dir(self) -> Path:
        return self._dir

    # -- directory and signing key ------------------------------------------------------

    def _ensure_dir(self) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self._dir.stat().st_mode) != 0o700:
            os.chmod(self._dir, 0o700)

    def exists(self) -> bool:
        """Whether the device has been initialized (a signing key is present)."""
        return (self._dir / SIGNING_FILE).exists()

    def init(self, force: bool = False) -> None:
        """Create the signing key and the first ephemeral key. Existing keys need `force`.

        With `force`, the old signing key and ephemeral keys are shredded (the device gets a
        new kid to register; old pseudonyms become unlinkable). The tenant key is kept.
        """
        with self._lock:
            self._ensure_dir()
            existing = [p for p in self._ephemeral_files() if p[1].exists()]
            if (self.exists() or existing) and not force:
                raise KeyError_(
                    f"keys already exist in {self._dir}",
                    hint="pass --force to replace them (new kid; old pseudonyms become unlinkable)",
                )
            key = _ed25519().generate()
            _shred(self._dir / SIGNING_FILE)
            _write_atomic(self._dir / SIGNING_FILE, key.private_bytes_raw())
            for _, path in existing:
                _shred(path)
            self._signing = key
            eph = self._create_ephemeral(1 + max((e for e, _ in existing), default=0))
            self._install(eph, self._rotation_s if self._rotation_s > 0 else 86400.0, fresh=True)
        log.info("keys_created", keys_dir=str(self._dir), kid=self.kid(), forced=force)

    def unreadable(self) -> list[str]:
        """Problems with the signing key and the newest ephemeral key file that would stop the
        daemon, read only (nothing is shredded or created): missing, unreadable, unsafe mode or
        wrong size. A corrupt ephemeral key is not one: the daemon replaces it."""
        problems: list[str] = []
        try:
            raw = _read_private(self._dir / SIGNING_FILE)
            if len(raw) != 32:
                problems.append(f"signing key {self._dir / SIGNING_FILE} is {len(raw)} bytes, expected 32 raw "
                                "bytes (hint: restore it from backup or re-create with: edge keys init --force)")
        except FileNotFoundError:
            problems.append(f"no signing key in {self._dir} (hint: create keys with: edge keys init)")
        except KeyError_ as exc:
            problems.append(str(exc))
        files = self._ephemeral_files()
        if files:  # none at all is fine: the daemon creates the first one
            epoch, path = files[-1]
            try:
                self._parse_ephemeral(epoch, path)
            except FileNotFoundError:
                pass  # rotated away meanwhile
            except KeyError_ as exc:
                problems.append(str(exc))
        return problems

    def signing_key(self) -> Ed25519PrivateKey:
        if self._signing is None:
            path = self._dir / SIGNING_FILE
            try:
                raw = _read_private(path)
            except FileNotFoundError:
                raise KeyError_(
                    f"no signing key in {self._dir}", hint="create keys with: edge keys init"
                ) from None
            if len(raw) != 32:
                raise KeyError_(
                    f"signing key {path} is {len(raw)} bytes, expected 32 raw bytes",
                    hint="restore it from backup or re-create with: edge keys init --force",
                )
            self._signing = _ed25519().from_private_bytes(raw)
        return self._signing

    def public_key(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return self.signing_key().public_key().public_bytes_raw()

    def kid(self) -> str:
        """uplink-v1 key id: lowercase hex of the first 8 bytes of SHA-256 over the raw public key."""
        return hashlib.sha256(self.public_key()).digest()[:8].hex()

    # -- ephemeral pseudonymization keys ------------------------------------------------

    def _ephemeral_files(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = _EPHEMERAL_RE.match(name)
            if m:
                found.append((int(m.group(1)), self._dir / name))
        return sorted(found)

    def _create_ephemeral(self, epoch: int) -> EphemeralKey:
        eph = EphemeralKey(
            epoch=epoch,
            created_ms=self._clock.wall_ms(),
            synced=self._clock.synchronized(),
            key=secrets.token_bytes(32),
        )
        doc = {
            "v": 1,
            "epoch": eph.epoch,
            "created_ms": eph.created_ms,
            "synced": eph.synced,
            "key": eph.key.hex(),
        }
        _write_atomic(self._dir / _ephemeral_name(epoch), json.dumps(doc).encode())
        return eph

    def _load_ephemeral(self) -> EphemeralKey | None:
        """The newest valid ephemeral key on disk; older or corrupt ones are shredded."""
        files = self._ephemeral_files()
        best: EphemeralKey | None = None
        for epoch, path in reversed(files):
            if best is None:
                best = self._parse_ephemeral(epoch, path)
                if best is not None:
                    continue
                log.warning("ephemeral_key_corrupt", file=str(path), epoch=epoch)
            _shred(path)  # stale (crash between write and shred) or corrupt
        return best

    @staticmethod
    def _parse_ephemeral(epoch: int, path: Path) -> EphemeralKey | None:
        raw = _read_private(path)
        try:
            doc = json.loads(raw)
            key = bytes.fromhex(doc["key"])
            eph = EphemeralKey(
                epoch=int(doc["epoch"]),
                created_ms=int(doc["created_ms"]),
                synced=bool(doc["synced"]),
                key=key,
            )
        except (ValueError, KeyError, TypeError):
            return None
        if eph.epoch != epoch or len(key) != 32:
            return None
        return eph

    def _install(self, eph: EphemeralKey, rotation_s: float, *, fresh: bool = False) -> None:
        """Cache `eph` and compute the monotonic deadline of its rotation.

        Age comes from the wall clock (it survives restarts), clamped to [0, rotation]: a key
        from the "future" (the clock jumped back) is kept for at most one rotation period
        from now, and a key from the far past rotates once, now. Within a process the
        deadline is monotonic, so wall-clock jumps never cause a rotation loop. A `fresh`
        key gets the full period whatever the wall clock says.
        """
        now = self._clock.monotonic()
        if fresh:
            remaining = rotation_s
        else:
            age_s = (self._clock.wall_ms() - eph.created_ms) / 1000.0
            remaining = min(max(rotation_s - age_s, 0.0), rotation_s)
        self._eph = eph
        self._eph_value = (eph.epoch, eph.key)
        self._rotation_s = rotation_s
        self._deadline = now + remaining
        self._next_check = min(self._deadline, now + RECHECK_S)

    def ephemeral(self, rotation_s: float) -> tuple[int, bytes]:
        """The current (epoch, key), rotating first when the key is older than `rotation_s`.

        Every few seconds (off the hot path) it also notices a rotation done by another
        process (`edge keys rotate` while the daemon runs) and picks up the new key.
        """
        if self._clock.monotonic() < self._next_check and rotation_s == self._rotation_s:
            return self._eph_value
        with self._lock:
            return self._ephemeral_slow(rotation_s)

    def _ephemeral_slow(self, rotation_s: float) -> tuple[int, bytes]:
        if rotation_s <= 0:
            raise ValueError("rotation_s must be > 0")
        eph = self._eph
        if eph is None or not (self._dir / _ephemeral_name(eph.epoch)).exists():
            # first use, or the key file was rotated away by another process
            self._ensure_dir()
            loaded = self._load_ephemeral()
            if loaded is None:
                self._install(self._create_ephemeral(1 + (eph.epoch if eph else 0)), rotation_s, fresh=True)
            else:
                self._install(loaded, rotation_s)
        elif rotation_s != self._rotation_s:
            self._install(eph, rotation_s)
        now = self._clock.monotonic()
        if now >= self._deadline:
            self._rotate_locked(rotation_s, reason="age")
        else:
            self._next_check = min(self._deadline, now + RECHECK_S)
        return self._eph_value

    def _rotate_locked(self, rotation_s: float, reason: str) -> int:
        self._ensure_dir()
        old = self._eph or self._load_ephemeral()
        files = self._ephemeral_files()
        epoch = 1 + max([e for e, _ in files] + [old.epoch if old else 0])
        new = self._create_ephemeral(epoch)
        for e, path in files:
            if e != epoch:
                _shred(path)
        self._install(new, rotation_s, fresh=True)
        log.info("ephemeral_key_rotated", epoch=epoch, reason=reason, clock_synced=new.synced)
        return epoch

    def rotate(self) -> int:
        """Rotate the ephemeral key now; returns the new epoch. The old key file is shredded."""
        with self._lock:
            rotation_s = self._rotation_s if self._rotation_s > 0 else 86400.0
            return self._rotate_locked(rotation_s, reason="manual")

    def current_ephemeral(self) -> EphemeralKey | None:
        """Metadata of the cached ephemeral key (None before first use); for status output."""
        return self._eph

    # -- tenant key ---------------------------------------------------------------------

    def tenant_key(self) -> tuple[str, bytes] | None:
        """(key id, key) of the provisioned tenant key, or None. Read once, then cached."""
        if not self._tenant_loaded:
            path = self._dir / TENANT_FILE
            try:
                raw = _read_private(path)
            except FileNotFoundError:
                self._tenant = None
            else:
                key = _parse_tenant(raw)
                if key is None:
                    raise KeyError_(
                        f"tenant key {path} is neither 32 raw bytes nor 64 hex characters",
                        hint="re-provision it with: edge keys (tenant key import)",
                    )
                self._tenant = (tenant_kid(key), key)
            self._tenant_loaded = True
        return self._tenant

    def provision_tenant_key(self, data: bytes, *, force: bool = False) -> str:
        """Import a tenant key (32 raw bytes or 64 hex chars); returns its key id.

        Replacing a different existing tenant key changes every stable pseudonym (and makes
        the consent list stale), so it needs `force`; importing the same key again is a no-op.
        """
        key = _parse_tenant(data)
        if key is None:
            raise KeyError_("a tenant key is 32 raw bytes or 64 hex characters", hint="check the key file")
        with self._lock:
            self._ensure_dir()
            self._tenant_loaded = False
            current = self.tenant_key()
            if current is not None and current[1] != key and not force:
                raise KeyError_(
                    f"a different tenant key (kid {current[0]}) is already provisioned",
                    hint="pass --force to replace it (all stable pseudonyms change)",
                )
            path = self._dir / TENANT_FILE
            if current is not None and current[1] != key:
                _shred(path)
            _write_atomic(path, key)
            self._tenant = (tenant_kid(key), key)
            self._tenant_loaded = True
        log.info("tenant_key_provisioned", tenant_kid=self._tenant[0])
        return self._tenant[0]
