"""A real Mosquitto broker for tests. It lives in `hil.peers.mosquitto` (the HIL rig uses it too);
this module re-exports it, with `certs` typed as the tests' `CertPaths`.

    with Mosquitto(tmp_path) as broker:            # plain listener only
        ... aiomqtt.Client(broker.host, broker.port) ...
    with Mosquitto(tmp_path, tls=make_certs(tmp_path / "pki")) as broker:
        ... broker.tls_url ...                      # needs a client certificate signed by certs.ca
"""

from __future__ import annotations

from pathlib import Path

from hil.peers import mosquitto as _peer
from hil.peers.mosquitto import HOST, START_TIMEOUT, STOP_TIMEOUT, MosquittoError, find_mosquitto, free_port

from .certs import CertPaths

__all__ = ["HOST", "START_TIMEOUT", "STOP_TIMEOUT", "Mosquitto", "MosquittoError", "find_mosquitto", "free_port"]


class Mosquitto(_peer.Mosquitto):
    """`hil.peers.mosquitto.Mosquitto` whose `certs` are the tests' `CertPaths` (client certs too)."""

    certs: CertPaths | None

    def __init__(
        self,
        workdir: Path,
        *,
        tls: CertPaths | None = None,
        allow_anonymous: bool = True,
        binary: Path | None = None,
    ) -> None:
        super().__init__(workdir, tls=tls, allow_anonymous=allow_anonymous, binary=binary)
