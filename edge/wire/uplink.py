"""uplink-v1 on the wire: sealing, parsing and verifying batches and acks (pure, no I/O).

Everything here follows /work/shared/spec/uplink-v1.md to the letter; receivers written by
other teams verify our batches from that text alone. Parsers of untrusted bytes raise
nothing but `WireError`, whose `reason` is one of the spec's error codes.

This is the one uplink-v1 module: the device seals with it, the cloud (cloud/) parses and
verifies with it. Parsing is bounded before work (`Limits`): a payload is decoded once, by a
MessagePack unpacker whose bin/str/array/map limits come from the batch limits, so a small
payload can never unfold into a large object graph; the body is decompressed and decoded only
after the signature and the body hash verified, within `max_body`.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard, get_args

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import WireError
from edge.events import SOURCES

__all__ = [
    "ACK_CONTEXT",
    "BATCH_MAX_BYTES",
    "BATCH_MAX_EVENTS",
    "COMPRESSIONS",
    "DEFAULT_LIMITS",
    "DEFAULT_PREFIX",
    "ID_RE",
    "LARGEST_EVENTS",
    "LARGEST_PAYLOAD",
    "LIMIT_FACTOR",
    "MAX_ACK",
    "MAX_BODY",
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "REASONS",
    "SCHEMA",
    "SIGN_CONTEXT",
    "VERSION",
    "ZERO_HASH",
    "Ack",
    "Batch",
    "Compression",
    "KiB",
    "Limits",
    "MiB",
    "Reason",
    "TopicKind",
    "ack_signed_message",
    "ack_topic",
    "array_header",
    "batch_filter",
    "batch_topic",
    "decode_body",
    "encode_event",
    "kid_of",
    "make_ack",
    "pack",
    "parse_ack",
    "parse_batch",
    "parse_topic",
    "public_raw",
    "seal_batch",
    "status_topic",
    "verify_ack",
    "verify_batch",
    "verify_signature",
]

SIGN_CONTEXT: Final = b"edge-batch-v1\n"
ACK_CONTEXT: Final = b"edge-ack-v1\n"
SCHEMA: Final = "edge.event.v1"
VERSION: Final = 1
DEFAULT_PREFIX: Final = "edge/v1"
ZERO_HASH: Final = bytes(32)

KiB: Final = 1024
MiB: Final = 1024 * 1024
BATCH_MAX_BYTES: Final = 256 * KiB  # the device's default uplink.batch.max_bytes
BATCH_MAX_EVENTS: Final = 1000  # the device's default uplink.batch.max_events
LIMIT_FACTOR: Final = 4  # receivers accept payloads and bodies this many times a default batch
MAX_PAYLOAD: Final = LIMIT_FACTOR * BATCH_MAX_BYTES  # 1 MiB: default cap on a batch payload
MAX_BODY: Final = LIMIT_FACTOR * BATCH_MAX_BYTES  # 1 MiB: default cap on a decompressed body (zlib bombs)
MAX_HEADER: Final = 4096  # a real header is about 250 bytes; unknown keys may add a little
MAX_ACK: Final = 4096  # a real ack is under 200 bytes
# the largest batch a device can be configured to make (batch.max_bytes <= 64 MiB, max_events
# <= 100,000); the slack covers framing and the header
LARGEST_PAYLOAD: Final = 80 * MiB
LARGEST_EVENTS: Final = 100_000
_INT64_MAX: Final = 2**63 - 1  # receivers store seq/ids in SQLite INTEGER columns

Compression = Literal["zlib", "none"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)
Reason = Literal[
    "bad-signature", "unknown-key", "bad-body-hash", "topic-mismatch", "chain-broken", "malformed"
]
REASONS: tuple[Reason, ...] = get_args(Reason)
TopicKind = Literal["batch", "ack", "status"]

ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(slots=True, frozen=True)
class Limits:
    """What a parser accepts, checked before work. Defaults: 4 x the device's default batch.

    `max_payload`: bytes of a whole batch payload (checked before decoding); `max_body`: bytes of
    a decompressed body; `max_events`: events in a body, and the longest array or map anywhere in
    it. The payload is decoded with bin/str lengths capped at `max_payload` and at most 4 entries
    per array or map (a batch is a map of 4), the header (at most MAX_HEADER bytes) with at most
    64 entries, the body with `max_events` and `max_body`. MessagePack preallocates a container
    of the length it announces: these caps are what keeps a 10 MB payload of array headers from
    becoming gigabytes of lists.
    """

    max_payload: int = MAX_PAYLOAD
    max_body: int = MAX_BODY
    max_events: int = BATCH_MAX_EVENTS

    @classmethod
    def for_batches(cls, *, max_events: int, max_bytes: int, factor: int = LIMIT_FACTOR) -> Limits:
        """Limits for devices whose uplink.batch is (max_events, max_bytes)."""
        return cls(max_payload=factor * max_bytes + MAX_HEADER, max_body=factor * max_bytes, max_events=max_events)

    @classmethod
    def largest(cls) -> Limits:
        """Accepts the largest batch any device configuration can make (offline tools)."""
        return cls(max_payload=LARGEST_PAYLOAD, max_body=LARGEST_PAYLOAD, max_events=LARGEST_EVENTS)


DEFAULT_LIMITS: Final = Limits()
_BATCH_KEYS: Final = frozenset({"v", "h", "b", "s"})
_EVENT_KEYSET: Final = frozenset({"id", "ts", "src", "type", "data"})
_KINDS: Final[dict[str, TopicKind]] = {"batch": "batch", "ack": "ack", "status": "status"}
_COMPRESSIONS: Final[dict[str, Compression]] = {"zlib": "zlib", "none": "none"}


# ---------------------------------------------------------------- topics and key ids


def batch_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/batch"


def ack_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/ack"


def status_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/status"


def batch_filter(prefix: str, shared_group: str | None = None) -> str:
    """Subscription filter for every device's batches, optionally as a shared subscription."""
    base = f"{prefix}/+/+/+/batch"
    return f"$share/{shared_group}/{base}" if shared_group else base


def parse_topic(topic: str, prefix: str) -> tuple[str, str, str, TopicKind]:
    """`{prefix}/{tenant}/{store}/{device}/{kind}` -> (tenant, store, device, kind).

    Raises WireError("malformed") when the topic is not under `prefix`, has the wrong shape,
    an id outside `[a-z0-9][a-z0-9_-]{0,62}`, or an unknown kind.
    """
    head = prefix + "/"
    if not topic.startswith(head):
        raise WireError("malformed", f"topic not under {prefix!r}")
    parts = topic[len(head) :].split("/")
    if len(parts) != 4:
        raise WireError("malformed", "topic is not {prefix}/{tenant}/{store}/{device}/{kind}")
    tenant, store, device, kind = parts
    for name, value in (("tenant", tenant), ("store", store), ("device", device)):
        if not ID_RE.fullmatch(value):
            raise WireError("malformed", f"topic {name} is not a valid id")
    known = _KINDS.get(kind)
    if known is None:
        raise WireError("malformed", f"unknown topic kind {kind[:20]!r}")
    return tenant, store, device, known


def kid_of(public_key_raw: bytes) -> str:
    """Key id: lowercase hex of the first 8 bytes of SHA-256 over the raw 32-byte public key."""
    if len(public_key_raw) != 32:
        raise ValueError("an Ed25519 public key is 32 raw bytes")
    return hashlib.sha256(public_key_raw).digest()[:8].hex()


def public_raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def pack(obj: Any) -> bytes:
    """MessagePack as the spec means it: str as str, bytes as bin."""
    return msgpack.packb(obj, use_bin_type=True)


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One body element (an `Event.to_wire()` map) as MessagePack."""
    return pack(dict(event))


def array_header(n: int) -> bytes:
    """The MessagePack array header for `n` elements (fixarray, array 16 or array 32)."""
    if n < 0 or n > 0xFFFFFFFF:
        raise ValueError("array length out of range")
    if n < 16:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


# ---------------------------------------------------------------- sealing


def seal_batch(
    *,
    tenant: str,
    store: str,
    device: str,
    seq: int,
    prev: bytes,
    event_bodies: Sequence[bytes],
    first: int,
    last: int,
    t_ms: int,
    sync: bool,
    key: Ed25519PrivateKey,
    kid: str,
    compression: Compression = "zlib",
    level: int = 6,
) -> tuple[bytes, bytes]:
    """Seal a batch; returns (payload, hh) where hh = SHA-256 of the header bytes.

    `event_bodies` are already-encoded event maps (see `encode_event`); the body array is
    their concatenation behind an array header, which equals `pack(list_of_events)`.
    Arguments that would produce a batch a receiver must reject raise ValueError.
    """
    for name, value in (("tenant", tenant), ("store", store), ("device", device)):
        if not ID_RE.fullmatch(value):
            raise ValueError(f"{name} {value!r} does not match [a-z0-9][a-z0-9_-]{{0,62}}")
    if not 1 <= seq <= _INT64_MAX:
        raise ValueError("seq starts at 1")
    if len(prev) != 32 or (seq == 1 and prev != ZERO_HASH):
        raise ValueError("prev is 32 bytes, all zero for seq 1")
    if not event_bodies:
        raise ValueError("a batch holds at least one event")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression is one of {COMPRESSIONS}")
    raw = array_header(len(event_bodies)) + b"".join(event_bodies)
    body = zlib.compress(raw, level) if compression == "zlib" else raw
    header = {
        "tenant": tenant,
        "store": store,
        "device": device,
        "kid": kid,
        "seq": seq,
        "prev": bytes(prev),
        "bh": hashlib.sha256(body).digest(),
        "z": compression,
        "n": len(event_bodies),
        "first": first,
        "last": last,
        "t": t_ms,
        "sync": bool(sync),
        "schema": SCHEMA,
    }
    h = pack(header)
    s = key.sign(SIGN_CONTEXT + h)
    payload = pack({"v": VERSION, "h": h, "b": body, "s": s})
    return payload, hashlib.sha256(h).digest()


# ---------------------------------------------------------------- parsing


@dataclass(slots=True, frozen=True)
class Batch:
    """A decoded (not yet verified) batch: the signed bytes plus the header's fields."""

    h: bytes
    b: bytes
    s: bytes
    hh: bytes  # SHA-256 of h: what acks and the next batch's prev refer to
    tenant: str
    store: str
    device: str
    kid: str
    seq: int
    prev: bytes
    bh: bytes
    z: Compression
    n: int
    first: int
    last: int
    t: int
    sync: bool
    schema: str

    @property
    def ids(self) -> tuple[str, str, str]:
        return self.tenant, self.store, self.device


class _DuplicateKeyError(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A map with a repeated key means different things to different decoders; in signed
    # bytes that ambiguity is an attack surface, so it is malformed.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKeyError("repeated map key")
    return out


# msgpack raises ValueError subclasses (FormatError, ExtraData, StackError, UnicodeDecodeError)
# and, for odd inputs, TypeError/OverflowError; all of them mean "not valid MessagePack".
_DECODE_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


def _unpack_strict(data: bytes, what: str, *, max_len: int = MAX_ACK, max_items: int = 64) -> Any:
    """One bounded decode: bin/str at most `max_len` bytes, arrays/maps at most `max_items` long."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_pairs_hook=_unique_pairs,
            max_bin_len=max_len, max_str_len=max_len, max_array_len=max_items, max_map_len=max_items,
            max_ext_len=max_len,
        )  # fmt: skip
    except _DECODE_ERRORS as exc:
        raise WireError("malformed", f"{what} is not valid MessagePack ({type(exc).__name__})") from None


def _is_int(v: object) -> TypeGuard[int]:
    return type(v) is int  # bool is an int subclass but a different MessagePack type


def _int_field(header: Mapping[str, Any], key: str, lo: int) -> int:
    v = header.get(key)
    if not _is_int(v) or not lo <= v <= _INT64_MAX:
        raise WireError("malformed", f"header {key!r} must be an int in [{lo}, 2^63-1]")
    return int(v)


def _bin_field(header: Mapping[str, Any], key: str, size: int) -> bytes:
    v = header.get(key)
    if type(v) is not bytes or len(v) != size:
        raise WireError("malformed", f"header {key!r} must be bin of {size} bytes")
    return v


def _str_field(header: Mapping[str, Any], key: str) -> str:
    v = header.get(key)
    if type(v) is not str:
        raise WireError("malformed", f"header {key!r} must be str")
    return v


def parse_batch(payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Batch:  # noqa: PLR0912 - one check per spec field
    """Decode a batch payload and its header, once and bounded; checks shape and types, not signatures."""
    if len(payload) > limits.max_payload:
        raise WireError("malformed", f"payload of {len(payload)} bytes exceeds {limits.max_payload}")
    top = _unpack_strict(payload, "payload", max_len=limits.max_payload, max_items=4)
    if type(top) is not dict or top.keys() != _BATCH_KEYS:
        raise WireError("malformed", 'batch must be a map with exactly the keys "v", "h", "b", "s"')
    v, h, b, s = top["v"], top["h"], top["b"], top["s"]
    if not _is_int(v) or v != VERSION:
        raise WireError("malformed", '"v" must be the int 1')
    if type(h) is not bytes or type(b) is not bytes or type(s) is not bytes:
        raise WireError("malformed", '"h", "b" and "s" must be bin')
    if len(s) != 64:
        raise WireError("malformed", '"s" must be a 64-byte signature')
    if len(h) > MAX_HEADER:
        raise WireError("malformed", f"header of {len(h)} bytes exceeds {MAX_HEADER}")
    header = _unpack_strict(h, "header", max_len=MAX_HEADER, max_items=64)
    if type(header) is not dict:
        raise WireError("malformed", "header must be a map")
    tenant, store, device = (_str_field(header, k) for k in ("tenant", "store", "device"))
    for key, value in (("tenant", tenant), ("store", store), ("device", device)):
        if not ID_RE.fullmatch(value):
            raise WireError("malformed", f"header {key!r} is not a valid id")
    kid = _str_field(header, "kid")
    seq = _int_field(header, "seq", 1)
    prev = _bin_field(header, "prev", 32)
    if seq == 1 and prev != ZERO_HASH:
        raise WireError("malformed", 'header "prev" must be 32 zero bytes for seq 1')
    bh = _bin_field(header, "bh", 32)
    z_name = _str_field(header, "z")
    z = _COMPRESSIONS.get(z_name)
    if z is None:
        raise WireError("malformed", f'unknown compression "z" {z_name[:20]!r}')
    n = _int_field(header, "n", 1)
    first = _int_field(header, "first", 0)
    last = _int_field(header, "last", 0)
    t = _int_field(header, "t", 0)
    sync = header.get("sync")
    if type(sync) is not bool:
        raise WireError("malformed", 'header "sync" must be bool')
    schema = _str_field(header, "schema")
    if schema != SCHEMA:
        raise WireError("malformed", f'header "schema" must be {SCHEMA!r}')
    return Batch(
        h=h, b=b, s=s, hh=hashlib.sha256(h).digest(),
        tenant=tenant, store=store, device=device, kid=kid, seq=seq, prev=prev, bh=bh,
        z=z, n=n, first=first, last=last, t=t, sync=sync, schema=schema,
    )  # fmt: skip


# ---------------------------------------------------------------- verification


def _decompress(batch: Batch, max_body: int) -> bytes:
    if batch.z == "none":
        if len(batch.b) > max_body:
            raise WireError("malformed", f"body exceeds {max_body} bytes")
        return batch.b
    d = zlib.decompressobj()
    try:
        raw = d.decompress(batch.b, max_body + 1)
    except zlib.error as exc:
        raise WireError("malformed", f"body is not a zlib stream ({exc})") from None
    if len(raw) > max_body:
        raise WireError("malformed", f"body decompresses beyond {max_body} bytes")
    if not d.eof or d.unused_data:
        raise WireError("malformed", "body zlib stream is truncated or has trailing bytes")
    return raw


def _decode_events(batch: Batch, raw: bytes, limits: Limits) -> list[dict[str, Any]]:
    if batch.n > limits.max_events:
        raise WireError("malformed", f"header n={batch.n} exceeds {limits.max_events} events")
    try:
        events = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_bin_len=limits.max_body, max_str_len=limits.max_body,
            max_array_len=limits.max_events, max_map_len=limits.max_events, max_ext_len=limits.max_body,
        )  # fmt: skip
    except _DECODE_ERRORS as exc:
        raise WireError("malformed", f"body is not valid MessagePack ({type(exc).__name__})") from None
    if type(events) is not list:
        raise WireError("malformed", "body must be an array of events")
    if len(events) != batch.n:
        raise WireError("malformed", f"header n={batch.n} but the body holds {len(events)} events")
    prev_id = -1
    for i, ev in enumerate(events):  # hot loop: 1000 events per batch, keep it lean
        if type(ev) is not dict or not ev.keys() >= _EVENT_KEYSET:
            raise WireError("malformed", f"event {i} must be a map with id, ts, src, type, data")
        eid = ev["id"]
        if type(eid) is not int or type(ev["ts"]) is not int or eid > _INT64_MAX:
            raise WireError("malformed", f"event {i}: id and ts must be ints")
        if eid <= prev_id:
            raise WireError("malformed", f"event {i}: ids must be non-negative and strictly increasing")
        prev_id = eid
        if ev["src"] not in SOURCES or type(ev["type"]) is not str or type(ev["data"]) is not dict:
            raise WireError("malformed", f"event {i}: bad src, type or data")
    if events[0]["id"] != batch.first or events[-1]["id"] != batch.last:
        raise WireError("malformed", "header first/last do not match the body's event ids")
    return events


def verify_batch(
    batch: Batch,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    topic_ids: tuple[str, str, str] | None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[dict[str, Any]]:
    """Verify a parsed batch and return its events (maps as decoded, unknown keys kept).

    Checks in order: key known, signature, body hash, topic, body shape. `topic_ids` is the
    (tenant, store, device) of the topic it arrived on; None skips that check (offline).
    """
    key = keys.get(batch.kid)
    if key is None:
        raise WireError("unknown-key", f"no public key registered for kid {batch.kid[:32]!r}")
    verify_signature(batch, key)
    if topic_ids is not None and topic_ids != batch.ids:
        raise WireError("topic-mismatch", "header tenant/store/device differ from the topic's")
    return decode_body(batch, limits)


def verify_signature(batch: Batch, key: Ed25519PublicKey) -> None:
    """Authenticate a parsed batch: its signature with `key`, then its body hash.

    WireError("bad-signature") or ("bad-body-hash"). Only after this returns may anything be said
    about the batch to anyone (a receiver never signs a rejection of unauthenticated input).
    """
    try:
        key.verify(batch.s, SIGN_CONTEXT + batch.h)
    except InvalidSignature:
        raise WireError("bad-signature", f"signature does not verify with kid {batch.kid}") from None
    if hashlib.sha256(batch.b).digest() != batch.bh:
        raise WireError("bad-body-hash", "SHA-256 of the body does not match header bh")


def decode_body(batch: Batch, limits: Limits = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """Decompress (within `limits.max_body`) and decode an authenticated batch's events."""
    return _decode_events(batch, _decompress(batch, limits.max_body), limits)


# ---------------------------------------------------------------- acks


@dataclass(slots=True, frozen=True)
class Ack:
    seq: int
    hh: bytes
    ok: bool
    err: str | None = None
    s: bytes | None = None


def ack_signed_message(*, tenant: str, store: str, device: str, seq: int, hh: bytes, ok: bool) -> bytes:
    """The bytes an ack signature covers: ACK_CONTEXT + msgpack([tenant, store, device, seq, hh, ok])."""
    return ACK_CONTEXT + pack([tenant, store, device, seq, hh, ok])


def make_ack(
    *,
    tenant: str,
    store: str,
    device: str,
    seq: int,
    hh: bytes,
    ok: bool,
    err: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> bytes:
    """Encode an ack; signed when the cloud `key` is given. `err` is required when not ok."""
    if len(hh) != 32:
        raise ValueError("hh is 32 bytes")
    if not ok and err is None:
        raise ValueError("a rejection carries an err reason")
    ack: dict[str, Any] = {"seq": seq, "hh": bytes(hh), "ok": ok}
    if not ok:
        ack["err"] = err
    if key is not None:
        msg = ack_signed_message(tenant=tenant, store=store, device=device, seq=seq, hh=hh, ok=ok)
        ack["s"] = key.sign(msg)
    return pack(ack)


def parse_ack(payload: bytes) -> Ack:
    """Decode an ack; WireError("malformed") on anything off. Unknown keys are ignored."""
    if len(payload) > MAX_ACK:
        raise WireError("malformed", f"ack of {len(payload)} bytes exceeds {MAX_ACK}")
    m = _unpack_strict(payload, "ack")
    if type(m) is not dict:
        raise WireError("malformed", "ack must be a map")
    seq, hh, ok, err, s = m.get("seq"), m.get("hh"), m.get("ok"), m.get("err"), m.get("s")
    if not _is_int(seq) or not 0 <= seq <= _INT64_MAX:
        raise WireError("malformed", 'ack "seq" must be an int')
    if type(hh) is not bytes or len(hh) != 32:
        raise WireError("malformed", 'ack "hh" must be bin of 32 bytes')
    if type(ok) is not bool:
        raise WireError("malformed", 'ack "ok" must be bool')
    if err is not None and type(err) is not str:
        raise WireError("malformed", 'ack "err" must be str')
    if s is not None and (type(s) is not bytes or len(s) != 64):
        raise WireError("malformed", 'ack "s" must be bin of 64 bytes')
    return Ack(seq=seq, hh=hh, ok=ok, err=err, s=s)


def verify_ack(ack: Ack, *, tenant: str, store: str, device: str, cloud_key: Ed25519PublicKey) -> bool:
    """True when the ack carries a signature by `cloud_key` over exactly these fields."""
    if ack.s is None:
        return False
    msg = ack_signed_message(tenant=tenant, store=store, device=device, seq=ack.seq, hh=ack.hh, ok=ack.ok)
    try:
        cloud_key.verify(ack.s, msg)
    except InvalidSignature:
        return False
    return True
