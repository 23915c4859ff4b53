"""The MQTT client id: whose session this is, and one nobody else can guess.

A broker keeps one session per client id and closes the older connection when a second client
connects with the same id. With the device id alone, a box named `edge-01` in one store kicked
the `edge-01` of every other store off a shared broker, and anyone who read the zeroconf advert
(it announces the device id) could do the same on purpose. So the id is

    <tenant>/<store>/<device>/<suffix>

with `suffix` 16 random hex characters made once and kept in `<state_dir>/mqtt-client-suffix`
(mode 0600): stable across restarts (the broker log reads the same), unique per box (a restored
copy of another box's state folder aside), and not announced anywhere.

MQTT 3.1.1 only promises client ids of 1-23 characters of [0-9a-zA-Z]; brokers that enforce it
(some managed brokers do; Mosquitto, NATS, EMQX and HiveMQ do not) refuse the long form. For them
`uplink.client_id: short` sends `e` + the first 22 base-32 characters of SHA-256 over the long
form: 23 characters of [0-9a-z], still unique per box (110 bits).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import string
from pathlib import Path
from typing import Literal

SUFFIX_FILE = "mqtt-client-suffix"
SUFFIX_CHARS = 16
SHORT_LEN = 23
_HEX = frozenset(string.hexdigits.lower())


def client_suffix(state_dir: Path) -> str:
    """The box's random suffix, created on first use (0600, written atomically)."""
    path = Path(state_dir) / SUFFIX_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError):
        text = ""
    if len(text) == SUFFIX_CHARS and set(text) <= _HEX:
        return text
    suffix = secrets.token_hex(SUFFIX_CHARS // 2)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (suffix + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return suffix


def long_client_id(tenant: str, store: str, device: str, suffix: str) -> str:
    return f"{tenant}/{store}/{device}/{suffix}"


def short_client_id(long_id: str) -> str:
    """23 characters of [0-9a-z] derived from the long id (MQTT 3.1.1's guaranteed form)."""
    digest = base64.b32encode(hashlib.sha256(long_id.encode()).digest()).decode().lower()
    return "e" + digest[: SHORT_LEN - 1]


def client_id(
    tenant: str, store: str, device: str, state_dir: Path, form: Literal["full", "short"] = "full"
) -> str:
    """The client id for this box (see the module docstring)."""
    full = long_client_id(tenant, store, device, client_suffix(state_dir))
    return full if form == "full" else short_client_id(full)
