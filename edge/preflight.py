"""Start-up checks that need no network, shared by `edge check-config` and `edge run`.

One list of checks, so what check-config passes `edge run` does not refuse at start-up:
the state folder exists (or can be created) and is writable; the device keys are present
and readable; a tenant key exists when a class uses the `stable` policy; the uplink's TLS
files exist and are readable; each POS link on the `serial` backend names a port that
exists. Each problem is one line naming the config key, e.g.
`store.yaml: paths.keys_dir: no device keys in /var/lib/store-edge/keys (hint: ...)`.

Nothing here writes: check-config may run as another user, on another box, or while the
daemon runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.errors import KeyError_
from edge.privacy.keys import KeyStore


def startup_problems(cfg: Config, config_path: str | Path, clock: Clock | None = None) -> list[str]:
    """Every problem found, one line each as `<config path>: <key>: <message>`; [] when ready to run."""
    found = _state_dir(cfg.paths.state_dir)
    found += _keys(cfg, clock or SystemClock(), str(config_path))
    found += _tls(cfg)
    found += _serial_ports(cfg)
    return [f"{config_path}: {key}: {msg}" for key, msg in found]


def state_dir_problems(cfg: Config, config_path: str | Path) -> list[str]:
    """Only the state folder's check: `edge run` needs it before it can take the lock there."""
    return [f"{config_path}: {key}: {msg}" for key, msg in _state_dir(cfg.paths.state_dir)]


def _state_dir(path: Path) -> list[tuple[str, str]]:
    key = "paths.state_dir"
    if path.exists():
        if not path.is_dir():
            return [(key, f"{path} is not a folder")]
        if not os.access(path, os.W_OK | os.X_OK):
            return [(key, f"{path} is not writable by this user (uid {os.geteuid()})")]
        return []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [(key, f"{path} does not exist and cannot be created: {parent} is not writable")]
    return []


def _keys(cfg: Config, clock: Clock, config_path: str) -> list[tuple[str, str]]:
    keys = KeyStore(cfg.paths.keys_dir, clock)
    out: list[tuple[str, str]] = []
    if not keys.exists():
        out.append(("paths.keys_dir", f"no device keys in {cfg.paths.keys_dir} "
                                      f"(hint: create them once with: edge keys init --config {config_path})"))
    else:
        out += [("paths.keys_dir", msg) for msg in keys.unreadable()]
    stable = [c for c, cp in cfg.privacy.classes.items() if cp.policy == "stable"]
    if stable:
        try:
            tenant = keys.tenant_key()
        except KeyError_ as exc:
            out.append(("paths.keys_dir", str(exc)))
        else:
            if tenant is None:
                out += [(f"privacy.classes.{c}.policy",
                         f"'stable' needs a tenant key in {cfg.paths.keys_dir}/tenant.key, which is missing "
                         "(hint: provision it with edge install --tenant-key FILE, or use policy: ephemeral)")
                        for c in stable]
    consent = cfg.privacy.consent_file
    if consent is not None and consent.exists() and not os.access(consent, os.R_OK):
        out.append(("privacy.consent_file", f"{consent} is not readable by this user"))
    return out


def _tls(cfg: Config) -> list[tuple[str, str]]:
    up = cfg.uplink
    out: list[tuple[str, str]] = []
    if up.enabled and up.auth.password_file is not None:
        problem = _readable_file(up.auth.password_file)
        if problem:
            out.append(("uplink.auth.password_file", problem))
    if not up.enabled or up.broker.startswith("mqtt://"):  # plain MQTT does not use them
        return out
    for name in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(up.tls, name)
        if path is None:
            continue
        problem = _readable_file(path)
        if problem:
            out.append((f"uplink.tls.{name}", problem))
    return out


def _readable_file(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return f"{path} does not exist"
    except IsADirectoryError:
        return f"{path} is a folder, expected a file"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    return None


def _serial_ports(cfg: Config) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, link in enumerate(cfg.drivers.pos):
        if link.backend != "serial":
            continue
        key = f"drivers.pos[{i}].port"
        if not link.port:
            out.append((key, f"pos link {link.name!r} uses backend serial but names no port"))
        elif "://" not in link.port and not os.path.exists(link.port):  # pyserial URLs (loop://) excepted
            out.append((key, f"serial port {link.port} of pos link {link.name!r} does not exist "
                             "(hint: is the adapter plugged in? ls /dev/serial/by-id/)"))
    return out
