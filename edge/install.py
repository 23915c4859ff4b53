"""`edge install --systemd` and `edge uninstall`: put store-edge on a box as a hardened service.

What goes where (with `--root DIR` all of it goes under DIR and nothing else is touched: no
systemctl start, no udev trigger, no user on the real system):

    /etc/sysusers.d/store-edge.conf        user and group store-edge (+ dialout), by systemd-sysusers
    /opt/store-edge/venv                   a virtualenv with store-edge installed by pip (`--from`)
    /opt/store-edge/README.md              the unit's Documentation=
    /etc/store-edge/store.yaml             the config (root:store-edge 0640); never overwritten
    /var/lib/store-edge/keys               device keys (`edge keys init`), owned by store-edge
    /etc/systemd/system/edge.service       the unit, enabled (multi-user.target.wants)
    /etc/udev/rules.d/60-store-edge.rules  NFC readers -> group store-edge; POS adapters' stable names
    /etc/dbus-1/system.d/store-edge-bluez.conf   BlueZ scanning for the service user
    /etc/modprobe.d/store-edge-nfc.conf    keeps the kernel NFC driver off the USB readers

On the live system it then reloads systemd and udev and starts the service. `uninstall`
disables and removes all of the above except the data (config, buffer, keys), which only
`--purge` deletes; the user stays (files may still carry its uid).

The files come from a source checkout (its systemd/ and config/ folders): by default the
one this `edge` runs from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from edge.configbase import ID_PATTERN
from edge.errors import EdgeError

USER = "store-edge"
PREFIX = "/opt/store-edge"
VENV = f"{PREFIX}/venv"
CONFIG_DIR = "/etc/store-edge"
CONFIG = f"{CONFIG_DIR}/store.yaml"
STATE_DIR = "/var/lib/store-edge"
UNIT_NAME = "edge.service"
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
# source file in systemd/ -> installed path
FILES: tuple[tuple[str, str], ...] = (
    ("store-edge.sysusers", "/etc/sysusers.d/store-edge.conf"),
    ("60-store-edge.rules", "/etc/udev/rules.d/60-store-edge.rules"),
    ("store-edge-bluez.conf", "/etc/dbus-1/system.d/store-edge-bluez.conf"),
    ("store-edge-nfc.conf", "/etc/modprobe.d/store-edge-nfc.conf"),
    ("edge.service", UNIT),
)
_ID = re.compile(ID_PATTERN)


class InstallError(EdgeError):
    """The installation cannot go on (not root, a tool missing, bad identity, ...)."""


class IdentityMismatch(InstallError):
    """The existing config names another device than the one asked for (exit 2)."""


@dataclass(slots=True, frozen=True)
class InstallOptions:
    source: Path  # checkout with systemd/ and config/
    spec: str | None = None  # what pip installs (default: `source`)
    no_deps: bool = False
    wheelhouse: Path | None = None  # install offline from this folder of wheels
    config: Path | None = None  # a prepared config to install
    identity: tuple[str, str, str] | None = None  # tenant, store, device for the template
    keep_config: bool = False  # keep an existing config even when its identity differs
    tenant_key: Path | None = None
    cloud_public_key: str | None = None  # 64 hex, set into a config made from the template
    python: str = sys.executable


def default_source() -> Path:
    """The checkout this `edge` runs from (an editable install), if it has systemd/."""
    here = Path(__file__).resolve().parent.parent
    if (here / "systemd" / "edge.service").is_file():
        return here
    raise InstallError(
        "cannot find the store-edge source checkout (systemd/edge.service)",
        hint="pass --source DIR (a git checkout of store-edge)",
    )


def render_config(template: str, tenant: str, store: str, device: str, cloud_public_key: str | None = None) -> str:
    """`template` (config/store.yaml) with its identity block set to the given ids (and the cloud
    key placeholder replaced by `cloud_public_key` when given), comments kept."""
    if cloud_public_key is not None:
        try:
            ok = len(bytes.fromhex(cloud_public_key)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise InstallError("--cloud-public-key is not 64 hex characters",
                               hint="edge-cloud keys create --out FILE prints the public key")
        template = re.sub(r"^(\s+cloud_public_key:\s*)SET-ME\S*", lambda m: m[1] + cloud_public_key,
                          template, count=1, flags=re.M)
    want = {"tenant": tenant, "store": store, "device": device}
    for key, value in want.items():
        if not _ID.match(value):
            raise InstallError(f"{key} {value!r} is not a valid id", hint="1-63 of a-z, 0-9, _ and -")
    out, in_identity, seen = [], False, set()
    for line in template.splitlines(keepends=True):
        if line.startswith("identity:"):
            in_identity = True
        elif line[:1] not in (" ", "#", "\n", ""):
            in_identity = False
        m = re.match(r"^(\s+)(tenant|store|device):(\s*)(\S+)(.*)$", line.rstrip("\n")) if in_identity else None
        if m is not None:
            indent, key, gap, value, rest = m.groups()
            new = want[key]
            if rest.strip():  # keep the comment in its column where the new value allows
                space = len(rest) - len(rest.lstrip()) + len(value) - len(new)
                rest = " " * max(1, space) + rest.lstrip()
            out.append(f"{indent}{key}:{gap}{new}{rest}\n")
            seen.add(key)
            continue
        out.append(line)
    if seen != set(want):
        raise InstallError("the config template has no identity block with tenant, store and device")
    return "".join(out)


def config_identity(text: str) -> tuple[str, str, str] | None:
    """(tenant, store, device) of a config's text, or None when it has no readable identity."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    ident = doc.get("identity") if isinstance(doc, dict) else None
    if not isinstance(ident, dict):
        return None
    values = tuple(str(ident.get(k, "")) for k in ("tenant", "store", "device"))
    return (values[0], values[1], values[2])


def _ids(root: Path, user: str) -> tuple[int, int] | None:
    """uid, gid of `user` from root's /etc/passwd (not the running system's, under --root)."""
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[0] == user:
                return int(parts[2]), int(parts[3])
    except (OSError, ValueError):
        return None
    return None


class Installer:
    """One install or uninstall run. `root` None means the live system."""

    def __init__(self, root: Path | None, *, dry_run: bool = False, out: TextIO | None = None) -> None:
        self.root = root
        self.dry_run = dry_run
        self._out = out if out is not None else sys.stdout
        self.notes: list[str] = []
        self.startable = True  # False when the config cannot start yet (a missing tenant key)

    @property
    def live(self) -> bool:
        return self.root is None

    def at(self, path: str) -> Path:
        """Where an absolute layout path is, under --root if given."""
        return (self.root or Path("/")) / path.lstrip("/")

    def within(self, path: Path) -> Path:
        """A path from the installed config: already under --root (a relative path resolved
        next to the config), or absolute on the target system."""
        if self.root is not None and path.is_relative_to(self.root):
            return path
        return self.at(str(path))

    # -- plumbing ------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(("(dry run) " if self.dry_run else "") + text, file=self._out)

    def run(self, cmd: Sequence[str], *, check: bool = True) -> int:
        self.say("$ " + " ".join(cmd))
        if self.dry_run:
            return 0
        # the installer's own commands (systemctl, systemd-sysusers, pip) with paths it chose
        done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0 and check:
            raise InstallError(f"{cmd[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}")
        return done.returncode

    def tool(self, name: str) -> str:
        found = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name, Path("/bin") / name) if p.exists()),
            None,
        )
        if found is None and self.dry_run:
            return name
        if found is None:
            raise InstallError(f"{name} not found", hint="this installer needs systemd (Debian 12 / Raspberry Pi OS)")
        return found

    def write(self, path: Path, data: bytes, mode: int) -> None:
        self.say(f"write {path} ({mode:04o})")
        if self.dry_run:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".edge-tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(path)

    def chown(
        self, path: Path, ids: tuple[int, int] | None, *, recursive: bool = False, group_only: bool = False
    ) -> None:
        if ids is None or os.geteuid() != 0 or self.dry_run:
            return
        uid = -1 if group_only else ids[0]
        paths = [path, *path.rglob("*")] if recursive else [path]
        for p in paths:
            os.chown(p, uid, ids[1], follow_symlinks=False)

    def root_args(self) -> list[str]:
        return [] if self.root is None else [f"--root={self.root}"]

    # -- install ---------------------------------------------------------------------------
    def install(self, opts: InstallOptions) -> None:
        if self.live and not self.dry_run and os.geteuid() != 0:
            raise InstallError("installing as a system service needs root", hint="sudo edge install --systemd, "
                               "or pass --root DIR to install into a folder")
        if not self.at(CONFIG).exists() and opts.config is None and opts.identity is None:
            raise InstallError(f"no config at {CONFIG}", hint="pass --config FILE, or --tenant, --store and "
                               "--device to start from config/store.yaml")
        self.check_identity(opts)
        systemd_dir = opts.source / "systemd"
        missing = [src for src, _ in FILES if not (systemd_dir / src).is_file()]
        if missing:
            raise InstallError(f"{systemd_dir} lacks {', '.join(missing)}", hint="pass --source DIR")
        if self.root is not None and not self.dry_run:
            (self.root / "etc").mkdir(parents=True, exist_ok=True)
        for src, dst in FILES:
            self.write(self.at(dst), (systemd_dir / src).read_bytes(), 0o644)
        self.run([self.tool("systemd-sysusers"), *self.root_args(), str(self.at(FILES[0][1]))])
        ids = _ids(self.root or Path("/"), USER)
        self._venv(opts)
        readme = opts.source / "README.md"
        if readme.is_file():
            self.write(self.at(f"{PREFIX}/README.md"), readme.read_bytes(), 0o644)
        self._config(opts, ids)
        self._state(opts, ids)
        self._enable()
        self.say("installed. Next:")
        for note in self.notes:
            self.say(f"  - {note}")

    def check_identity(self, opts: InstallOptions) -> None:
        """An existing config is kept, so asking for another identity must not pass silently."""
        conf = self.at(CONFIG)
        if opts.keep_config or not conf.exists():
            return
        wanted = opts.identity
        if wanted is None and opts.config is not None:
            wanted = config_identity(opts.config.read_text(encoding="utf-8", errors="replace"))
        have = config_identity(conf.read_text(encoding="utf-8", errors="replace"))
        if wanted is None or have is None or wanted == have:
            return
        raise IdentityMismatch(
            f"{CONFIG} is for tenant/store/device {'/'.join(have)}, but this install asks for {'/'.join(wanted)}",
            hint=f"edit the identity in {CONFIG} (and register the device key under it), or pass --keep-config "
                 "to keep the existing identity",
        )

    def _venv(self, opts: InstallOptions) -> None:
        venv = self.at(VENV)
        py = venv / "bin" / "python"
        if not py.exists():
            self.run([opts.python, "-m", "venv", str(venv)])
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade"]
        if opts.no_deps:
            pip.append("--no-deps")
        if self.root is not None:
            pip.append("--no-cache-dir")  # pip's cache lives in $HOME, outside the root
        if opts.wheelhouse is not None:
            pip += ["--no-index", "--find-links", str(opts.wheelhouse)]
        self.run([*pip, opts.spec or str(opts.source)])
        if self.root is not None and not self.dry_run:
            relocate_venv(venv, VENV)

    def _config(self, opts: InstallOptions, ids: tuple[int, int] | None) -> None:
        conf_dir, conf = self.at(CONFIG_DIR), self.at(CONFIG)
        if not self.dry_run:
            conf_dir.mkdir(parents=True, exist_ok=True)
            conf_dir.chmod(0o750)
            self.chown(conf_dir, ids, group_only=True)
        if conf.exists():
            self.say(f"keep {conf} (an existing config is never overwritten)")
        elif opts.config is not None:
            self.write(conf, opts.config.read_bytes(), 0o640)
        elif opts.identity is not None:  # install() checked that one of the three is there
            template = (opts.source / "config" / "store.yaml").read_text()
            self.write(conf, render_config(template, *opts.identity, opts.cloud_public_key).encode(), 0o640)
            self.notes.append(f"review {CONFIG}: drivers (POS ports), uplink broker and TLS files")
        self.chown(conf, ids, group_only=True)

    def _state(self, opts: InstallOptions, ids: tuple[int, int] | None) -> None:
        from edge.clock import SystemClock
        from edge.configload import load_config
        from edge.privacy.keys import KeyStore

        state = self.at(STATE_DIR)
        self.say(f"keys in {state}/keys")
        if self.dry_run:
            return
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o750)
        cfg = load_config(self.at(CONFIG), trust=False)
        if cfg.uplink.trust_problems():
            self.startable = False
            self.notes.append(f"set uplink.cloud_public_key in {CONFIG} (the cloud's public key: `edge-cloud keys "
                              "create --out FILE` prints it), or pass --cloud-public-key HEX; the service is not "
                              "started until then")
        keys = KeyStore(self.within(cfg.paths.keys_dir), SystemClock())
        if not keys.exists():
            keys.init()
        if opts.tenant_key is not None:
            keys.provision_tenant_key(opts.tenant_key.read_bytes())
        stable = [c for c, p in cfg.privacy.classes.items() if p.policy == "stable"]
        if stable and keys.tenant_key() is None:
            self.startable = False
            self.notes.append(f"{', '.join(stable)} use policy stable: provision the tenant key "
                              "(edge install --systemd --tenant-key FILE); the service is not started until then")
        self.say(f"device key kid {keys.kid()} public {keys.public_key().hex()}")
        self.notes.append(f"register the device public key with the cloud (kid {keys.kid()})")
        self.chown(state, ids, recursive=True)
        if ids is None and os.geteuid() == 0:
            self.notes.append(f"user {USER} not found: chown -R {USER}: {STATE_DIR}")

    def _enable(self) -> None:
        systemctl = self.tool("systemctl")
        if self.live:
            self.run([systemctl, "daemon-reload"])
            self.run([self.tool("udevadm"), "control", "--reload-rules"], check=False)
            self.run([self.tool("udevadm"), "trigger", "--action=add", "--subsystem-match=usb",
                      "--subsystem-match=tty"], check=False)
            self.run([systemctl, "enable", *(["--now"] if self.startable else []), UNIT_NAME])
            self.notes.append(f"follow it: journalctl -u {UNIT_NAME} -f; edge status --config {CONFIG}")
        else:
            self.run([systemctl, *self.root_args(), "enable", UNIT_NAME])

    # -- uninstall -------------------------------------------------------------------------
    def uninstall(self, *, purge: bool = False) -> None:
        if self.live and not self.dry_run and os.geteuid() != 0:
            raise InstallError("uninstalling a system service needs root", hint="sudo edge uninstall")
        systemctl = self.tool("systemctl")
        if self.live:
            self.run([systemctl, "disable", "--now", UNIT_NAME], check=False)
        elif self.at(UNIT).exists():
            self.run([systemctl, *self.root_args(), "disable", UNIT_NAME], check=False)
        for _, dst in FILES:
            self.remove(self.at(dst))
        self.remove(self.at(PREFIX))
        if purge:
            for path in (CONFIG_DIR, STATE_DIR, "/var/log/store-edge"):
                self.remove(self.at(path))
        else:
            self.say(f"kept {CONFIG_DIR} and {STATE_DIR} (config, buffer, keys); --purge deletes them")
        if self.live:
            self.run([systemctl, "daemon-reload"], check=False)
            self.run([self.tool("udevadm"), "control", "--reload-rules"], check=False)
        self.say(f"uninstalled (user {USER} kept)")

    def remove(self, path: Path) -> None:
        if not path.exists() and not path.is_symlink():
            return
        self.say(f"remove {path}")
        if self.dry_run:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def relocate_venv(venv: Path, final: str) -> None:
    """Rewrite a venv built at `venv` to run from `final` (scripts' #! lines, activate, pyvenv.cfg)."""
    old = str(venv).encode()
    targets = [p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    targets.append(venv / "pyvenv.cfg")
    for p in targets:
        data = p.read_bytes()
        if old in data and b"\0" not in data[:1024]:
            mode = p.stat().st_mode
            p.write_bytes(data.replace(old, final.encode()))
            p.chmod(mode)


def install_main(args: object) -> int:
    """CLI glue for `edge install` (argparse namespace from edge.cli)."""
    a = args.__dict__
    ident = None
    if any(a.get(k) for k in ("tenant", "store", "device")):
        if not all(a.get(k) for k in ("tenant", "store", "device")):
            raise InstallError("give --tenant, --store and --device together")
        ident = (a["tenant"], a["store"], a["device"])
    source = Path(a["source"]) if a.get("source") else default_source()
    opts = InstallOptions(
        source=source,
        spec=a.get("from_spec"),
        no_deps=bool(a.get("no_deps")),
        wheelhouse=Path(a["wheelhouse"]) if a.get("wheelhouse") else None,
        config=Path(a["config"]) if a.get("config") else None,
        identity=ident,
        tenant_key=Path(a["tenant_key"]) if a.get("tenant_key") else None,
        cloud_public_key=a.get("cloud_public_key"),
        python=a.get("python") or sys.executable,
        keep_config=bool(a.get("keep_config")),
    )
    root = Path(a["root"]).absolute() if a.get("root") else None
    try:
        Installer(root, dry_run=bool(a.get("dry_run"))).install(opts)
    except IdentityMismatch as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    return 0


def uninstall_main(args: object) -> int:
    a = args.__dict__
    root = Path(a["root"]).absolute() if a.get("root") else None
    Installer(root, dry_run=bool(a.get("dry_run"))).uninstall(purge=bool(a.get("purge")))
    return 0
