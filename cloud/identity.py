"""Identity: which device key may sign batches for which (tenant, store, device).

Design. A key is bound to exactly one identity. The core asks `key_for(topic_ids, kid)`: the
key registered for the identity the batch arrived as (its topic), and only when that key's
kid is the batch's kid. Device A's key on store B's topic, or a kid claiming a real device's
seqs, finds nothing: the batch is refused `unknown-key` and nothing of it is stored. There is
no global kid -> key map to confuse.

`KeysDir` is the file registry of the reference receiver: `keys_dir/<tenant>/<store>/<device>.pub`,
each 64 hex characters (the raw Ed25519 public key); the kid is computed from the key, never
taken from a name. It is the only layout: a folder holding only flat `<device>.pub` files (the
old layout) is refused at start (`edge-cloud keys migrate` moves them). A registry of record
(PostgreSQL, issue 15's device table with revocation) implements the same `DeviceKeys` protocol.

Reload. A miss (unregistered device, or a new key after re-enrollment) reloads the folder, at
most once per `reload_interval` seconds (clock injected), so a flood of unknown kids costs one
directory walk a second, not one per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.clock import Clock
from edge.errors import KeyError_
from edge.uplink.verify import read_public_key
from edge.wire.uplink import ID_RE

log = structlog.get_logger()

Ids = tuple[str, str, str]
KEY_RELOAD_INTERVAL = 1.0  # seconds between reloads triggered by misses


class DeviceKeys(Protocol):
    """The device registry as the ingest core sees it."""

    def key_for(self, ids: Ids, kid: str) -> Ed25519PublicKey | None:
        """The key registered for exactly `ids` when its kid is `kid`; None otherwise (revoked too)."""
        ...


@dataclass(slots=True, frozen=True)
class Registered:
    kid: str
    key: Ed25519PublicKey


def load_keys_dir(keys_dir: Path) -> tuple[dict[Ids, Registered], list[str]]:
    """Every `<tenant>/<store>/<device>.pub` under `keys_dir`, plus one problem line per bad file.

    Raises KeyError_ when the folder itself cannot be listed.
    """
    try:
        files = sorted(keys_dir.glob("*/*/*.pub"))
        flat = sorted(keys_dir.glob("*.pub"))
    except OSError as exc:
        raise KeyError_(
            f"cannot read the device keys folder {keys_dir}: {exc.strerror or exc}",
            hint="create it; put each device's key at <tenant>/<store>/<device>.pub (64 hex chars)",
        ) from None
    if not keys_dir.is_dir():
        raise KeyError_(
            f"the device keys folder {keys_dir} does not exist",
            hint="create it; put each device's key at <tenant>/<store>/<device>.pub (64 hex chars)",
        )
    if flat and not files:
        raise KeyError_(
            f"the device keys folder {keys_dir} has {len(flat)} key(s) in the old flat layout (<device>.pub) "
            "and none at <tenant>/<store>/<device>.pub: the receiver would answer no device",
            hint=f"move them: edge-cloud keys migrate --keys-dir {keys_dir} --tenant TENANT --store STORE "
            "(or by hand to TENANT/STORE/<device>.pub)",
        )
    problems = [f"{f.name}: not used: keys live at <tenant>/<store>/<device>.pub (edge-cloud keys migrate)"
                for f in flat]  # fmt: skip
    keys: dict[Ids, Registered] = {}
    for f in files:
        ids = (f.parent.parent.name, f.parent.name, f.name[: -len(".pub")])
        rel = "/".join(ids) + ".pub"
        if not all(ID_RE.fullmatch(x) for x in ids):
            problems.append(f"{rel}: tenant, store and device must be ids ([a-z0-9][a-z0-9_-]{{0,62}})")
            continue
        try:
            kid, key = read_public_key(f)
        except (OSError, ValueError) as exc:
            problems.append(f"{rel}: {getattr(exc, 'strerror', None) or exc}")
            continue
        keys[ids] = Registered(kid, key)
    return keys, problems


def key_path(keys_dir: Path, ids: Ids) -> Path:
    """Where the key of `ids` is registered."""
    return keys_dir / ids[0] / ids[1] / f"{ids[2]}.pub"


@dataclass(slots=True)
class KeysDir:
    """`DeviceKeys` over a folder (see the module doc). Call `load()` once before use."""

    folder: Path
    clock: Clock
    reload_interval: float = KEY_RELOAD_INTERVAL
    _keys: dict[Ids, Registered] = field(default_factory=dict)
    _loaded_at: float = -1e18
    reloads: int = 0

    def load(self) -> None:
        """(Re)read the folder; raises KeyError_ when it cannot be listed."""
        self._loaded_at = self.clock.monotonic()
        keys, problems = load_keys_dir(self.folder)
        for p in problems:
            log.warning("device_key_ignored", problem=p)
        self._keys = keys
        self.reloads += 1
        log.info("keys_loaded", keys=len(keys), folder=str(self.folder))

    def key_for(self, ids: Ids, kid: str) -> Ed25519PublicKey | None:
        reg = self._keys.get(ids)
        if reg is not None and reg.kid == kid:
            return reg.key
        if self.clock.monotonic() - self._loaded_at < self.reload_interval:
            return None
        try:
            self.load()
        except KeyError_ as exc:
            log.warning("keys_reload_failed", error=str(exc))
            return None
        reg = self._keys.get(ids)
        return reg.key if reg is not None and reg.kid == kid else None


def register_key(keys_dir: Path, ids: Ids, public_hex: str) -> Path:
    """Register a device's public key (64 hex) at keys_dir/<tenant>/<store>/<device>.pub."""
    path = key_path(keys_dir, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(public_hex.strip() + "\n", encoding="ascii")
    return path


def migrate_flat_keys(keys_dir: Path, tenant: str, store: str) -> tuple[list[Path], list[str]]:
    """Move every flat `keys_dir/<device>.pub` to `keys_dir/<tenant>/<store>/<device>.pub`.

    Returns (moved to, problems); a file whose device name is not an id, or whose target exists,
    stays where it is and is reported. ValueError when tenant or store is not an id."""
    for name, v in (("tenant", tenant), ("store", store)):
        if not ID_RE.fullmatch(v):
            raise ValueError(f"{name} {v!r} is not an id ([a-z0-9][a-z0-9_-]{{0,62}})")
    moved: list[Path] = []
    problems: list[str] = []
    for f in sorted(keys_dir.glob("*.pub")):
        device = f.name[: -len(".pub")]
        target = key_path(keys_dir, (tenant, store, device))
        if not ID_RE.fullmatch(device):
            problems.append(f"{f.name}: the device name must be an id ([a-z0-9][a-z0-9_-]{{0,62}}); left in place")
        elif target.exists():
            problems.append(f"{f.name}: {target} already exists; left in place")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            f.rename(target)
            moved.append(target)
    return moved, problems
