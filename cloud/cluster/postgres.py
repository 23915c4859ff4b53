"""A local PostgreSQL cluster in a folder: initdb on first use, start and stop with pg_ctl.

initdb and postgres refuse to run as root. Started as root, every server command runs as an
unprivileged OS user (`postgres` when the Debian package created it, else `nobody`) through
runuser, and the folder is handed to that user; its parent folders must let that user through
(checked up front, with a hint, instead of a permission error from deep inside initdb).

The server listens on 127.0.0.1 only, on the port given, without a Unix socket (paths of test
folders are too long for one), with scram-sha-256 passwords for every connection. Settings we
own live in `edge-cloud.conf` beside postgresql.conf, rewritten at every start.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from cloud.cluster.binaries import find_pg_bindir
from cloud.cluster.errors import ClusterError
from cloud.cluster.procs import HOST, tail

START_TIMEOUT = 60
_OWN_CONF = "edge-cloud.conf"


def default_os_user() -> str | None:
    """None when not root (the server runs as us), else an unprivileged user that exists."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ClusterError("running as root and neither user 'postgres' nor 'nobody' exists",
                       hint="create an unprivileged system user (useradd --system edge-cloud) and pass it")


class LocalPostgres:
    """One PostgreSQL cluster in `dir` (data in `dir/data`, log in `dir/postgres.log`)."""

    def __init__(
        self,
        dir: Path,
        *,
        port: int,
        password: str,
        role: str = "edge",
        database: str = "edge",
        host: str = HOST,
        os_user: str | None = None,
        bindir: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.dir = dir
        self.port = port
        self.password = password
        self.role = role
        self.database = database
        self.host = host
        self.os_user = os_user if os_user is not None else default_os_user()
        self.bindir = bindir or find_pg_bindir()
        self.settings = settings or {}

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.role}:{self.password}@{self.host}:{self.port}/{self.database}"

    def admin_dsn(self) -> str:
        return f"postgresql://{self.role}:{self.password}@{self.host}:{self.port}/postgres"

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    # -- running commands as the server's user ------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.os_user is not None:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ClusterError(f"{args[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
                               f"\n{tail(self.log_path)}", hint=f"see {self.log_path}")
        return proc

    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if self.os_user is None:
            return
        entry = pwd.getpwnam(self.os_user)
        for path in (self.dir, *self.dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        probe = subprocess.run(["runuser", "-u", self.os_user, "--", "test", "-w", str(self.dir)],
                               capture_output=True, check=False)
        if probe.returncode != 0:
            raise ClusterError(f"PostgreSQL runs as {self.os_user!r}, who cannot reach {self.dir}",
                               hint="put the folder where that user can traverse every parent (e.g. under "
                               "/var/lib or /tmp), or run as an unprivileged user")

    # -- lifecycle ------------------------------------------------------------------------------

    def init(self, *, sync: bool = True) -> bool:
        """initdb when the folder holds no cluster yet; True when it created one."""
        self._prepare_dir()
        if self.initialized:
            return False
        pwfile = self.dir / "initdb.pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._prepare_dir()  # hands the password file to the server's user too
        try:
            args = ["initdb", "-D", str(self.data_dir), "-U", self.role, f"--pwfile={pwfile}",
                    "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]
            if not sync:
                args.append("--no-sync")  # tests: a crash of the machine may lose the fresh cluster
            self._run(*args)
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude_if_exists = '{_OWN_CONF}'\n")
        return True

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "password_encryption": "'scram-sha-256'",
            "max_connections": "100",
            "shared_buffers": "'128MB'",
            **self.settings,
        }
        path = self.data_dir / _OWN_CONF
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def running(self) -> bool:
        if not self.initialized:
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self, timeout: int = START_TIMEOUT) -> None:
        """Start (initdb first when needed) and create the database; nothing to do when running."""
        self.init()
        if not self.running():
            self._write_settings()
            self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                      "-t", str(timeout), timeout=timeout + 10)
        self._ensure_database(timeout)

    def _ensure_database(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.admin_dsn(), autocommit=True, connect_timeout=5) as conn:
                    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone():
                        return
                    conn.execute(f'CREATE DATABASE "{self.database}"')  # name checked by the caller
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(f"PostgreSQL on port {self.port} does not accept connections: {exc}",
                                       hint=f"see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (open transactions roll back). Idempotent."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60")
