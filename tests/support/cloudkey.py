"""One cloud key pair for tests whose uplink needs a trusted cloud key but is about something else.

    from support.cloudkey import CLOUD_PUBLIC_HEX, signed_uplink
    {"uplink": signed_uplink(broker=url, window=4)}      # cloud_public_key set

`CLOUD_KEY` signs acks as the cloud would (`edge.uplink.wire.make_ack(..., key=CLOUD_KEY)`).
Derived from a fixed seed, so it is the same in every process (subprocess daemons included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CLOUD_SEED = bytes(range(32))  # a test key: never use a fixed seed for a real cloud key
CLOUD_KEY = Ed25519PrivateKey.from_private_bytes(CLOUD_SEED)
CLOUD_PUBLIC_HEX = CLOUD_KEY.public_key().public_bytes_raw().hex()


def signed_uplink(**uplink: Any) -> dict[str, Any]:
    """An `uplink:` section with the test cloud key set (and whatever else is given)."""
    return {"cloud_public_key": CLOUD_PUBLIC_HEX, **uplink}


def write_cloud_key(path: Path) -> Path:
    """The private half as a receiver's `cloud_key` file (64 hex, mode 0600)."""
    path.write_text(CLOUD_SEED.hex() + "\n")
    path.chmod(0o600)
    return path
