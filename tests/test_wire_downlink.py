"""downlink-v1 on the wire (edge/wire/downlink.py), checked against the spec's own constants.

What must hold: a document verifies only with a trusted key for its kid, on its own topic, with
the kind's rules; every other input (forged, foreign, oversized, garbage) raises DocumentError
with a reason and nothing else; enrollment requests prove the device key and the token secret;
an `enrolled` answer is trusted only with its `m`; shards, merge and hash follow the spec's text.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.wire.downlink import (
    Document,
    DocumentError,
    build_enroll_request,
    consent_shard,
    consent_topic,
    desired_topic,
    device_filters,
    document,
    effective_hash,
    merge_layers,
    parse_down_topic,
    parse_enroll_request,
    sign_document,
    unsettable_paths,
    verify_document,
    verify_enrolled,
)
from edge.wire.uplink import kid_of, public_raw

P = "edge/v1"
CLOUD = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CLOUD_PUB = public_raw(CLOUD.public_key())
KID = kid_of(CLOUD_PUB)
TRUSTED = {KID: CLOUD.public_key()}


def _desired(ver: int = 1, **over: object) -> bytes:
    doc = document("desired", "acme", "s1", "_all", KID, 1_700_000_000_000, layer="store", ver=ver,
                   config={"logging": {"level": "debug"}})
    doc.update(over)
    return sign_document(doc, CLOUD)


def test_constants_are_the_specs() -> None:
    from edge.wire import downlink as w

    assert w.DOC_CONTEXT == b"edge-downlink-v1\n"
    assert w.ENROLL_MAC_CONTEXT == b"edge-enroll-v1\n"
    assert w.ENROLL_SIG_CONTEXT == b"edge-enroll-sig-v1\n"
    assert w.ENROLLED_MAC_CONTEXT == b"edge-enrolled-v1\n"
    assert w.MAX_DOCUMENT == 4 * 1024 * 1024


def test_a_signed_document_is_three_keys_with_a_signature_over_the_prefixed_d() -> None:
    env = msgpack.unpackb(_desired(), raw=False)
    assert set(env) == {"v", "d", "s"}
    assert env["v"] == 1
    CLOUD.public_key().verify(env["s"], b"edge-downlink-v1\n" + env["d"])
    doc = verify_document(_desired(), topic="edge/v1/acme/s1/_all/desired", prefix=P, trusted=TRUSTED)
    assert isinstance(doc, Document)
    assert (doc.kind, doc.ver, doc.tenant, doc.store, doc.device) == (
        "desired", 1, "acme", "s1", "_all")
    assert doc.digest == hashlib.sha256(env["d"]).hexdigest()


@pytest.mark.parametrize(("payload", "topic", "reason"), [
    (b"", "edge/v1/acme/s1/_all/desired", "empty"),
    (b"\xc1garbage", "edge/v1/acme/s1/_all/desired", "malformed"),
    (b"x" * (4 * 1024 * 1024 + 1), "edge/v1/acme/s1/_all/desired", "too-large"),
    (_desired(), "edge/v1/acme/s2/_all/desired", "topic-mismatch"),  # another store's layer
    (_desired(), "edge/v1/other/s1/_all/desired", "topic-mismatch"),
    (_desired(), "edge/v1/acme/s1/d1/desired", "topic-mismatch"),  # a store doc on a device topic
    (_desired(kid="0011223344556677"), "edge/v1/acme/s1/_all/desired", "untrusted-kid"),
    (_desired(layer="device"), "edge/v1/acme/s1/_all/desired", "invalid"),
    (_desired(ver=0), "edge/v1/acme/s1/_all/desired", "invalid"),
    (_desired(config=[1]), "edge/v1/acme/s1/_all/desired", "invalid"),
])
def test_rejections_name_their_reason(payload: bytes, topic: str, reason: str) -> None:
    with pytest.raises(DocumentError) as err:
        verify_document(payload, topic=topic, prefix=P, trusted=TRUSTED)
    assert err.value.reason == reason


def test_a_signature_by_another_key_under_the_trusted_kid_is_refused() -> None:
    rogue = Ed25519PrivateKey.generate()
    doc = document("desired", "acme", "s1", "_all", KID, 1, layer="store", ver=9, config={})
    with pytest.raises(DocumentError) as err:
        verify_document(sign_document(doc, rogue), topic="edge/v1/acme/s1/_all/desired", prefix=P, trusted=TRUSTED)
    assert err.value.reason == "bad-signature"


def test_a_tampered_d_is_refused() -> None:
    env = msgpack.unpackb(_desired(), raw=False)
    env["d"] = env["d"].replace(b"debug", b"error")
    with pytest.raises(DocumentError) as err:
        verify_document(msgpack.packb(env, use_bin_type=True), topic="edge/v1/acme/s1/_all/desired",
                        prefix=P, trusted=TRUSTED)
    assert err.value.reason == "bad-signature"


def test_consent_shard_rules() -> None:
    p = "pseudo-1"
    shard = hashlib.sha256(p.encode()).digest()[0:1].hex()
    assert consent_shard(p) == shard
    topic = consent_topic(P, "acme", shard)
    assert topic == f"edge/v1/acme/_all/_all/consent/{shard}"
    good = sign_document(document("consent", "acme", "_all", "_all", KID, 1, shard=shard, rev=3, consented=[p]), CLOUD)
    assert verify_document(good, topic=topic, prefix=P, trusted=TRUSTED).rev == 3
    other = next(f"x{i}" for i in range(1000) if consent_shard(f"x{i}") != shard)
    for consented in ([p, p], [other], ["b", "a"]):
        bad = sign_document(document("consent", "acme", "_all", "_all", KID, 1, shard=shard, rev=4,
                                     consented=consented), CLOUD)
        with pytest.raises(DocumentError) as err:
            verify_document(bad, topic=topic, prefix=P, trusted=TRUSTED)
        assert err.value.reason == "invalid"


def test_cmd_rules() -> None:
    topic = "edge/v1/acme/s1/d1/cmd"
    ok = sign_document(document("cmd", "acme", "s1", "d1", KID, 5, id="c-1", name="ping", args={}, exp=9), CLOUD)
    assert verify_document(ok, topic=topic, prefix=P, trusted=TRUSTED).body["name"] == "ping"
    long_id = sign_document(document("cmd", "acme", "s1", "d1", KID, 5, id="x" * 65, name="ping", args={}, exp=9),
                            CLOUD)
    with pytest.raises(DocumentError):
        verify_document(long_id, topic=topic, prefix=P, trusted=TRUSTED)


def test_enrollment_request_and_answer() -> None:
    device = Ed25519PrivateKey.generate()
    secret = bytes(32)
    topic = "edge/v1/acme/s1/d1/enroll"
    raw = build_enroll_request(tenant="acme", store="s1", device="d1", token_id="tok",  # noqa: S106 - a test token id
                               secret=secret, key=device,
                               t=1234)
    req = msgpack.unpackb(raw, raw=False)
    msg = msgpack.packb(["acme", "s1", "d1", "tok", public_raw(device.public_key()), 1234], use_bin_type=True)
    assert req["mac"] == hmac.new(secret, b"edge-enroll-v1\n" + msg, hashlib.sha256).digest()
    device.public_key().verify(req["s"], b"edge-enroll-sig-v1\n" + msg)
    parsed = parse_enroll_request(raw, topic=topic, prefix=P)
    assert parsed.verify_mac(secret)
    assert not parsed.verify_mac(b"\x01" * 32)
    with pytest.raises(DocumentError) as err:  # the same request replayed for another device
        parse_enroll_request(raw, topic="edge/v1/acme/s1/d2/enroll", prefix=P)
    assert err.value.reason == "bad-signature"

    etopic = "edge/v1/acme/s1/d1/enrolled"
    answer = sign_document(document("enrolled", "acme", "s1", "d1", KID, 1, ok=True, cloud_keys=[CLOUD_PUB]), CLOUD,
                           mac_secret=secret)
    env = msgpack.unpackb(answer, raw=False)
    assert env["m"] == hmac.new(secret, b"edge-enrolled-v1\n" + env["d"], hashlib.sha256).digest()
    assert verify_enrolled(answer, topic=etopic, prefix=P, secret=secret).body["cloud_keys"] == [CLOUD_PUB]
    rogue = Ed25519PrivateKey.generate()
    planted = sign_document(document("enrolled", "acme", "s1", "d1", kid_of(public_raw(rogue.public_key())), 1,
                                     ok=True, cloud_keys=[public_raw(rogue.public_key())]), rogue,
                            mac_secret=b"\x07" * 32)  # a rogue broker does not know the secret
    with pytest.raises(DocumentError) as err:
        verify_enrolled(planted, topic=etopic, prefix=P, secret=secret)
    assert err.value.reason == "bad-mac"


def test_topics() -> None:
    assert desired_topic(P, "acme") == "edge/v1/acme/_all/_all/desired"
    assert desired_topic(P, "acme", "s1") == "edge/v1/acme/s1/_all/desired"
    assert desired_topic(P, "acme", "s1", "d1") == "edge/v1/acme/s1/d1/desired"
    assert [parse_down_topic(t, P).layer for t in device_filters(P, "acme", "s1", "d1")[:3]] == [
        "tenant", "store", "device"]
    assert device_filters(P, "acme", "s1", "d1")[3:] == ["edge/v1/acme/_all/_all/consent/+", "edge/v1/acme/s1/d1/cmd"]
    for bad in ("edge/v1/acme/_all/d1/desired", "edge/v1/_all/_all/_all/desired", "edge/v1/acme/s1/d1/consent/zz",
                "edge/v1/acme/_all/_all/consent/0", "other/acme/s1/d1/cmd"):
        with pytest.raises(DocumentError):
            parse_down_topic(bad, P)


def test_merge_hash_and_settable_keys() -> None:
    local = {"logging": {"level": "info", "format": "json"}, "drivers": {"pos": [{"name": "a"}]}}
    tenant = {"logging": {"level": "debug"}}
    device = {"logging": {"format": None}, "drivers": {"pos": []}}
    assert merge_layers(local, tenant, device) == {"logging": {"level": "debug"}, "drivers": {"pos": []}}
    assert effective_hash({"b": 1, "a": "é"}) == hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()
    assert unsettable_paths({"logging": {"level": "debug"}, "buffer": {"retention": {}}}) == []
    assert unsettable_paths({"uplink": {"broker": "mqtt://x:1", "window": 4}, "identity": {}, "health": {"listen": "x"},
                             "buffer": {"file": "x"}}) == ["buffer.file", "health.listen", "identity", "uplink.broker"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_never_escapes_as_anything_but_document_error(data: bytes) -> None:
    for fn in (lambda: verify_document(data, topic="edge/v1/acme/s1/d1/cmd", prefix=P, trusted=TRUSTED),
               lambda: verify_enrolled(data, topic="edge/v1/acme/s1/d1/enrolled", prefix=P, secret=bytes(32)),
               lambda: parse_enroll_request(data, topic="edge/v1/acme/s1/d1/enroll", prefix=P)):
        with contextlib.suppress(DocumentError):
            fn()


def test_a_small_payload_cannot_declare_a_huge_array() -> None:
    evil = b"\xdd\xff\xff\xff\xff"  # array32 of 4 billion items, 5 bytes
    env = msgpack.packb({"v": 1, "d": evil, "s": bytes(64)}, use_bin_type=True)
    with pytest.raises(DocumentError) as err:
        verify_document(env, topic="edge/v1/acme/s1/d1/cmd", prefix=P, trusted=TRUSTED)
    assert err.value.reason == "malformed"
