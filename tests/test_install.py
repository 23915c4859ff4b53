"""`edge install --systemd --root DIR` and `edge uninstall`, into a throwaway root.

The real `edge` command runs as a subprocess; the tools it calls are real too (python -m venv,
pip, systemd-sysusers --root, systemctl --root). store-edge goes into the venv from a wheel
built from this checkout, without its dependencies (no network needed for the install
itself). What must hold:

- user store-edge (+ dialout), venv under /opt/store-edge whose scripts run from
  /opt/store-edge/venv once the tree is in place, config under /etc/store-edge made from
  config/store.yaml with the given identity (root:store-edge 0640), keys owned by the service
  user, unit enabled, udev rules, D-Bus policy, modprobe and sysusers files in place;
- nothing outside DIR is touched; a second install keeps the config and the keys;
- `--dry-run` on the live system only prints the plan (incl. starting the service);
- uninstall removes the service but keeps config, buffer and keys unless --purge.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.cloudkey import CLOUD_PUBLIC_HEX

from edge.configload import load_config
from edge.install import InstallError, render_config

ROOT = Path(__file__).resolve().parent.parent
EDGE = str(Path(sys.executable).parent / "edge")
INSTALLED = {
    "etc/systemd/system/edge.service": "edge.service",
    "etc/udev/rules.d/60-store-edge.rules": "60-store-edge.rules",
    "etc/dbus-1/system.d/store-edge-bluez.conf": "store-edge-bluez.conf",
    "etc/modprobe.d/store-edge-nfc.conf": "store-edge-nfc.conf",
    "etc/sysusers.d/store-edge.conf": "store-edge.sysusers",
}
# paths an install without --root would create on this machine: none may appear
LIVE = ("/etc/systemd/system/edge.service", "/opt/store-edge", "/etc/store-edge", "/var/lib/store-edge",
        "/etc/udev/rules.d/60-store-edge.rules", "/etc/sysusers.d/store-edge.conf")


def edge(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """store-edge as a wheel, built from a copy of this checkout (the checkout stays clean)."""
    if shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None:
        pytest.skip("systemd-sysusers / systemctl not installed (apt-get install systemd)")
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    src.mkdir()
    for name in ("edge", "drivers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = d / "dist"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here (no package index for setuptools?): {done.stderr[-300:]}")
    return next(out.glob("store_edge-*.whl"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> tuple[Path, str]:
    """A throwaway root with store-edge installed; (root, the install's stdout)."""
    before = {p: os.path.lexists(p) for p in LIVE}
    root = tmp_path_factory.mktemp("root")
    res = edge("install", "--systemd", "--root", str(root), "--from", str(wheel), "--no-deps",
               "--tenant", "acme", "--store", "s042", "--device", "edge-07", "--cloud-public-key", CLOUD_PUBLIC_HEX)
    assert res.returncode == 0, res.stderr + res.stdout
    assert {p: os.path.lexists(p) for p in LIVE} == before, "install --root touched the real system"
    return root, res.stdout


def _passwd(root: Path, name: str) -> list[str]:
    return next(ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith(name + ":"))


def _group(root: Path, name: str) -> list[str]:
    return next(ln.split(":") for ln in (root / "etc/group").read_text().splitlines() if ln.startswith(name + ":"))


def test_service_user_has_only_the_groups_it_needs(installed: tuple[Path, str]) -> None:
    """A system user without a shell, home = state dir; member of dialout only (plus its own group)."""
    root, _ = installed
    user = _passwd(root, "store-edge")
    assert int(user[2]) < 1000
    assert user[5:] == ["/var/lib/store-edge", "/usr/sbin/nologin"]
    assert _group(root, "store-edge")[2] == user[3]
    assert "store-edge" in _group(root, "dialout")[3].split(",")
    others = [ln.split(":")[0] for ln in (root / "etc/group").read_text().splitlines()
              if "store-edge" in ln.split(":")[3].split(",")]
    assert others == ["dialout"]


def test_unit_and_device_files_are_installed_and_the_unit_enabled(installed: tuple[Path, str]) -> None:
    """Each file is the shipped one, mode 0644; edge.service is wanted by multi-user.target."""
    root, _ = installed
    for dst, src in INSTALLED.items():
        path = root / dst
        assert path.read_bytes() == (ROOT / "systemd" / src).read_bytes(), dst
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, dst
    wants = root / "etc/systemd/system/multi-user.target.wants/edge.service"
    assert wants.is_symlink()
    assert os.readlink(wants) == "/etc/systemd/system/edge.service"
    assert (root / "opt/store-edge/README.md").is_file()


def test_venv_under_opt_runs_from_its_final_place(installed: tuple[Path, str]) -> None:
    """Scripts say #!/opt/store-edge/venv/bin/python (not the build root); the venv's python
    imports store-edge from the venv itself."""
    root, _ = installed
    venv = root / "opt/store-edge/venv"
    assert (venv / "bin/edge").read_text().splitlines()[0] == "#!/opt/store-edge/venv/bin/python"
    assert str(root) not in (venv / "bin/activate").read_text()
    done = subprocess.run([str(venv / "bin/python"), "-I", "-c", "import edge; print(edge.__file__)"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(venv / "lib"))


def test_config_comes_from_the_template_with_the_identity_and_keys_belong_to_the_service(
    installed: tuple[Path, str],
) -> None:
    """/etc/store-edge/store.yaml: valid, identity set, comments kept, root:store-edge 0640.
    Keys in /var/lib/store-edge/keys, owned by store-edge, 0700/0600; the kid is printed."""
    root, out = installed
    conf = root / "etc/store-edge/store.yaml"
    cfg = load_config(conf)
    assert (cfg.identity.tenant, cfg.identity.store, cfg.identity.device) == ("acme", "s042", "edge-07")
    assert "# the store" in conf.read_text()
    st = conf.stat()
    gid = int(_group(root, "store-edge")[2])
    assert stat.S_IMODE(st.st_mode) == 0o640
    keys = root / "var/lib/store-edge/keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    if os.geteuid() == 0:
        uid = int(_passwd(root, "store-edge")[2])
        assert (st.st_uid, st.st_gid) == (0, gid)
        assert ((keys / "signing.key").stat().st_uid, keys.stat().st_gid) == (uid, gid)
    assert "kid " in out
    assert "tenant key" in out  # store.yaml uses a stable policy: the operator is told what is missing


def test_installing_again_keeps_config_and_keys(installed: tuple[Path, str], wheel: Path) -> None:
    """A re-install (an upgrade) never overwrites the config or the device keys."""
    root, _ = installed
    conf = root / "etc/store-edge/store.yaml"
    key = root / "var/lib/store-edge/keys/signing.key"
    conf_before, key_before = conf.read_bytes(), key.read_bytes()
    res = edge("install", "--systemd", "--root", str(root), "--from", str(wheel), "--no-deps")
    assert res.returncode == 0, res.stderr
    assert "keep " in res.stdout
    assert (conf.read_bytes(), key.read_bytes()) == (conf_before, key_before)


def test_dry_run_on_the_live_system_prints_the_plan_and_touches_nothing(wheel: Path) -> None:
    """Without --root, --dry-run shows the live steps (sysusers, daemon-reload, enable --now,
    udev reload) and creates nothing."""
    before = {p: os.path.lexists(p) for p in LIVE}
    res = edge("install", "--systemd", "--dry-run", "--from", str(wheel),
               "--tenant", "acme", "--store", "s042", "--device", "edge-07")
    assert res.returncode == 0, res.stderr
    plan = res.stdout
    assert "systemd-sysusers /etc/sysusers.d/store-edge.conf" in plan
    assert "systemctl daemon-reload" in plan
    assert "systemctl enable --now edge.service" in plan
    assert "udevadm control --reload-rules" in plan
    assert {p: os.path.lexists(p) for p in LIVE} == before


def test_uninstall_keeps_the_data_and_purge_removes_it(tmp_path: Path, installed: tuple[Path, str]) -> None:
    """uninstall: unit disabled and gone, venv and device files gone, config and keys kept;
    uninstall --purge: config and state gone too. The user stays."""
    root = tmp_path / "root"
    shutil.copytree(installed[0], root, symlinks=True)
    res = edge("uninstall", "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert not (root / "etc/systemd/system/multi-user.target.wants/edge.service").is_symlink()
    for dst in INSTALLED:
        assert not (root / dst).exists(), dst
    assert not (root / "opt/store-edge").exists()
    assert (root / "etc/store-edge/store.yaml").is_file()
    assert (root / "var/lib/store-edge/keys/signing.key").is_file()
    res = edge("uninstall", "--root", str(root), "--purge")
    assert res.returncode == 0, res.stderr
    assert not (root / "etc/store-edge").exists()
    assert not (root / "var/lib/store-edge").exists()
    assert _passwd(root, "store-edge")[0] == "store-edge"


def test_install_needs_an_identity_or_a_config(tmp_path: Path, wheel: Path) -> None:
    """Neither --config nor --tenant/--store/--device for a fresh root: exit 1 with a hint."""
    res = edge("install", "--systemd", "--root", str(tmp_path / "r"), "--from", str(wheel), "--no-deps")
    assert res.returncode == 1
    assert "--tenant" in res.stderr


def test_the_template_keeps_its_cloud_key_placeholder_unless_a_key_is_given() -> None:
    """Without --cloud-public-key the installed config still has the placeholder (check-config
    refuses it, the service is not started); with it, the key replaces the placeholder."""
    template = (ROOT / "config/store.yaml").read_text()
    assert "cloud_public_key: SET-ME" in render_config(template, "acme", "s042", "edge-07")
    rendered = render_config(template, "acme", "s042", "edge-07", CLOUD_PUBLIC_HEX)
    assert f"cloud_public_key: {CLOUD_PUBLIC_HEX}" in rendered
    assert "SET-ME" not in rendered
    with pytest.raises(InstallError, match="64 hex"):
        render_config(template, "acme", "s042", "edge-07", "abc")


def test_the_identity_must_be_valid_ids() -> None:
    """render_config refuses an id the spec does not allow (it would fail at start otherwise)."""
    template = (ROOT / "config/store.yaml").read_text()
    with pytest.raises(InstallError, match="store"):
        render_config(template, "acme", "Berlin Mitte", "edge-07")


def _existing_config(root: Path) -> Path:
    conf = root / "etc/store-edge/store.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(render_config((ROOT / "config/store.yaml").read_text(), "acme", "s042", "edge-07"))
    return conf


def test_another_identity_than_the_existing_configs_is_refused_with_exit_2(tmp_path: Path) -> None:
    """An existing config is kept, so --store/--device naming another device must not pass silently:
    exit 2 naming both identities, before anything is installed."""
    root = tmp_path / "root"
    conf = _existing_config(root)
    before = conf.read_bytes()
    res = edge("install", "--systemd", "--root", str(root), "--source", str(ROOT), "--no-deps",
               "--tenant", "acme", "--store", "s043", "--device", "edge-01", timeout=60)
    assert res.returncode == 2, res.stderr
    assert "acme/s042/edge-07" in res.stderr
    assert "acme/s043/edge-01" in res.stderr
    assert "--keep-config" in res.stderr
    assert conf.read_bytes() == before
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc", "etc/store-edge", "etc/store-edge/store.yaml"]


def test_a_prepared_config_with_another_identity_is_refused_too(tmp_path: Path) -> None:
    """--config FILE for another device than the kept config's: the same refusal."""
    from edge.install import IdentityMismatch, Installer, InstallOptions

    root = tmp_path / "root"
    _existing_config(root)
    other = tmp_path / "other.yaml"
    other.write_text(render_config((ROOT / "config/store.yaml").read_text(), "acme", "s042", "edge-08"))
    with pytest.raises(IdentityMismatch, match=r"edge-07.*edge-08"):
        Installer(root).install(InstallOptions(source=ROOT, config=other))


def test_keep_config_or_the_same_identity_pass_the_identity_check(tmp_path: Path) -> None:
    """The same identity again (an upgrade), or --keep-config, are not refused."""
    from edge.install import Installer, InstallOptions

    root = tmp_path / "root"
    _existing_config(root)
    inst = Installer(root)
    inst.check_identity(InstallOptions(source=ROOT, identity=("acme", "s042", "edge-07")))
    inst.check_identity(InstallOptions(source=ROOT, identity=("acme", "s043", "edge-01"), keep_config=True))
