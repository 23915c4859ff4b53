"""edge.uplink.discovery: finding the broker by mDNS, against real zeroconf announcements.

mDNS is multicast. To keep every packet on this machine, the announcing and the browsing run in a
private network namespace (`unshare -n`, or `unshare -rn` without root) whose only interface is a
loopback with multicast switched on. Where namespaces are not allowed these tests skip (with the
reason); interface resolution is tested in the normal namespace, where it sends nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.netns import namespace_prefix

from edge.uplink.discovery import BrokerNotFoundError, DiscoveryError, interface_addresses

REPO = Path(__file__).resolve().parents[1]

# Runs inside the namespace: announce brokers with zeroconf, discover them, print the results as JSON.
SCENARIOS = r"""
import asyncio, json, socket, time
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
from edge.uplink.discovery import discover_broker

def service(kind, name, port):
    return ServiceInfo(f"{kind}._tcp.local.", f"{name}.{kind}._tcp.local.", port=port,
                       addresses=[socket.inet_aton("127.0.0.1")], server=f"{name}.local.")

async def attempt(interfaces, timeout, **options):
    started = time.monotonic()
    try:
        result = {"url": await discover_broker(interfaces, timeout, **options)}
    except Exception as exc:
        result = {"error": type(exc).__name__, "message": str(exc),
                  "timeout_error": isinstance(exc, TimeoutError)}
    result["seconds"] = round(time.monotonic() - started, 2)
    return result

async def main():
    out = {"nothing": await attempt(["lo"], 0.5)}
    announcer = AsyncZeroconf(interfaces=["127.0.0.1"])
    plain, secure = service("_mqtt", "plainbroker", 18830), service("_secure-mqtt", "tlsbroker", 18883)
    await (await announcer.async_register_service(plain))
    out["plain_refused"] = await attempt(["lo"], 1)
    out["plain_only"] = await attempt(["lo"], 5, allow_plain=True)
    await (await announcer.async_register_service(secure))
    out["both"] = await attempt(["127.0.0.1"], 5, allow_plain=True)
    out["secure_default"] = await attempt(["lo"], 5)
    out["both_plain_first"] = await attempt([], 5, secure_first=False, allow_plain=True)
    await announcer.async_unregister_all_services()
    await announcer.async_close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def discovered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Results of the scenarios above, run once in a private network namespace."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a private network namespace (unshare -n / -rn); mDNS is not "
                    "tested here rather than multicast on a real network")
    script = tmp_path_factory.mktemp("discovery") / "scenarios.py"
    script.write_text(SCENARIOS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, "-W", "error", str(script)],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    results: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def test_a_plain_advert_is_ignored_unless_allow_plain(discovered: dict[str, dict[str, Any]]) -> None:
    """Only _mqtt._tcp announced and allow_plain off (the default): no broker is found (a rogue
    plain broker on the LAN is never used), and the message says why."""
    refused = discovered["plain_refused"]
    assert refused["error"] == "BrokerNotFoundError"
    assert "allow_plain" in refused["message"]


def test_by_default_only_the_secure_advert_is_taken(discovered: dict[str, dict[str, Any]]) -> None:
    """Both announced, defaults: mqtts://<announced host name>:<port>."""
    assert discovered["secure_default"]["url"] == "mqtts://tlsbroker.local:18883"


def test_plain_broker_is_found_by_address(discovered: dict[str, dict[str, Any]]) -> None:
    """Only _mqtt._tcp announced, allow_plain: mqtt://<IPv4>:<port>, after the preference grace, not the timeout."""
    assert discovered["plain_only"]["url"] == "mqtt://127.0.0.1:18830"
    assert discovered["plain_only"]["seconds"] < 3


def test_secure_broker_wins_and_is_named_for_the_tls_hostname_check(
    discovered: dict[str, dict[str, Any]],
) -> None:
    """Both announced, secure_first: mqtts://<announced host name>:<port> (the certificate's name)."""
    assert discovered["both"]["url"] == "mqtts://tlsbroker.local:18883"
    assert discovered["both"]["seconds"] < 3


def test_plain_broker_wins_when_secure_is_not_preferred(discovered: dict[str, dict[str, Any]]) -> None:
    """Both announced, secure_first=False, all interfaces: the plain broker."""
    assert discovered["both_plain_first"]["url"] == "mqtt://127.0.0.1:18830"


def test_nothing_announced_raises_broker_not_found_after_the_timeout(
    discovered: dict[str, dict[str, Any]],
) -> None:
    """No announcement: BrokerNotFoundError (a TimeoutError) after ~timeout, naming the service type(s)."""
    nothing = discovered["nothing"]
    assert nothing["error"] == "BrokerNotFoundError"
    assert nothing["timeout_error"]
    assert "_secure-mqtt._tcp.local." in nothing["message"]
    assert "_mqtt._tcp.local." in nothing["message"]
    assert "hint:" in nothing["message"]
    assert 0.4 <= nothing["seconds"] < 2.5


# -- interface resolution (no traffic) ----------------------------------------------------------------


def test_interface_names_resolve_to_their_ipv4_addresses() -> None:
    """`lo` becomes 127.0.0.1; literal IPv4 addresses pass through; repeats collapse."""
    assert interface_addresses(["lo"]) == ["127.0.0.1"]
    assert interface_addresses(["127.0.0.1", "lo"]) == ["127.0.0.1"]
    assert interface_addresses([]) == []


def test_unknown_interface_names_the_interfaces_that_exist() -> None:
    """A typo in uplink.discovery.interfaces fails with the list of real interface names."""
    with pytest.raises(DiscoveryError) as info:
        interface_addresses(["eht0"])
    assert "eht0" in str(info.value)
    assert info.value.hint is not None
    assert "lo" in info.value.hint
    assert not isinstance(info.value, BrokerNotFoundError)


def test_ipv6_addresses_are_refused_with_a_reason() -> None:
    """Discovery is IPv4 only; an IPv6 literal is a configuration error, not silently ignored."""
    with pytest.raises(DiscoveryError, match="IPv4"):
        interface_addresses(["::1"])
