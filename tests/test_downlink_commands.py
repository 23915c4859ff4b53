"""Signed commands on the device (edge/downlink/commands.py, downlink-v1 §Commands).

What must hold: a command runs at most once, also across a restart (a replay gets `duplicate`);
an expired one never runs, by the synchronized clock or, unsynchronized, by the last synchronized
time plus monotonic time; every authenticated command gets exactly one `cmd-result` in the
spec's JSON shape on `{prefix}/{tenant}/{store}/{device}/cmd-result`; each command of the table
does what it says (keys.rotate shreds the old ephemeral key, cloud keys are persisted, the last
one cannot be retired, log.level reverts).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.clock import FakeClock
from edge.config import Privacy
from edge.downlink.commands import CommandDeps, CommandRunner
from edge.downlink.loglevel import TemporaryLogLevel
from edge.downlink.trust import FileTrustedKeys
from edge.events import Ident
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import Pseudonymizer
from edge.wire.downlink import Document, document, sign_document, verify_document
from edge.wire.uplink import kid_of, public_raw

P = "edge/v1"
CLOUD = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CLOUD_PUB = public_raw(CLOUD.public_key())
KID = kid_of(CLOUD_PUB)
RESULT_TOPIC = "edge/v1/acme/s1/d1/cmd-result"
BOOT = "boot-a"


class Published:
    """The `publish` callable: collects (topic, payload, qos)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int]] = []

    async def __call__(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.messages.append((topic, payload, qos))

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p, _ in self.messages]


def cmd(cid: str, name: str, clock: FakeClock, *, args: Mapping[str, Any] | None = None,
        t: int | None = None, exp_in_s: float = 300) -> Document:
    """A cmd document signed by the cloud and verified as the downlink component does."""
    t = clock.wall_ms() if t is None else t
    doc = document("cmd", "acme", "s1", "d1", KID, t, id=cid, name=name, args=dict(args or {}),
                   exp=t + int(exp_in_s * 1000))
    return verify_document(sign_document(doc, CLOUD), topic="edge/v1/acme/s1/d1/cmd", prefix=P,
                           trusted={KID: CLOUD.public_key()})


def runner(state: Path, clock: FakeClock, pub: Published, deps: CommandDeps | None = None,
           boot: str = BOOT) -> CommandRunner:
    return CommandRunner(state_dir=state, clock=clock, prefix=P, identity=("acme", "s1", "d1"), publish=pub,
                         deps=deps or CommandDeps(), boot=boot)


class Restarts:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


async def test_result_is_the_specs_json_on_the_cmd_result_topic(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()
    r = runner(tmp_path, clock, pub)
    await r.handle(cmd("c-1", "ping", clock))
    assert len(pub.messages) == 1
    topic, payload, qos = pub.messages[0]
    assert (topic, qos) == (RESULT_TOPIC, 1)
    assert json.loads(payload.decode("utf-8")) == {"id": "c-1", "ok": True, "result": {"t": clock.wall}}
    r.close()


async def test_command_delivered_twice_runs_once(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()
    restarts = Restarts()
    r = runner(tmp_path, clock, pub, CommandDeps(restart=restarts))
    doc = cmd("c-restart", "restart", clock)
    await r.handle(doc)
    await r.handle(doc)
    assert restarts.n == 1
    first, second = pub.results()
    assert first == {"id": "c-restart", "ok": True, "result": {"restarting": True}}
    assert second["ok"] is False
    assert second["error"] == "duplicate"
    assert second["id"] == "c-restart"
    r.close()


async def test_a_replay_after_a_restart_is_a_duplicate(tmp_path: Path) -> None:
    clock = FakeClock()
    restarts = Restarts()
    doc = cmd("c-2", "restart", clock)
    r = runner(tmp_path, clock, Published(), CommandDeps(restart=restarts))
    await r.handle(doc)
    r.close()
    pub = Published()
    r2 = runner(tmp_path, clock, pub, CommandDeps(restart=restarts))
    await r2.handle(doc)
    assert restarts.n == 1
    assert pub.results()[0]["error"] == "duplicate"
    r2.close()


async def test_ids_are_forgotten_only_after_exp_by_a_synchronized_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    r = runner(tmp_path, clock, Published())
    await r.handle(cmd("old", "ping", clock, exp_in_s=10))
    clock.advance(20)
    await r.handle(cmd("new", "ping", clock))  # pruning happens with the next command
    assert not r._seen.remembered("old")
    assert r._seen.remembered("new")
    r.close()


async def test_expired_command_does_not_run(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()
    restarts = Restarts()
    r = runner(tmp_path, clock, pub, CommandDeps(restart=restarts))
    doc = cmd("c-exp", "restart", clock, exp_in_s=60)
    clock.advance(61)
    await r.handle(doc)
    assert restarts.n == 0
    assert pub.results() == [{"id": "c-exp", "ok": False, "error": "expired", "detail": "exp has passed"}]
    r.close()


async def test_unsynchronized_clock_uses_last_sync_plus_monotonic(tmp_path: Path) -> None:
    """Synchronized once (the runner records it), then the wall clock is lost (jumps to 1970):
    a command signed 5 min before the estimate runs, one signed 11 min before does not."""
    clock = FakeClock()
    pub = Published()
    r = runner(tmp_path, clock, pub)  # observes the synchronized time at start
    synced_wall = clock.wall
    clock.sync = False
    clock.wall = 5_000  # a Pi without RTC after a clock reset
    clock.mono += 3600  # one hour later by the monotonic clock
    estimate = synced_wall + 3_600_000
    await r.handle(cmd("fresh", "ping", clock, t=estimate - 5 * 60_000, exp_in_s=3600))
    await r.handle(cmd("stale", "ping", clock, t=estimate - 11 * 60_000, exp_in_s=3600))
    fresh, stale = pub.results()
    assert fresh["ok"] is True
    assert stale["ok"] is False
    assert stale["error"] == "expired"
    r.close()


async def test_unsynchronized_without_a_sync_in_this_boot_refuses(tmp_path: Path) -> None:
    """The monotonic clock of another boot means nothing: no estimate, so no command runs."""
    clock = FakeClock()
    runner(tmp_path, clock, Published(), boot="boot-a").close()  # synchronized in boot a
    clock.sync = False
    pub = Published()
    r = runner(tmp_path, clock, pub, boot="boot-b")
    await r.handle(cmd("c-3", "ping", clock))
    (res,) = pub.results()
    assert res["error"] == "expired"
    assert "not synchronized" in res["detail"]
    r.close()


async def test_unknown_command_and_bad_args_and_unavailable(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()
    r = runner(tmp_path, clock, pub, CommandDeps(log_level=TemporaryLogLevel(logging.getLogger("t-bad"))))
    await r.handle(cmd("u", "reboot-now", clock))
    await r.handle(cmd("b", "log.level", clock, args={"level": "chatty", "for": "1m"}))
    await r.handle(cmd("b2", "log.level", clock, args={"level": "debug", "for": "forever"}))
    await r.handle(cmd("f", "keys.rotate", clock))  # no KeyStore passed: not available here
    codes = [(m["id"], m["error"]) for m in pub.results()]
    assert codes == [("u", "unknown-command"), ("b", "bad-args"), ("b2", "bad-args"), ("f", "failed")]
    r.close()


async def test_a_raising_command_is_failed_and_answered_once(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()

    async def broken() -> int:
        raise OSError("disk on fire")

    r = runner(tmp_path, clock, pub, CommandDeps(resend=broken))
    await r.handle(cmd("r", "uplink.resend", clock))
    assert pub.results() == [{"id": "r", "ok": False, "error": "failed", "detail": "OSError: disk on fire"}]
    r.close()


async def test_a_failing_publish_is_counted_not_raised(tmp_path: Path) -> None:
    clock = FakeClock()

    async def down(topic: str, payload: bytes, qos: int = 1) -> None:
        raise ConnectionError("broker gone")

    r = runner(tmp_path, clock, Published())
    r._publish = down
    await r.handle(cmd("p", "ping", clock))
    assert r.status()["unsent"] == 1
    r.close()


async def test_status_and_resend_results(tmp_path: Path) -> None:
    clock = FakeClock()
    pub = Published()

    async def resend() -> int:
        return 3

    deps = CommandDeps(status=lambda: {"device": "d1", "buffer": {"events": 7}}, resend=resend)
    r = runner(tmp_path, clock, pub, deps)
    await r.handle(cmd("s", "status", clock))
    await r.handle(cmd("rs", "uplink.resend", clock))
    assert pub.results() == [
        {"id": "s", "ok": True, "result": {"device": "d1", "buffer": {"events": 7}}},
        {"id": "rs", "ok": True, "result": {"batches": 3}},
    ]
    r.close()


async def test_keys_rotate_shreds_the_old_ephemeral_key(tmp_path: Path) -> None:
    clock = FakeClock()
    keys_dir = tmp_path / "keys"
    keys = KeyStore(keys_dir, clock)
    keys.init()
    privacy = Privacy.model_validate({"classes": {"ble_address": {"policy": "ephemeral", "fallback": "drop"}}})
    pz = Pseudonymizer(privacy, keys, None)
    ident = Ident("ble_address", "D4:21:8B:70:F3:5C")
    before = pz.pseudonym(ident)
    assert before is not None
    assert before.startswith("ble:e1:")
    old_file = keys_dir / "ephemeral-000001.key"
    assert old_file.exists()
    pub = Published()
    r = runner(tmp_path / "state", clock, pub, CommandDeps(keys=keys))
    await r.handle(cmd("rot", "keys.rotate", clock))
    assert pub.results() == [{"id": "rot", "ok": True, "result": {"epoch": 2}}]
    assert not old_file.exists()
    assert sorted(p.name for p in keys_dir.iterdir()) == ["ephemeral-000002.key", "signing.key"]
    after = pz.pseudonym(ident)  # the running pseudonymizer switched at once
    assert after is not None
    assert after.startswith("ble:e2:")
    assert after != before
    # nothing on disk can make the old pseudonym again: a fresh process gets only epoch 2
    fresh = Pseudonymizer(privacy, KeyStore(keys_dir, clock), None, cache_size=0)
    assert fresh.pseudonym(ident) == after
    assert before.encode() not in b"".join(p.read_bytes() for p in keys_dir.iterdir())
    r.close()


async def test_log_level_is_temporary(tmp_path: Path) -> None:
    clock = FakeClock()
    logger = logging.getLogger("t-downlink-loglevel")
    logger.setLevel(logging.WARNING)
    ll = TemporaryLogLevel(logger)
    pub = Published()
    r = runner(tmp_path, clock, pub, CommandDeps(log_level=ll))
    await r.handle(cmd("l1", "log.level", clock, args={"level": "debug", "for": "5s"}))
    await r.handle(cmd("l2", "log.level", clock, args={"level": "info", "for": "150ms"}))
    assert logger.level == logging.INFO
    res = pub.results()
    assert res[0]["result"]["level"] == "debug"
    assert res[1]["result"]["for_s"] == 0.15
    await asyncio.sleep(0.4)
    assert logger.level == logging.WARNING  # back to the level before the first one
    ll.close()
    r.close()


async def test_cloud_keys_add_retire_persist_and_last_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    trust = FileTrustedKeys(tmp_path, [CLOUD_PUB])
    new_pub = public_raw(Ed25519PrivateKey.generate().public_key())
    new_kid = kid_of(new_pub)
    pub = Published()
    r = runner(tmp_path, clock, pub, CommandDeps(trust=trust))
    await r.handle(cmd("a1", "cloud-key.add", clock, args={"pub": new_pub}))
    await r.handle(cmd("a2", "cloud-key.add", clock, args={"pub": b"short"}))
    await r.handle(cmd("r1", "cloud-key.retire", clock, args={"kid": KID}))
    await r.handle(cmd("r2", "cloud-key.retire", clock, args={"kid": "0000000000000000"}))
    res = pub.results()
    assert res[0] == {"id": "a1", "ok": True, "result": {"kid": new_kid, "cloud_kids": sorted([KID, new_kid])}}
    assert res[1]["error"] == "bad-args"
    assert res[2] == {"id": "r1", "ok": True, "result": {"kid": KID, "cloud_kids": [new_kid]}}
    assert res[3]["error"] == "bad-args"
    # after a restart (the YAML still names the provisioned key) the retirement holds
    again = FileTrustedKeys(tmp_path, [CLOUD_PUB])
    assert sorted(again.keys()) == [new_kid]
    assert json.loads((tmp_path / "cloud_keys.json").read_text())["retired"] == [KID]
    assert (tmp_path / "cloud_keys.json").stat().st_mode & 0o077 == 0
    r2 = runner(tmp_path, clock, pub, CommandDeps(trust=again))
    await r2.handle(cmd("r3", "cloud-key.retire", clock, args={"kid": new_kid}))
    last = pub.results()[-1]
    assert last["error"] == "failed"
    assert "last" in last["detail"]
    assert sorted(again.keys()) == [new_kid]
    r.close()
    r2.close()


def test_trust_file_malformed_keeps_the_provisioned_key(tmp_path: Path) -> None:
    (tmp_path / "cloud_keys.json").write_text("{not json")
    trust = FileTrustedKeys(tmp_path, [CLOUD_PUB])
    assert list(trust.keys()) == [KID]


@pytest.mark.parametrize("body", [{"name": "ping"}, {"id": "", "name": "ping"}])
async def test_a_document_without_an_id_gets_no_result(tmp_path: Path, body: dict[str, Any]) -> None:
    clock = FakeClock()
    pub = Published()
    r = runner(tmp_path, clock, pub)
    doc = Document(kind="cmd", tenant="acme", store="s1", device="d1", kid=KID, t=clock.wall,
                   body={**body, "args": {}, "exp": clock.wall + 1000}, raw=b"", digest="00")
    await r.handle(doc)
    assert pub.messages == []
    assert r.status()["malformed"] == 1
    r.close()


async def test_status_is_edge_status_json_without_the_page_token(tmp_path: Path) -> None:
    import yaml

    from edge.downlink.wiring import status_of

    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"tenant": "acme", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(state), "keys_dir": str(state / "keys")},
        "health": {"listen": "0.0.0.0:8080", "token": "a-very-secret-page-token-0123456789"},
    }))
    clock = FakeClock()
    pub = Published()
    r = runner(state, clock, pub, CommandDeps(status=status_of(str(cfg))))
    await r.handle(cmd("st", "status", clock))
    (res,) = pub.results()
    assert res["ok"] is True
    assert res["result"]["device"] == "d1"
    assert res["result"]["page"]["token"] == "[withheld]"  # noqa: S105 - the placeholder
    assert "a-very-secret-page-token" not in pub.messages[0][1].decode()
    r.close()
