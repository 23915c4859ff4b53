"""Enrollment pieces without peers (end to end: tests/test_cloud_enroll.py).

What must hold: a token is `{token_id}.{32-byte base32 secret}` and a bad one is refused without
echoing the secret; only a refusal without `m` is peeked at, and only for its `err`; the
per-store limiter allows a burst, then its rate; a pinned cloud key stands in for
uplink.cloud_public_key in check-config and in the uplink's own check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.enroll import RateLimiter
from edge.clock import FakeClock
from edge.config import Uplink
from edge.configload import load_config
from edge.errors import ConfigError
from edge.wire.downlink import document, parse_token, peek_refusal, sign_document
from edge.wire.uplink import kid_of, pack, public_raw

SECRET = bytes(range(32))
TEXT = "0123456789abcdef." + base64.b32encode(SECRET).decode().rstrip("=")
TOPIC = "edge/v1/t/s/d/enrolled"
KEY = Ed25519PrivateKey.generate()
PUB = public_raw(KEY.public_key())


def test_a_token_parses_into_its_id_and_secret() -> None:
    assert parse_token(TEXT) == ("0123456789abcdef", SECRET)
    assert parse_token(f"  {TEXT.lower()}\n") == ("0123456789abcdef", SECRET)  # base32 is case-insensitive


@pytest.mark.parametrize("text", ["", "0123456789abcdef", "SHORT.AAAA", "0123456789abcdef.AAAA",
                                  "0123456789abcdef.!!!!" + TEXT[17:]])  # fmt: skip
def test_a_bad_token_is_refused_without_echoing_its_secret(text: str) -> None:
    with pytest.raises(ValueError, match=r"token_id|base32|bytes") as exc:
        parse_token(text)
    secret_part = text.partition(".")[2]
    assert not secret_part or secret_part not in str(exc.value)


def _doc(**fields: object) -> dict[str, object]:
    return document("enrolled", "t", "s", "d", kid_of(PUB), 1, cloud_keys=[PUB], **fields)


def test_only_a_refusal_without_m_is_peeked_at() -> None:
    assert peek_refusal(sign_document(_doc(ok=False, err="bad-mac"), KEY), topic=TOPIC, prefix="edge/v1") == "bad-mac"
    macd = sign_document(_doc(ok=False, err="token-used"), KEY, mac_secret=SECRET)
    assert peek_refusal(macd, topic=TOPIC, prefix="edge/v1") is None  # has m: verify_enrolled's to judge
    assert peek_refusal(sign_document(_doc(ok=True), KEY), topic=TOPIC, prefix="edge/v1") is None
    other = sign_document(_doc(ok=False, err="bad-mac"), KEY)
    assert peek_refusal(other, topic="edge/v1/t/s/other/enrolled", prefix="edge/v1") is None
    assert peek_refusal(b"\xc1", topic=TOPIC, prefix="edge/v1") is None
    d = pack(_doc(ok=False, err="bad-mac"))
    forged_m = pack({"v": 1, "d": d, "s": bytes(64), "m": hmac.new(b"x", d, hashlib.sha256).digest()})
    assert peek_refusal(forged_m, topic=TOPIC, prefix="edge/v1") is None


def test_the_limiter_allows_a_burst_per_store_then_its_rate() -> None:
    clock = FakeClock()
    lim = RateLimiter(clock, rate=0.5, burst=3, max_keys=2)
    assert [lim.allow(("t", "a")) for _ in range(4)] == [True, True, True, False]
    assert lim.allow(("t", "b"))  # another store has its own bucket
    clock.advance(2.0)
    assert lim.allow(("t", "a"))
    assert not lim.allow(("t", "a"))
    assert lim.allow(("t", "c"))  # a third store fits: full buckets are forgotten first
    assert len(lim._buckets) <= 2


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "store.yaml"
    path.write_text("identity:\n  tenant: t\n  store: s\n  device: d\npaths:\n  state_dir: state\n  keys_dir: keys\n")
    return path


def test_a_pinned_cloud_key_stands_in_for_cloud_public_key(tmp_path: Path) -> None:
    conf = _config(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_config(conf)
    assert any("uplink.cloud_public_key" in p and "or run edge enroll" in p for p in exc.value.problems)
    (tmp_path / "state").mkdir()
    trust = tmp_path / "state" / "cloud_keys.json"
    trust.write_text(json.dumps({"v": 1, "keys": [PUB.hex()], "retired": []}))
    assert load_config(conf).uplink.cloud_public_key is None
    trust.write_text(json.dumps({"v": 1, "keys": [PUB.hex()], "retired": [kid_of(PUB)]}))
    with pytest.raises(ConfigError):
        load_config(conf)  # a retired pinned key is no key
    assert Uplink().trust_problems(pinned=True) == []
    assert [k for k, _ in Uplink().trust_problems()] == ["uplink.cloud_public_key"]
