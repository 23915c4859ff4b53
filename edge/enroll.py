"""`edge enroll --config F --token TOKEN [--timeout 120s]`: register this device, pin the cloud keys.

downlink-v1 §Enrollment from the device's side. The device key is the uplink-v1 signing key
(`edge keys`; created here when missing, as `edge keys init` would). The command connects with
the config's broker, TLS and `uplink.auth` (the store's credentials), subscribes to its own
`enrolled` topic BEFORE it publishes the request on `enroll`, and repeats the request with a
jittered, doubling delay (2 s up to 30 s) until a verified answer arrives or `--timeout` passes;
a broker it cannot reach is retried the same way within the timeout.

An answer counts only when `verify_enrolled` accepts it: `m` verifies with the token's secret
AND the signature verifies with the listed cloud key of that `kid`. So a rogue broker, which
knows no secret, can plant no key; its answers are shown as ignored and the wait goes on. On
`ok` every listed cloud key is pinned in the state folder's cloud_keys.json
(edge/downlink/trust.py), which `edge run` and `edge check-config` then accept in place of
`uplink.cloud_public_key`. A `bad-mac` refusal cannot carry `m` (the cloud has no secret it
shares with us: our secret is wrong or the token unknown), so it is shown as an
unauthenticated refusal: nothing is pinned on it, and the command stops, since waiting longer
would only repeat it.

Exit codes: 0 enrolled (keys pinned), 1 refused or no verified answer in time, 2 bad usage or
configuration (ConfigError is edge/cli.py's).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.downlink.trust import FileTrustedKeys, TrustError
from edge.errors import EdgeError
from edge.privacy.keys import KeyStore
from edge.uplink.clientid import client_suffix, long_client_id, short_client_id
from edge.uplink.connect import ConnectParams, connect_params, explain_connect_error
from edge.uplink.inbound import cap_inbound
from edge.wire.downlink import (
    MAX_DOCUMENT,
    Document,
    DocumentError,
    build_enroll_request,
    enroll_topic,
    enrolled_topic,
    parse_token,
    peek_refusal,
    verify_enrolled,
)

MAX_INBOUND = 64 * 1024  # an `enrolled` answer is a few hundred bytes
FIRST_REPEAT = 2.0  # s before the request is sent again, doubling
MAX_REPEAT = 30.0
HINTS = {
    "token-used": "the token was already used (by another device or key); ask for a new one: "
                  "edge-cloud tokens create --tenant T --store S",
    "token-expired": "the token has expired; ask for a new one: edge-cloud tokens create --tenant T --store S",
    "token-scope": "the token is for another tenant/store than identity.tenant/identity.store in the config, "
                   "or this device's key is registered for another identity",
    "bad-mac": "the token's secret does not match or the token does not exist: check it was typed exactly "
               "as printed",
}  # fmt: skip


@dataclass(slots=True)
class Wait:
    """What the wait for an answer saw."""

    doc: Document | None = None  # the verified answer
    refusal: str | None = None  # an unauthenticated bad-mac refusal
    ignored: list[str] = field(default_factory=list)  # reasons of answers that did not verify
    sent: int = 0
    connect_error: str | None = None


async def wait_for_answer(cfg: Config, params: ConnectParams, keys: KeyStore, *, token_id: str, secret: bytes,
                          within: float, clock: Clock, err: TextIO,
                          rng: random.Random | None = None) -> Wait:  # fmt: skip
    """Subscribe, request, repeat, until a verified (or bad-mac) answer or `within` seconds passed
    (see the module doc)."""
    rng = rng or random.Random()
    ident, u = cfg.identity, cfg.uplink
    ids = (ident.tenant, ident.store, ident.device)
    full = long_client_id(*ids, client_suffix(cfg.paths.state_dir) + "-enroll")  # not the daemon's session
    cid = full if u.client_id == "full" else short_client_id(full)
    v5 = u.protocol == "5"  # `auto` means 3.1.1 here: every broker speaks it (NATS speaks only it)
    w = Wait()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 1.0
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(deadline - loop.time()):
                await _session(cfg, params, keys, cid, v5, token_id=token_id, secret=secret, clock=clock,
                               err=err, rng=rng, w=w)  # fmt: skip
        except TimeoutError:
            break
        except (aiomqtt.MqttError, OSError) as exc:
            why = explain_connect_error(exc, url=params.url)
            if why != w.connect_error:  # once per distinct cause, not per attempt
                print(f"edge enroll: {why}; retrying", file=err)
            w.connect_error = why
        else:
            return w
        await asyncio.sleep(max(0.0, min(rng.uniform(delay / 2, delay), deadline - loop.time())))
        delay = min(MAX_REPEAT, delay * 2)
    return w


async def _session(cfg: Config, params: ConnectParams, keys: KeyStore, cid: str, v5: bool, *, token_id: str,
                   secret: bytes, clock: Clock, err: TextIO, rng: random.Random, w: Wait) -> None:  # fmt: skip
    ident, prefix = cfg.identity, cfg.uplink.prefix
    ids = (ident.tenant, ident.store, ident.device)
    props: Properties | None = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
        props.MaximumPacketSize = MAX_INBOUND
    client = params.client(identifier=cid, clean_session=None if v5 else True, properties=props,
                           protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
                           max_queued_incoming_messages=64)  # fmt: skip
    if not v5:
        cap_inbound(client, MAX_INBOUND)
    reply = enrolled_topic(prefix, *ids)
    trusted = FileTrustedKeys(cfg.paths.state_dir, _provisioned(cfg)).keys()
    async with client:
        await client.subscribe(reply, qos=1)  # before the request: the answer cannot slip past

        async def request() -> None:
            wait = FIRST_REPEAT
            while True:
                payload = build_enroll_request(tenant=ids[0], store=ids[1], device=ids[2], token_id=token_id,
                                               secret=secret, key=keys.signing_key(), t=clock.wall_ms())  # fmt: skip
                await client.publish(enroll_topic(prefix, *ids), payload, qos=1)
                w.sent += 1
                await asyncio.sleep(rng.uniform(wait * 0.8, wait))
                wait = min(MAX_REPEAT, wait * 2)

        sender = asyncio.create_task(request(), name="enroll:request")
        try:
            async for msg in client.messages:
                payload = msg.payload if isinstance(msg.payload, bytes) else b""
                if _judge(payload[: MAX_DOCUMENT + 1], str(msg.topic), prefix, secret, trusted, err, w):
                    return
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await sender


def _judge(payload: bytes, topic: str, prefix: str, secret: bytes,  # noqa: PLR0917 - one answer's context
           trusted: Mapping[str, Ed25519PublicKey], err: TextIO, w: Wait) -> bool:  # fmt: skip
    """True when the wait is over (a verified answer, or a bad-mac refusal)."""
    try:
        w.doc = verify_enrolled(payload, topic=topic, prefix=prefix, secret=secret, trusted=trusted)
    except DocumentError as exc:
        refusal = peek_refusal(payload, topic=topic, prefix=prefix) if exc.reason == "bad-mac" else None
        if refusal == "bad-mac":
            w.refusal = refusal
            return True
        w.ignored.append(exc.reason)
        print(f"edge enroll: ignored an answer that does not verify ({exc.reason}); nothing pinned from it",
              file=err)
        return False
    return True


def _provisioned(cfg: Config) -> list[bytes]:
    key = cfg.uplink.cloud_public_key
    return [bytes.fromhex(key)] if key else []


def pin(cfg: Config, doc: Document) -> tuple[list[str], str]:
    """Trust every cloud key the verified answer lists; (their kids, the file written)."""
    trust = FileTrustedKeys(cfg.paths.state_dir, _provisioned(cfg))
    kids = [trust.add(bytes(pub)) for pub in doc.body["cloud_keys"]]
    return kids, str(trust.path)


def enroll_main(config_path: str, token: str, timeout_text: str, *, out: TextIO | None = None,
                err: TextIO | None = None) -> int:  # fmt: skip
    """The command (see the module doc); ConfigError propagates to edge/cli.py (exit 2)."""
    from edge.configload import load_config
    from edge.units import parse_duration

    out, err = out or sys.stdout, err or sys.stderr
    cfg = load_config(config_path, trust=False)  # a device being enrolled has no cloud key yet
    try:
        token_id, secret = parse_token(token)
    except ValueError as exc:
        print(f"edge enroll: --token: {exc}", file=err)
        return 2
    try:
        timeout = parse_duration(timeout_text)
    except ValueError as exc:
        print(f"edge enroll: --timeout {timeout_text!r}: {exc}", file=err)
        return 2
    if timeout <= 0:
        print("edge enroll: --timeout must be positive", file=err)
        return 2
    if not cfg.uplink.enabled:
        print(f"edge enroll: uplink.enabled is false in {config_path}: there is no broker to enroll through",
              file=err)
        return 2
    clock = SystemClock()
    try:
        params = _params(cfg)
        cfg.paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = KeyStore(cfg.paths.keys_dir, clock)
        if not keys.exists():
            keys.init()
            print(f"created device keys in {cfg.paths.keys_dir}; kid {keys.kid()}", file=out)
        keys.signing_key()
    except (EdgeError, OSError) as exc:
        print(f"edge enroll: {exc}", file=err)
        return 2
    ident = cfg.identity
    who = f"{ident.tenant}/{ident.store}/{ident.device}"
    print(f"enrolling {who} (device key kid {keys.kid()}, token {token_id}) via {params.url}", file=out)
    w = asyncio.run(wait_for_answer(cfg, params, keys, token_id=token_id, secret=secret, within=timeout,
                                    clock=clock, err=err))  # fmt: skip
    return _report(cfg, w, f"{who}", f"--config {config_path}", timeout_text, out=out, err=err)


def _report(cfg: Config, w: Wait, who: str, config_arg: str, timeout_text: str, *, out: TextIO,
            err: TextIO) -> int:  # fmt: skip
    if w.refusal is not None:
        print(f"edge enroll: refused: {w.refusal} (an unauthenticated answer; nothing pinned): "
              f"{HINTS['bad-mac']}", file=err)  # fmt: skip
        return 1
    if w.doc is None:
        why = f"; last connection problem: {w.connect_error}" if w.connect_error else ""
        print(f"edge enroll: no verified answer within {timeout_text} ({w.sent} request(s) sent, "
              f"{len(w.ignored)} answer(s) ignored){why}", file=err)  # fmt: skip
        print("hint: a worker with token_key must be running (edge-cloud ingest); check uplink.broker and "
              "uplink.auth", file=err)  # fmt: skip
        return 1
    body = w.doc.body
    if not body["ok"]:
        code = str(body.get("err", "?"))[:32]
        print(f"edge enroll: refused: {code}: {HINTS.get(code, 'see docs/cloud.md, Enrolling a store')}", file=err)
        return 1
    try:
        kids, path = pin(cfg, w.doc)
    except (TrustError, OSError) as exc:
        print(f"edge enroll: enrolled, but the cloud keys cannot be pinned: {exc}", file=err)
        return 1
    print(f"enrolled {who}; pinned cloud key(s) {', '.join(kids)} in {path}", file=out)
    print(f"next: edge check-config {config_arg}, then start the service (edge run {config_arg})", file=out)
    return 0


def _params(cfg: Config) -> ConnectParams:
    if cfg.uplink.broker == "auto":
        from edge.uplink.discovery import discover_broker

        d = cfg.uplink.discovery
        url = asyncio.run(discover_broker(d.interfaces, d.timeout, allow_plain=d.allow_plain))
        return connect_params(cfg.uplink, url=url)
    return connect_params(cfg.uplink)
