"""uplink-v1 wire format: golden bytes, tamper detection, malformed input, acks, offline verify.

Wire constants are literals here, written from the spec, independent of edge.wire.uplink.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import WireError
from edge.uplink.verify import verify_files
from edge.wire.uplink import (
    MAX_BODY,
    Ack,
    Batch,
    Limits,
    array_header,
    batch_filter,
    batch_topic,
    encode_event,
    kid_of,
    make_ack,
    parse_ack,
    parse_batch,
    parse_topic,
    seal_batch,
    verify_ack,
    verify_batch,
)

# RFC 8032 section 7.1, TEST 1: the public key is known independently of our code.
SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
KID = "21fe31dfa154a261"  # hex(sha256(PUBLIC)[:8])
KEY = Ed25519PrivateKey.from_private_bytes(SECRET)
PUB = Ed25519PublicKey.from_public_bytes(PUBLIC)
KEYS = {KID: PUB}
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
IDS = ("acme", "s001", "edge-01")

EVENTS: list[dict[str, Any]] = [
    {"id": 41, "ts": 1767225600123, "src": "ble", "type": "presence.enter",
     "data": {"p": "e3b0c442", "rssi": -61}},
    {"id": 42, "ts": 1767225600456, "src": "pos", "type": "pos.receipt", "data": {"total": 1299, "lines": 3}},
]  # fmt: skip

GOLDEN_HEADER = bytes.fromhex(
    "8ea674656e616e74a461636d65a573746f7265a473303031a6646576696365a7656467652d3031a36b6964b032316665"
    "333164666131353461323631a373657107a470726576c420111111111111111111111111111111111111111111111111"
    "1111111111111111a26268c42039a3a82bfb4bc27459c60471d1f2c97a054c0baa129a6c798cc5156efc21ba14a17aa4"
    "6e6f6e65a16e02a5666972737429a46c6173742aa174cf0000019b76daa9f4a473796e63c3a6736368656d61ad656467"
    "652e6576656e742e7631"
)
GOLDEN_HH = bytes.fromhex("f023810a4ce24474d0c67dafd85488c92c5d2b3e3bc68e2d6d2cdc9e92c8a481")
GOLDEN_PAYLOAD = bytes.fromhex(
    "84a17601a168c4ca8ea674656e616e74a461636d65a573746f7265a473303031a6646576696365a7656467652d3031a3"
    "6b6964b032316665333164666131353461323631a373657107a470726576c42011111111111111111111111111111111"
    "11111111111111111111111111111111a26268c42039a3a82bfb4bc27459c60471d1f2c97a054c0baa129a6c798cc515"
    "6efc21ba14a17aa46e6f6e65a16e02a5666972737429a46c6173742aa174cf0000019b76daa9f4a473796e63c3a67363"
    "68656d61ad656467652e6576656e742e7631a162c4869285a2696429a27473cf0000019b76daa87ba3737263a3626c65"
    "a474797065ae70726573656e63652e656e746572a46461746182a170a86533623063343432a472737369d0c385a26964"
    "2aa27473cf0000019b76daa9c8a3737263a3706f73a474797065ab706f732e72656365697074a46461746182a5746f74"
    "616ccd0513a56c696e657303a173c440c81b9c2b4f63007ba068ae2f57588f0184660e4c058d829a83e4a0680564d99e"
    "85cb3a9bf0561cee97178cc3bb1ddc5a59b1117da1ddf2069b181bd0a3534d03"
)
GOLDEN_ACK_SIGNED = bytes.fromhex(
    "84a373657107a26868c420f023810a4ce24474d0c67dafd85488c92c5d2b3e3bc68e2d6d2cdc9e92c8a481a26f6bc3a173c440"
    "22032cf0c1a1b20e27f398c182ec5957b1678bac27b932bf3669d4efe2ccac1719e748e27ad9d4b3a039cc6efc82f7e6be2eec"
    "e200128cd2f70dbd740928390a"
)
GOLDEN_ACK_REJECTED = bytes.fromhex(
    "84a373657107a26868c420f023810a4ce24474d0c67dafd85488c92c5d2b3e3bc68e2d6d2cdc9e92c8a481a26f6bc2a3657272"
    "ac636861696e2d62726f6b656e"
)


def seal(
    events: list[dict[str, Any]] = EVENTS,
    *,
    seq: int = 7,
    prev: bytes = b"\x11" * 32,
    compression: Any = "none",
    key: Ed25519PrivateKey = KEY,
    ids: tuple[str, str, str] = IDS,
) -> tuple[bytes, bytes]:
    return seal_batch(
        tenant=ids[0], store=ids[1], device=ids[2], seq=seq, prev=prev,
        event_bodies=[encode_event(e) for e in events], first=events[0]["id"], last=events[-1]["id"],
        t_ms=1767225600500, sync=True, key=key, kid=kid_of(PUBLIC), compression=compression,
    )  # fmt: skip


def hand_built(
    header_changes: dict[str, Any] | None = None,
    *,
    drop: tuple[str, ...] = (),
    body: bytes | None = None,
    raw_header: bytes | None = None,
) -> bytes:
    """A batch built by hand from the spec (not by seal_batch), correctly signed by KEY."""
    b = body if body is not None else msgpack.packb(EVENTS, use_bin_type=True)
    header: dict[str, Any] = {
        "tenant": "acme", "store": "s001", "device": "edge-01", "kid": KID, "seq": 7,
        "prev": b"\x11" * 32, "bh": hashlib.sha256(b).digest(), "z": "none", "n": len(EVENTS),
        "first": 41, "last": 42, "t": 1767225600500, "sync": True, "schema": "edge.event.v1",
    }  # fmt: skip
    header.update(header_changes or {})
    for k in drop:
        del header[k]
    h = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    s = KEY.sign(b"edge-batch-v1\n" + h)
    return msgpack.packb({"v": 1, "h": h, "b": b, "s": s}, use_bin_type=True)


def reason_of(payload: bytes, *, topic: tuple[str, str, str] | None = IDS, max_body: int = MAX_BODY) -> str:
    limits = Limits(max_body=max_body)
    try:
        verify_batch(parse_batch(payload, limits=limits), keys=KEYS, topic_ids=topic, limits=limits)
    except WireError as exc:
        return exc.reason
    return "ok"


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


# ------------------------------------------------------------------------------- golden bytes


def test_kid_is_first_8_bytes_of_sha256_of_the_raw_public_key() -> None:
    """kid: lowercase hex of the first 8 bytes of SHA-256 over the raw 32-byte public key."""
    assert kid_of(PUBLIC) == KID == hashlib.sha256(PUBLIC).hexdigest()[:16]


def test_sealed_batch_matches_the_golden_bytes() -> None:
    """Sealing is deterministic (Ed25519 is) and produces exactly the reviewed bytes."""
    payload, hh = seal()
    assert payload == GOLDEN_PAYLOAD
    assert hh == GOLDEN_HH == hashlib.sha256(GOLDEN_HEADER).digest()


def test_golden_batch_verifies_with_only_msgpack_and_cryptography() -> None:
    """A receiver written from the spec alone accepts the golden batch."""
    top = msgpack.unpackb(GOLDEN_PAYLOAD, raw=False)
    assert list(top) == ["v", "h", "b", "s"]
    assert top["v"] == 1
    assert top["h"] == GOLDEN_HEADER
    Ed25519PublicKey.from_public_bytes(PUBLIC).verify(top["s"], b"edge-batch-v1\n" + top["h"])
    header = msgpack.unpackb(top["h"], raw=False)
    assert header == {
        "tenant": "acme", "store": "s001", "device": "edge-01", "kid": KID, "seq": 7,
        "prev": b"\x11" * 32, "bh": hashlib.sha256(top["b"]).digest(), "z": "none", "n": 2,
        "first": 41, "last": 42, "t": 1767225600500, "sync": True, "schema": "edge.event.v1",
    }  # fmt: skip
    assert isinstance(header["prev"], bytes)  # bin, not str
    assert isinstance(header["bh"], bytes)
    assert msgpack.unpackb(top["b"], raw=False) == EVENTS


def test_body_array_fast_path_equals_msgpack_of_the_list() -> None:
    """Header + concatenated encoded events is exactly msgpack(list) at every array size class."""
    for n in (0, 1, 15, 16, 65535, 65536):
        items = list(range(n))
        fast = array_header(n) + b"".join(msgpack.packb(i) for i in items)
        assert fast == msgpack.packb(items), n


@pytest.mark.parametrize("compression", ["zlib", "none"])
def test_parse_and_verify_round_trip(compression: str) -> None:
    """Both compressions round-trip; zlib is RFC 1950 (plain zlib.decompress reads it)."""
    payload, hh = seal(compression=compression)
    batch = parse_batch(payload)
    assert (batch.tenant, batch.store, batch.device, batch.seq, batch.n) == ("acme", "s001", "edge-01", 7, 2)
    assert (batch.first, batch.last, batch.z, batch.sync, batch.hh) == (41, 42, compression, True, hh)
    raw = zlib.decompress(batch.b) if compression == "zlib" else batch.b
    assert raw == msgpack.packb(EVENTS, use_bin_type=True)
    assert verify_batch(batch, keys=KEYS, topic_ids=IDS) == EVENTS


# ------------------------------------------------------------------------------- tampering


def test_flipped_body_byte_is_bad_body_hash() -> None:
    i = GOLDEN_PAYLOAD.index(b"pos.receipt")
    assert reason_of(flip(GOLDEN_PAYLOAD, i)) == "bad-body-hash"


def test_flipped_signature_byte_is_bad_signature() -> None:
    assert reason_of(flip(GOLDEN_PAYLOAD, len(GOLDEN_PAYLOAD) - 1)) == "bad-signature"


def test_flipped_header_value_is_bad_signature() -> None:
    """seq 7 -> 6 keeps the header well-formed; only the signature catches it."""
    i = GOLDEN_PAYLOAD.index(b"\xa3seq\x07") + 4
    assert reason_of(flip(GOLDEN_PAYLOAD, i)) == "bad-signature"


def test_flipped_kid_character_is_unknown_key() -> None:
    i = GOLDEN_PAYLOAD.index(KID.encode())
    assert reason_of(flip(GOLDEN_PAYLOAD, i)) == "unknown-key"


def test_flipped_header_map_size_is_malformed() -> None:
    i = GOLDEN_PAYLOAD.index(GOLDEN_HEADER)
    assert reason_of(flip(GOLDEN_PAYLOAD, i)) == "malformed"  # 0x8e -> 0x8f: 15 entries announced, 14 present


def test_topic_other_than_the_header_ids_is_topic_mismatch() -> None:
    assert reason_of(GOLDEN_PAYLOAD, topic=("acme", "s001", "edge-02")) == "topic-mismatch"
    assert reason_of(GOLDEN_PAYLOAD, topic=None) == "ok"  # offline: the check is skipped


def test_unregistered_key_is_unknown_key_and_wrong_key_is_bad_signature() -> None:
    with pytest.raises(WireError) as exc:
        verify_batch(parse_batch(GOLDEN_PAYLOAD), keys={}, topic_ids=IDS)
    assert exc.value.reason == "unknown-key"
    with pytest.raises(WireError) as exc:
        verify_batch(parse_batch(GOLDEN_PAYLOAD), keys={KID: OTHER.public_key()}, topic_ids=IDS)
    assert exc.value.reason == "bad-signature"


def test_checks_run_in_spec_order_signature_before_body_hash_before_topic() -> None:
    both = flip(GOLDEN_PAYLOAD, len(GOLDEN_PAYLOAD) - 1)  # bad signature
    both = flip(both, both.index(b"pos.receipt"))  # and bad body
    assert reason_of(both, topic=("x", "y", "z")) == "bad-signature"
    assert reason_of(flip(GOLDEN_PAYLOAD, GOLDEN_PAYLOAD.index(b"pos.receipt")), topic=("x", "y", "z")) == (
        "bad-body-hash"
    )


# ------------------------------------------------------------------------------- malformed


def test_hand_built_batch_is_accepted() -> None:
    """The helper below builds valid batches, so each variant fails for its one change only."""
    assert reason_of(hand_built()) == "ok"


MALFORMED_TOP: list[tuple[str, Any]] = [
    ("not a map", [1, 2, 3]),
    ("extra key", {"v": 1, "h": b"", "b": b"", "s": b"\0" * 64, "x": 1}),
    ("missing s", {"v": 1, "h": b"", "b": b""}),
    ("v 2", {"v": 2, "h": b"\x80", "b": b"", "s": b"\0" * 64}),
    ("v true", {"v": True, "h": b"\x80", "b": b"", "s": b"\0" * 64}),
    ("h as str", {"v": 1, "h": "x", "b": b"", "s": b"\0" * 64}),
    ("short s", {"v": 1, "h": b"\x80", "b": b"", "s": b"\0" * 63}),
    ("header not a map", {"v": 1, "h": msgpack.packb([1]), "b": b"", "s": b"\0" * 64}),
]


@pytest.mark.parametrize(("name", "obj"), MALFORMED_TOP, ids=[n for n, _ in MALFORMED_TOP])
def test_malformed_outer_map_is_rejected(name: str, obj: Any) -> None:
    with pytest.raises(WireError) as exc:
        parse_batch(msgpack.packb(obj, use_bin_type=True))
    assert exc.value.reason == "malformed"


MALFORMED_HEADER: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("missing sync", {}, ("sync",)),
    ("missing schema", {}, ("schema",)),
    ("sync as int", {"sync": 1}, ()),
    ("seq as bool", {"seq": True}, ()),
    ("seq zero", {"seq": 0}, ()),
    ("seq beyond int64", {"seq": 2**64 - 1}, ()),
    ("prev 31 bytes", {"prev": b"\x11" * 31}, ()),
    ("prev as str", {"prev": "1" * 32}, ()),
    ("bh as str", {"bh": "x" * 32}, ()),
    ("unknown z", {"z": "gzip"}, ()),
    ("other schema", {"schema": "edge.event.v2"}, ()),
    ("tenant not an id", {"tenant": "Acme"}, ()),
    ("kid as bin", {"kid": KID.encode()}, ()),
    ("n zero", {"n": 0}, ()),
    ("seq 1 with nonzero prev", {"seq": 1}, ()),
]


@pytest.mark.parametrize(("name", "changes", "drop"), MALFORMED_HEADER, ids=[m[0] for m in MALFORMED_HEADER])
def test_malformed_header_is_rejected_even_when_signed(
    name: str, changes: dict[str, Any], drop: tuple[str, ...]
) -> None:
    assert reason_of(hand_built(changes, drop=drop)) == "malformed"


def test_header_with_a_repeated_key_is_malformed() -> None:
    """Decoders disagree on which of two equal keys wins; in signed bytes that is ambiguity."""
    good = msgpack.packb({"seq": 7}, use_bin_type=True)[1:]  # the one key/value pair
    h: bytes = msgpack.unpackb(hand_built(), raw=False)["h"]
    repeated = bytes([h[0] + 1]) + h[1:] + good  # 15 entries, "seq" twice
    assert reason_of(hand_built(raw_header=repeated)) == "malformed"


def test_unknown_header_and_event_keys_are_ignored() -> None:
    """Receivers ignore header and event keys they do not know."""
    events = [{**EVENTS[0], "future": [1, 2]}, EVENTS[1]]
    body = msgpack.packb(events, use_bin_type=True)
    payload = hand_built({"future": {"x": 1}}, body=body)
    assert verify_batch(parse_batch(payload), keys=KEYS, topic_ids=IDS) == events


def _body(events: Any) -> bytes:
    return msgpack.packb(events, use_bin_type=True)


MALFORMED_BODY: list[tuple[str, dict[str, Any], bytes]] = [
    ("n differs from the body", {"n": 3}, _body(EVENTS)),
    ("first differs", {"first": 40}, _body(EVENTS)),
    ("last differs", {"last": 43}, _body(EVENTS)),
    ("body not an array", {}, _body({"id": 41})),
    ("event missing data", {}, _body([{k: v for k, v in EVENTS[0].items() if k != "data"}, EVENTS[1]])),
    ("event id not increasing", {"first": 42, "last": 41}, _body([EVENTS[1], EVENTS[0]])),
    ("event src unknown", {}, _body([{**EVENTS[0], "src": "wifi"}, EVENTS[1]])),
    ("event data not a map", {}, _body([{**EVENTS[0], "data": [1]}, EVENTS[1]])),
    ("body not msgpack", {}, b"\xc1\xc1"),
    ("body trailing bytes", {}, _body(EVENTS) + b"\x00"),
    ("not zlib", {"z": "zlib"}, _body(EVENTS)),
    ("zlib with trailing bytes", {"z": "zlib"}, zlib.compress(_body(EVENTS)) + b"\x00"),
    ("truncated zlib", {"z": "zlib"}, zlib.compress(_body(EVENTS))[:-3]),
]


@pytest.mark.parametrize(("name", "changes", "body"), MALFORMED_BODY, ids=[n for n, _, _ in MALFORMED_BODY])
def test_malformed_body_is_rejected(name: str, changes: dict[str, Any], body: bytes) -> None:
    assert reason_of(hand_built(changes, body=body)) == "malformed"


def test_zlib_bomb_is_malformed_not_a_memory_blowup() -> None:
    """A body that decompresses beyond the cap is refused after reading at most cap+1 bytes."""
    bomb = zlib.compress(b"\0" * (MAX_BODY + 1), 9)
    assert len(bomb) < MAX_BODY // 500
    assert reason_of(hand_built({"z": "zlib"}, body=bomb)) == "malformed"
    small = zlib.compress(_body(EVENTS))
    assert reason_of(hand_built({"z": "zlib"}, body=small), max_body=20) == "malformed"
    assert reason_of(hand_built({"z": "zlib"}, body=small)) == "ok"


def test_oversized_payload_is_malformed() -> None:
    with pytest.raises(WireError) as exc:
        parse_batch(GOLDEN_PAYLOAD, limits=Limits(max_payload=len(GOLDEN_PAYLOAD) - 1))
    assert exc.value.reason == "malformed"


def test_default_limits_are_four_default_batches() -> None:
    """1 MiB payload and body (4 x the device's 256 KiB batch.max_bytes), 1000 events per body."""
    assert (Limits().max_payload, Limits().max_body, Limits().max_events) == (1048576, 1048576, 1000)
    derived = Limits.for_batches(max_events=5000, max_bytes=1048576)
    assert (derived.max_payload, derived.max_body, derived.max_events) == (4 * 1048576 + 4096, 4194304, 5000)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xdd\x00\x98\x96\x80" + b"\x90" * 100_000,  # array 32 announcing 10 million empty arrays
        b"\xdf\x00\x98\x96\x80" + b"\x90\x90" * 1000,  # map 32 announcing 10 million entries
        msgpack.packb({"v": 1, "h": b"\xdd\x00\x98\x96\x80" + b"\x90" * 1000, "b": b"", "s": bytes(64)}),
        msgpack.packb({"v": 1, "h": b"\x81\xa1x" + b"\xc5\xff\xff", "b": b"", "s": bytes(64)}),
    ],
    ids=["array-of-arrays", "huge-map", "header-array", "header-bin"],
)
def test_announced_lengths_beyond_the_limits_are_malformed_before_allocation(payload: bytes) -> None:
    """Container and bin lengths are capped by the unpacker itself, so a payload announcing millions
    of entries is refused as malformed instead of being materialized."""
    with pytest.raises(WireError) as exc:
        parse_batch(payload)
    assert exc.value.reason == "malformed"


def test_body_with_more_events_than_the_limit_is_malformed() -> None:
    payload = hand_built({})
    assert reason_of(payload) == "ok"
    limits = Limits(max_events=1)
    with pytest.raises(WireError) as exc:
        verify_batch(parse_batch(payload, limits=limits), keys=KEYS, topic_ids=IDS, limits=limits)
    assert exc.value.reason == "malformed"


# ------------------------------------------------------------------------------- fuzz


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= val or 1
        elif kind == 1:
            del buf[i:]
        elif kind == 2:
            buf.insert(i, val)
        else:
            del buf[i]
    return bytes(buf)


def _parse_and_verify(payload: bytes) -> None:
    """Only WireError with a spec reason may escape."""
    reasons = {"ok", "malformed", "unknown-key", "bad-signature", "bad-body-hash", "topic-mismatch"}
    assert reason_of(payload) in reasons


def _ack_or_reason(data: bytes) -> Ack | str:
    try:
        return parse_ack(data)
    except WireError as exc:
        return exc.reason


_OP = st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255))  # (kind, position, byte)
_OPS = st.lists(_OP, min_size=1, max_size=4)
_FUZZ = settings(derandomize=True, max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@_FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    _parse_and_verify(data)
    result = _ack_or_reason(data)
    assert isinstance(result, Ack) or result == "malformed"


@_FUZZ
@given(_OPS, st.sampled_from(["none", "zlib"]))
def test_fuzz_mutated_batches_raise_only_wire_errors(ops: list[tuple[int, int, int]], z: str) -> None:
    payload, _ = seal(compression=z)
    _parse_and_verify(_mutate(payload, ops))


@_FUZZ
@given(msgpack_values, msgpack_values)
def test_fuzz_wrongly_typed_structures_raise_only_wire_errors(header: Any, other: Any) -> None:
    for obj in (
        {"v": 1, "h": msgpack.packb(header, use_bin_type=True), "b": b"", "s": b"\0" * 64},
        {"v": 1, "h": other, "b": header, "s": b"\0" * 64},
        header,
    ):
        try:
            data = msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError):
            continue
        _parse_and_verify(data)
        result = _ack_or_reason(data)
        assert isinstance(result, Ack) or result == "malformed"


@_FUZZ
@given(_OPS)
def test_fuzz_mutated_acks_raise_only_wire_errors_and_never_verify(ops: list[tuple[int, int, int]]) -> None:
    """A changed ack either fails to parse (malformed) or fails verification unless its signed
    fields and signature are all still the original ones."""
    result = _ack_or_reason(_mutate(GOLDEN_ACK_SIGNED, ops))
    if isinstance(result, str):
        assert result == "malformed"
        return
    golden = parse_ack(GOLDEN_ACK_SIGNED)
    same = (result.seq, result.hh, result.ok, result.s) == (golden.seq, golden.hh, golden.ok, golden.s)
    assert verify_ack(result, tenant="acme", store="s001", device="edge-01", cloud_key=PUB) == same


# ------------------------------------------------------------------------------- acks


def test_signed_ack_matches_golden_bytes_and_verifies() -> None:
    payload = make_ack(tenant="acme", store="s001", device="edge-01", seq=7, hh=GOLDEN_HH, ok=True, key=KEY)
    assert payload == GOLDEN_ACK_SIGNED
    ack = parse_ack(payload)
    assert (ack.seq, ack.hh, ack.ok, ack.err) == (7, GOLDEN_HH, True, None)
    assert ack.s is not None
    msg = b"edge-ack-v1\n" + msgpack.packb(["acme", "s001", "edge-01", 7, GOLDEN_HH, True], use_bin_type=True)
    PUB.verify(ack.s, msg)  # independent of verify_ack
    assert verify_ack(ack, tenant="acme", store="s001", device="edge-01", cloud_key=PUB)


def test_rejection_ack_carries_the_reason_and_no_signature_without_a_key() -> None:
    payload = make_ack(tenant="acme", store="s001", device="edge-01", seq=7, hh=GOLDEN_HH, ok=False,
                       err="chain-broken")  # fmt: skip
    assert payload == GOLDEN_ACK_REJECTED
    ack = parse_ack(payload)
    assert (ack.ok, ack.err, ack.s) == (False, "chain-broken", None)
    assert not verify_ack(ack, tenant="acme", store="s001", device="edge-01", cloud_key=PUB)


def test_forged_acks_do_not_verify() -> None:
    """Wrong signer, flipped ok, other device, other hh: verify_ack is False for each."""
    good = parse_ack(GOLDEN_ACK_SIGNED)
    wrong_key = parse_ack(make_ack(tenant="acme", store="s001", device="edge-01", seq=7, hh=GOLDEN_HH,
                                   ok=True, key=OTHER))  # fmt: skip
    assert not verify_ack(wrong_key, tenant="acme", store="s001", device="edge-01", cloud_key=PUB)
    flipped = msgpack.unpackb(GOLDEN_ACK_SIGNED, raw=False)
    flipped["ok"] = False
    flipped["err"] = "malformed"
    forged = parse_ack(msgpack.packb(flipped, use_bin_type=True))
    assert not verify_ack(forged, tenant="acme", store="s001", device="edge-01", cloud_key=PUB)
    assert not verify_ack(good, tenant="acme", store="s001", device="edge-02", cloud_key=PUB)
    other_hh = msgpack.unpackb(GOLDEN_ACK_SIGNED, raw=False)
    other_hh["hh"] = b"\0" * 32
    assert not verify_ack(parse_ack(msgpack.packb(other_hh, use_bin_type=True)), tenant="acme", store="s001",
                          device="edge-01", cloud_key=PUB)  # fmt: skip


@pytest.mark.parametrize(
    "obj",
    [
        [7],
        {"seq": 7, "hh": b"\0" * 31, "ok": True},
        {"seq": "7", "hh": b"\0" * 32, "ok": True},
        {"seq": 7, "hh": b"\0" * 32, "ok": 1},
        {"seq": 7, "hh": b"\0" * 32, "ok": False, "err": 5},
        {"seq": 7, "hh": b"\0" * 32, "ok": True, "s": b"\0" * 10},
        {"hh": b"\0" * 32, "ok": True},
    ],
)
def test_malformed_acks_are_rejected(obj: Any) -> None:
    with pytest.raises(WireError) as exc:
        parse_ack(msgpack.packb(obj, use_bin_type=True))
    assert exc.value.reason == "malformed"


# ------------------------------------------------------------------------------- topics, sealing inputs


def test_topics_follow_the_spec_layout() -> None:
    assert batch_topic("edge/v1", *IDS) == "edge/v1/acme/s001/edge-01/batch"
    assert parse_topic("edge/v1/acme/s001/edge-01/ack", "edge/v1") == ("acme", "s001", "edge-01", "ack")
    assert batch_filter("edge/v1", "grp") == "$share/grp/edge/v1/+/+/+/batch"
    assert batch_filter("edge/v1", None) == "edge/v1/+/+/+/batch"
    for bad in ("edge/v2/acme/s001/edge-01/batch", "edge/v1/acme/s001/batch", "edge/v1/Acme/s001/d/batch",
                "edge/v1/acme/s001/d/other", "edge/v1/acme/s001/d/batch/x"):  # fmt: skip
        with pytest.raises(WireError):
            parse_topic(bad, "edge/v1")


@pytest.mark.parametrize(
    "changes",
    [{"seq": 0}, {"prev": b"\0" * 31}, {"seq": 1, "prev": b"\1" * 32}, {"ids": ("Acme", "s", "d")}],
)
def test_seal_refuses_arguments_a_receiver_must_reject(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        seal(**changes)
    with pytest.raises(ValueError, match="at least one event"):
        seal_batch(tenant="a", store="b", device="c", seq=1, prev=bytes(32), event_bodies=[], first=0, last=0,
                   t_ms=0, sync=False, key=KEY, kid=KID)  # fmt: skip


# ------------------------------------------------------------------------------- edge verify


def _write_keys(folder: Path, *keys: Ed25519PrivateKey, ids: tuple[str, str, str] = IDS) -> Path:
    """Register keys as the receiver does: the first at `ids`, the others at device-1, device-2..."""
    from edge.wire.uplink import public_raw

    for i, k in enumerate(keys):
        device = ids[2] if i == 0 else f"device-{i}"
        path = folder / ids[0] / ids[1] / f"{device}.pub"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(public_raw(k.public_key()).hex() + "\n")
    return folder


def _chain(n: int) -> list[bytes]:
    out, prev = [], bytes(32)
    for seq in range(1, n + 1):
        events = [{"id": seq * 10 + j, "ts": 1, "src": "edge", "type": "edge.tick", "data": {}}
                  for j in range(2)]  # fmt: skip
        payload, prev = seal(events, seq=seq, prev=prev, compression="zlib")
        out.append(payload)
    return out


def test_verify_files_accepts_a_good_chain(tmp_path: Path) -> None:
    keys = _write_keys(tmp_path / "keys", KEY)
    files = []
    for i, p in enumerate(_chain(3)):
        f = tmp_path / f"b{i + 1}.bin"
        f.write_bytes(p)
        files.append(str(f))
    (tmp_path / "b1.bin.topic").write_text("edge/v1/acme/s001/edge-01/batch\n")
    out = io.StringIO()
    assert verify_files(list(reversed(files)), keys, out=out) == 0
    assert out.getvalue().splitlines() == [
        f"OK  {files[2]}  acme/s001/edge-01 seq=3 n=2",
        f"OK  {files[1]}  acme/s001/edge-01 seq=2 n=2",
        f"OK  {files[0]}  acme/s001/edge-01 seq=1 n=2",
    ]


def test_verify_files_reports_tampering_chain_breaks_and_topic_sidecars(tmp_path: Path) -> None:
    keys = _write_keys(tmp_path / "keys", KEY)
    chain = _chain(3)
    forked, _ = seal([{"id": 99, "ts": 1, "src": "edge", "type": "edge.tick", "data": {}}], seq=3,
                     prev=b"\x22" * 32)  # fmt: skip
    payloads = {
        "good1": chain[0],
        "tampered": flip(chain[1], len(chain[1]) - 1),
        "broken": forked,
        "wrongtopic": GOLDEN_PAYLOAD,
        "garbage": b"\x93\x01\x02",
    }
    paths = {}
    for name, data in payloads.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    (tmp_path / "wrongtopic.topic").write_text("edge/v1/acme/s001/edge-09/batch")
    # a valid seq 2 among the files makes "broken" (seq 3, wrong prev) checkable
    (tmp_path / "good2").write_bytes(chain[1])
    order = ["good1", "good2", "tampered", "broken", "wrongtopic", "garbage"]
    out = io.StringIO()
    rc = verify_files([str(tmp_path / n) for n in order], keys, out=out)
    lines = out.getvalue().splitlines()
    assert rc == 1
    assert lines[0] == f"OK  {tmp_path / 'good1'}  acme/s001/edge-01 seq=1 n=2"
    assert lines[1] == f"OK  {tmp_path / 'good2'}  acme/s001/edge-01 seq=2 n=2"
    assert lines[2].startswith(f"FAIL {tmp_path / 'tampered'}  bad-signature: ")
    assert lines[3].startswith(f"FAIL {tmp_path / 'broken'}  chain-broken: ")
    # captured on edge-09's topic: edge-09's key is asked for (none registered), as the receiver does
    assert lines[4].startswith(f"FAIL {tmp_path / 'wrongtopic'}  unknown-key: ")
    assert lines[5].startswith(f"FAIL {tmp_path / 'garbage'}  malformed: ")


def test_verify_files_unknown_key_and_usage_errors(tmp_path: Path) -> None:
    keys = _write_keys(tmp_path / "keys", OTHER)
    (keys / "acme" / "s001" / "junk.pub").write_text("not hex")
    f = tmp_path / "b.bin"
    f.write_bytes(GOLDEN_PAYLOAD)
    out, err = io.StringIO(), io.StringIO()
    assert verify_files([str(f)], keys, out=out, err=err) == 2  # a bad key file is an I/O problem
    assert out.getvalue().startswith(f"FAIL {f}  unknown-key: ")
    assert "junk.pub" in err.getvalue()
    (keys / "acme" / "s001" / "junk.pub").unlink()
    assert verify_files([str(f)], keys, out=io.StringIO(), err=err) == 1
    assert verify_files([], keys, out=io.StringIO(), err=err) == 2
    assert verify_files([str(f)], tmp_path / "missing", out=io.StringIO(), err=err) == 2
    assert verify_files([str(tmp_path / "nope.bin")], keys, out=io.StringIO(), err=err) == 2


def test_verify_files_binds_keys_to_identity(tmp_path: Path) -> None:
    """Device A's key verifies A's batches only: signed by A as othertenant/s9/edge-b (with or
    without a sidecar), it is unknown-key, even when edge-b has a key of its own registered."""
    keys = _write_keys(tmp_path / "keys", KEY)  # A = acme/s001/edge-01
    _write_keys(tmp_path / "keys", OTHER, ids=("othertenant", "s9", "edge-b"))
    own, _ = seal(seq=1, prev=bytes(32))
    foreign, _ = seal(seq=1, prev=bytes(32), ids=("othertenant", "s9", "edge-b"))
    (tmp_path / "own").write_bytes(own)
    (tmp_path / "foreign").write_bytes(foreign)
    (tmp_path / "foreign-topic").write_bytes(foreign)
    (tmp_path / "foreign-topic.topic").write_text("edge/v1/othertenant/s9/edge-b/batch\n")
    # A's own batch captured on B's topic: B's key is asked for, and A's kid is not it
    (tmp_path / "own-on-b").write_bytes(own)
    (tmp_path / "own-on-b.topic").write_text("edge/v1/othertenant/s9/edge-b/batch\n")
    out = io.StringIO()
    names = ["own", "foreign", "foreign-topic", "own-on-b"]
    assert verify_files([str(tmp_path / n) for n in names], keys, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"OK  {tmp_path / 'own'}  acme/s001/edge-01 seq=1 n=2"
    for line, name in zip(lines[1:], names[1:], strict=True):
        assert line.startswith(f"FAIL {tmp_path / name}  unknown-key: "), line


def test_verify_files_refuses_the_old_flat_layout(tmp_path: Path) -> None:
    """A folder of flat <device>.pub files (no identity) is a usage error naming the layout."""
    from edge.wire.uplink import public_raw

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "edge-01.pub").write_text(public_raw(KEY.public_key()).hex() + "\n")
    f = tmp_path / "b.bin"
    f.write_bytes(GOLDEN_PAYLOAD)
    err = io.StringIO()
    assert verify_files([str(f)], keys, out=io.StringIO(), err=err) == 2
    assert "<tenant>/<store>/<device>.pub" in err.getvalue()


def test_batch_dataclass_is_frozen() -> None:
    batch = parse_batch(GOLDEN_PAYLOAD)
    assert isinstance(batch, Batch)
    with pytest.raises(AttributeError):
        batch.seq = 8  # type: ignore[misc]  # the point: frozen
