"""Access to the page: config errors for health.token and health.tls, and HTTPS when configured.

- a malformed token is a check-config problem naming `health.token` that never echoes the value;
  a certificate without its key is one too;
- with `health.tls` the endpoint speaks TLS only (a client trusting the CA gets /healthz, plain
  HTTP gets no answer);
- a certificate that cannot be loaded leaves the component failed and the daemon running, with
  nothing served in clear text instead.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import yaml
from support.certs import make_certs
from test_health import get, listen_of, make_cfg, running, wait_until

from edge.clock import SystemClock
from edge.configload import load_config
from edge.errors import ConfigError
from edge.health import Liveness, health_component


def problems(tmp_path: Path, health: dict[str, object]) -> list[str]:
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({"identity": {"tenant": "acme", "store": "s001", "device": "d1"},
                                    "health": health}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_a_malformed_token_is_reported_without_echoing_it(tmp_path: Path) -> None:
    """Too short and with a space: one problem at health.token; the value is not in it."""
    (msg,) = problems(tmp_path, {"token": "sec ret"})
    assert "health.token" in msg
    assert "16-128 characters" in msg
    assert "sec ret" not in msg


def test_a_certificate_without_its_key_is_a_config_error(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, {"tls": {"cert_file": "page.pem"}})
    assert "health.tls" in msg
    assert "cert_file and key_file go together" in msg


async def https_get(port: int, path: str, ca: Path) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_with_tls_the_endpoint_speaks_https_only(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cfg = make_cfg(tmp_path, health={"listen": "127.0.0.1:0", "advertise": False,
                                     "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}})
    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with running(cfg, [health_component(liveness)]) as rt:
        addr = listen_of(rt)
        status, body = await https_get(addr[1], "/healthz", certs.ca)
        assert status == 200
        assert b'"status": "ok"' in body
        status, _ = await https_get(addr[1], "/", certs.ca)
        assert status == 200  # loopback: no token
        assert (await get(addr, "/healthz"))[0] in (0, 400)  # clear text is not served
        assert next(c for c in rt.components if c.name == "health").status()["tls"] is True


async def test_a_certificate_that_cannot_load_fails_the_component_not_the_daemon(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cfg = make_cfg(tmp_path, health={"listen": "127.0.0.1:0", "advertise": False,
                                     "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.client_key)}})
    liveness = Liveness(SystemClock(), cfg.health.stall_timeout)
    async with running(cfg, [health_component(liveness)]) as rt:
        health = next(c for c in rt.components if c.name == "health")
        assert health.status()["state"] == "failed"
        assert health.status()["listen"] is None
        await wait_until(lambda: rt.buffer.last_committed_id > 0)
