"""downlink-v1 on the wire: signed documents, enrollment, topics, consent shards (pure, no I/O).

Everything here follows /work/shared/spec/downlink-v1.md to the letter: the cloud signs with it,
the device verifies with it, and clouds written by other teams do the same from the text alone.
Parsers of untrusted bytes raise nothing but `DocumentError`, whose `reason` says why (counted by
the caller under that name).

Verification order: size (above `MAX_DOCUMENT` dropped unread), one bounded MessagePack decode
of the envelope and then of `d`, the `kid` must be trusted, the signature must verify; only then
are the topic and the kind-specific fields looked at. So nothing of an unauthenticated document
is acted on, and a forged one costs one bounded decode and one signature check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import EdgeError
from edge.wire.uplink import DEFAULT_PREFIX, ID_RE, kid_of, pack, public_raw

__all__ = [
    "ALL",
    "DEFAULT_PREFIX",
    "DOC_CONTEXT",
    "ENROLLED_MAC_CONTEXT",
    "ENROLL_MAC_CONTEXT",
    "ENROLL_SIG_CONTEXT",
    "LAYERS",
    "MAX_DOCUMENT",
    "MAX_ENROLL",
    "REMOTELY_SETTABLE",
    "Document",
    "DocumentError",
    "DownTopic",
    "EnrollRequest",
    "build_enroll_request",
    "cmd_result_topic",
    "cmd_topic",
    "consent_shard",
    "consent_topic",
    "desired_topic",
    "device_filters",
    "document",
    "effective_hash",
    "enroll_topic",
    "enrolled_topic",
    "merge_layers",
    "parse_down_topic",
    "parse_enroll_request",
    "parse_token",
    "peek_refusal",
    "reported_topic",
    "sign_document",
    "unsettable_paths",
    "verify_document",
    "verify_enrolled",
]

VERSION: Final = 1
ALL: Final = "_all"
DOC_CONTEXT: Final = b"edge-downlink-v1\n"
ENROLL_MAC_CONTEXT: Final = b"edge-enroll-v1\n"
ENROLL_SIG_CONTEXT: Final = b"edge-enroll-sig-v1\n"
ENROLLED_MAC_CONTEXT: Final = b"edge-enrolled-v1\n"
MAX_DOCUMENT: Final = 4 * 1024 * 1024  # payloads above are dropped unread
MAX_ENROLL: Final = 4096  # an enrollment request is ~250 bytes
# decode bounds: a 4 MiB payload must not unfold into millions of objects of any kind
MAX_ITEMS: Final = 1 << 18  # array length (a consent shard of 262,144 pseudonyms) and map size
LAYERS: Final = ("tenant", "store", "device")
Layer = Literal["tenant", "store", "device"]
DocKind = Literal["enrolled", "desired", "consent", "cmd"]
TopicKind = Literal["enroll", "enrolled", "desired", "consent", "cmd", "cmd-result", "reported"]
_DOC_KINDS: Final = ("enrolled", "desired", "consent", "cmd")
_SHARD_RE: Final = re.compile(r"[0-9a-f]{2}")
TOKEN_ID_RE: Final = re.compile(r"[a-z0-9]{8,64}")
TOKEN_SECRET_BYTES: Final = 32
_INT64_MAX: Final = (1 << 63) - 1

# top-level config sections a layer may set, and the keys inside them it may not
REMOTELY_SETTABLE: Final[Mapping[str, frozenset[str]]] = {
    "privacy": frozenset(),
    "buffer": frozenset({"file"}),
    "uplink": frozenset({"broker", "tls", "cloud_public_key"}),
    "drivers": frozenset(),
    "health": frozenset({"listen"}),
    "logging": frozenset(),
}


class DocumentError(EdgeError, ValueError):
    """A downlink message that must be dropped; `reason` names why (a metric label).

    Reasons: too-large, empty, malformed, unsupported-version, untrusted-kid, bad-signature,
    bad-mac, topic-mismatch, invalid (a kind-specific rule).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# -- topics --------------------------------------------------------------------------------


def enroll_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/enroll"


def enrolled_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/enrolled"


def desired_topic(prefix: str, tenant: str, store: str | None = None, device: str | None = None) -> str:
    """The layer's topic: tenant (no store), store (no device) or device."""
    if device is not None and store is None:
        raise ValueError("a device layer needs its store")
    return f"{prefix}/{tenant}/{store or ALL}/{device or ALL}/desired"


def consent_topic(prefix: str, tenant: str, shard: str) -> str:
    if not _SHARD_RE.fullmatch(shard):
        raise ValueError("a shard is two lowercase hex digits")
    return f"{prefix}/{tenant}/{ALL}/{ALL}/consent/{shard}"


def cmd_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/cmd"


def cmd_result_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/cmd-result"


def reported_topic(prefix: str, tenant: str, store: str, device: str) -> str:
    return f"{prefix}/{tenant}/{store}/{device}/reported"


def device_filters(prefix: str, tenant: str, store: str, device: str) -> list[str]:
    """What a device subscribes to: its three layers, its tenant's consent shards, its commands."""
    return [
        desired_topic(prefix, tenant),
        desired_topic(prefix, tenant, store),
        desired_topic(prefix, tenant, store, device),
        f"{prefix}/{tenant}/{ALL}/{ALL}/consent/+",
        cmd_topic(prefix, tenant, store, device),
    ]


@dataclass(slots=True, frozen=True)
class DownTopic:
    """A parsed downlink-v1 topic; store/device are `_all` where the topic has it."""

    tenant: str
    store: str
    device: str
    kind: TopicKind
    shard: str | None = None

    @property
    def layer(self) -> Layer | None:
        """For `desired`: which layer the topic carries."""
        if self.kind != "desired":
            return None
        if self.store == ALL:
            return "tenant"
        return "store" if self.device == ALL else "device"


def parse_down_topic(topic: str, prefix: str) -> DownTopic:
    """A downlink-v1 topic, or DocumentError("topic-mismatch") for anything else."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise DocumentError("topic-mismatch", f"topic not under {prefix!r}")
    parts = topic[len(head):].split("/")
    if len(parts) == 5 and parts[3] == "consent":
        tenant, store, device, _, shard = parts
        if ID_RE.fullmatch(tenant) and store == ALL and device == ALL and _SHARD_RE.fullmatch(shard):
            return DownTopic(tenant, store, device, "consent", shard)
        raise DocumentError("topic-mismatch", "not {prefix}/{tenant}/_all/_all/consent/{shard}")
    if len(parts) != 4:
        raise DocumentError("topic-mismatch", "not a downlink-v1 topic")
    tenant, store, device, kind = parts
    if not ID_RE.fullmatch(tenant):
        raise DocumentError("topic-mismatch", "topic tenant is not a valid id")
    if kind == "desired":
        layered = (store == ALL and device == ALL) or (
            ID_RE.fullmatch(store) is not None and (device == ALL or ID_RE.fullmatch(device) is not None))
        if not layered:
            raise DocumentError("topic-mismatch", "desired topic is not a tenant, store or device layer")
        return DownTopic(tenant, store, device, "desired")
    if kind in ("enroll", "enrolled", "cmd", "cmd-result", "reported"):
        if not (ID_RE.fullmatch(store) and ID_RE.fullmatch(device)):
            raise DocumentError("topic-mismatch", "topic store/device is not a valid id")
        return DownTopic(tenant, store, device, kind)  # type: ignore[arg-type]  # checked just above
    raise DocumentError("topic-mismatch", f"unknown topic kind {kind[:20]!r}")


# -- bounded decoding ------------------------------------------------------------------------

_DECODE_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # a repeated key in signed bytes means different things to different decoders
        raise ValueError("repeated map key")
    return out


def _unpack(data: bytes, what: str, *, max_len: int, max_items: int) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, object_pairs_hook=_unique_pairs,
            max_bin_len=max_len, max_str_len=max_len, max_array_len=max_items, max_map_len=max_items,
            max_ext_len=0,
        )  # fmt: skip
    except _DECODE_ERRORS as exc:
        raise DocumentError("malformed", f"{what} is not valid MessagePack ({type(exc).__name__})") from None
    except RecursionError:
        raise DocumentError("malformed", f"{what} is nested too deeply") from None


def _is_int(v: object) -> TypeGuard[int]:
    return type(v) is int  # bool is an int subclass but another MessagePack type


def _int(doc: Mapping[str, Any], key: str, lo: int, reason: str = "invalid") -> int:
    v = doc.get(key)
    if not _is_int(v) or not lo <= v <= _INT64_MAX:
        raise DocumentError(reason, f"{key!r} must be an int >= {lo}")
    return v


def _str(doc: Mapping[str, Any], key: str, reason: str = "invalid") -> str:
    v = doc.get(key)
    if type(v) is not str:
        raise DocumentError(reason, f"{key!r} must be a str")
    return v


# -- signed documents -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Document:
    """A verified document. `body` is the whole decoded map; `raw` the envelope as received
    (what a device persists and re-verifies at start); `digest` lowercase hex SHA-256 of `d`
    (what audit rows and logs name instead of content)."""

    kind: DocKind
    tenant: str
    store: str
    device: str
    kid: str
    t: int
    body: Mapping[str, Any]
    raw: bytes
    digest: str

    @property
    def ver(self) -> int:
        return int(self.body["ver"])

    @property
    def rev(self) -> int:
        return int(self.body["rev"])


def document(  # noqa: PLR0917 - the spec's order of the common keys
    kind: DocKind, tenant: str, store: str, device: str, kid: str, t: int, **fields: Any
) -> dict[str, Any]:
    """A document map with the common keys (store/device `_all` where the topic has it)."""
    return {"kind": kind, "tenant": tenant, "store": store, "device": device, "kid": kid, "t": t, **fields}


def sign_document(doc: Mapping[str, Any], key: Ed25519PrivateKey, *, mac_secret: bytes | None = None) -> bytes:
    """The envelope {"v": 1, "d", "s"}; with `mac_secret` (kind `enrolled`) also "m"."""
    d = pack(dict(doc))
    env: dict[str, Any] = {"v": VERSION, "d": d, "s": key.sign(DOC_CONTEXT + d)}
    if mac_secret is not None:
        env["m"] = hmac.new(mac_secret, ENROLLED_MAC_CONTEXT + d, hashlib.sha256).digest()
    return pack(env)


@dataclass(slots=True, frozen=True)
class _Opened:
    d: bytes
    s: bytes
    m: bytes | None
    doc: dict[str, Any]


def _open(payload: bytes) -> _Opened:
    if len(payload) == 0:
        raise DocumentError("empty", "empty payload (a cleared retained message) changes nothing")
    if len(payload) > MAX_DOCUMENT:
        raise DocumentError("too-large", f"{len(payload)} bytes > {MAX_DOCUMENT}")
    env = _unpack(payload, "envelope", max_len=MAX_DOCUMENT, max_items=8)
    if not isinstance(env, dict) or not set(env) <= {"v", "d", "s", "m"} or not {"v", "d", "s"} <= set(env):
        raise DocumentError("malformed", "envelope is not a map of v, d, s (and m for enrolled)")
    if not _is_int(env["v"]) or env["v"] != VERSION:
        raise DocumentError("unsupported-version", f"envelope v is not {VERSION}")
    d, s, m = env["d"], env["s"], env.get("m")
    if type(d) is not bytes or type(s) is not bytes or len(s) != 64:
        raise DocumentError("malformed", "d must be bin and s bin of 64 bytes")
    if m is not None and (type(m) is not bytes or len(m) != 32):
        raise DocumentError("malformed", "m must be bin of 32 bytes")
    doc = _unpack(d, "d", max_len=MAX_DOCUMENT, max_items=MAX_ITEMS)
    if not isinstance(doc, dict) or not all(type(k) is str for k in doc):
        raise DocumentError("malformed", "d is not a map with str keys")
    kind = doc.get("kind")
    if kind not in _DOC_KINDS:
        raise DocumentError("malformed", "unknown document kind")
    if m is not None and kind != "enrolled":
        raise DocumentError("malformed", "only an enrolled document carries m")
    for key in ("tenant", "store", "device", "kid"):
        _str(doc, key, "malformed")
    _int(doc, "t", 0, "malformed")
    return _Opened(d, s, m, doc)


def _check_signature(o: _Opened, key: Ed25519PublicKey) -> None:
    try:
        key.verify(o.s, DOC_CONTEXT + o.d)
    except InvalidSignature:
        raise DocumentError("bad-signature", "signature does not verify with the cloud key of that kid") from None


def _check_topic(o: _Opened, topic: DownTopic) -> None:
    doc = o.doc
    if (doc["tenant"], doc["store"], doc["device"]) != (topic.tenant, topic.store, topic.device):
        raise DocumentError("topic-mismatch", "tenant/store/device differ from the topic's")
    if doc["kind"] != topic.kind:
        raise DocumentError("topic-mismatch", f"a {doc['kind']} document on a {topic.kind} topic")


def _check_kind(doc: Mapping[str, Any], topic: DownTopic) -> None:
    kind = doc["kind"]
    if kind == "desired":
        if doc.get("layer") != topic.layer:
            raise DocumentError("invalid", f"layer must be {topic.layer!r} on this topic")
        _int(doc, "ver", 1)
        if not isinstance(doc.get("config"), dict):
            raise DocumentError("invalid", "config must be a map")
    elif kind == "consent":
        if doc.get("shard") != topic.shard:
            raise DocumentError("invalid", "shard differs from the topic's")
        _int(doc, "rev", 1)
        consented = doc.get("consented")
        if not isinstance(consented, list) or not all(type(p) is str for p in consented):
            raise DocumentError("invalid", "consented must be an array of str")
        if any(a >= b for a, b in itertools.pairwise(consented)):
            raise DocumentError("invalid", "consented must be sorted and unique")
        if any(consent_shard(p) != topic.shard for p in consented):
            raise DocumentError("invalid", "a consented pseudonym is not in this shard")
    elif kind == "cmd":
        cid = _str(doc, "id")
        if not 1 <= len(cid) <= 64:
            raise DocumentError("invalid", "id must be 1..64 characters")
        _str(doc, "name")
        if not isinstance(doc.get("args", {}), dict):
            raise DocumentError("invalid", "args must be a map")
        _int(doc, "exp", 0)


def verify_document(
    payload: bytes, *, topic: str, prefix: str, trusted: Mapping[str, Ed25519PublicKey]
) -> Document:
    """A document received on `topic`, verified with the trusted cloud keys (kid -> key).

    For desired, consent and cmd documents (an `enrolled` one: `verify_enrolled`). Raises
    DocumentError; returns only documents every rule of the spec holds for (the desired layer's
    `ver` ordering and config validity are the device's to judge: see edge/downlink/).
    """
    o = _open(payload)
    key = trusted.get(o.doc["kid"])
    if key is None:
        raise DocumentError("untrusted-kid", "kid is not a trusted cloud key")
    _check_signature(o, key)
    where = parse_down_topic(topic, prefix)
    _check_topic(o, where)
    if where.kind == "enrolled":
        raise DocumentError("malformed", "an enrolled document is verified with verify_enrolled")
    _check_kind(o.doc, where)
    return _document(o, payload)


def _document(o: _Opened, payload: bytes) -> Document:
    doc = o.doc
    return Document(kind=doc["kind"], tenant=doc["tenant"], store=doc["store"], device=doc["device"],
                    kid=doc["kid"], t=doc["t"], body=doc, raw=payload, digest=hashlib.sha256(o.d).hexdigest())


def verify_enrolled(
    payload: bytes, *, topic: str, prefix: str, secret: bytes,
    trusted: Mapping[str, Ed25519PublicKey] | None = None,
) -> Document:
    """An `enrolled` answer, trusted only when `m` verifies with the token's secret and the
    signature verifies with the listed cloud key of that kid (or, for a refusal without keys,
    a key in `trusted`). A rogue broker knows no secret, so it cannot plant its own key."""
    o = _open(payload)
    if o.m is None or not hmac.compare_digest(
            o.m, hmac.new(secret, ENROLLED_MAC_CONTEXT + o.d, hashlib.sha256).digest()):
        raise DocumentError("bad-mac", "m does not verify with the token's secret")
    where = parse_down_topic(topic, prefix)
    _check_topic(o, where)
    doc = o.doc
    ok = doc.get("ok")
    if type(ok) is not bool:
        raise DocumentError("invalid", "ok must be a bool")
    keys = doc.get("cloud_keys", [])
    if not isinstance(keys, list) or not all(type(k) is bytes and len(k) == 32 for k in keys):
        raise DocumentError("invalid", "cloud_keys must be an array of 32-byte bin")
    if ok and not keys:
        raise DocumentError("invalid", "an accepted enrollment lists the cloud keys")
    listed = {kid_of(k): Ed25519PublicKey.from_public_bytes(k) for k in keys}
    key = listed.get(doc["kid"]) or (trusted or {}).get(doc["kid"])
    if key is None:
        raise DocumentError("untrusted-kid", "the signer is not among the listed cloud keys")
    _check_signature(o, key)
    if not ok:
        _str(doc, "err")
    return _document(o, payload)


def peek_refusal(payload: bytes, *, topic: str, prefix: str) -> str | None:
    """The `err` of a well-formed refusal on this `enrolled` topic whose `m` is absent, else None.

    UNAUTHENTICATED: a cloud cannot MAC an answer with a secret it does not share with the
    device, so a `bad-mac` refusal (wrong secret, unknown token id) carries no `m`, and anyone
    on the broker could have sent it. Good for telling a technician "check the token", never
    for trusting anything (nothing is pinned on it)."""
    try:
        o = _open(payload)
        _check_topic(o, parse_down_topic(topic, prefix))
    except DocumentError:
        return None
    err = o.doc.get("err")
    if o.m is not None or o.doc.get("ok") is not False or type(err) is not str:
        return None
    return err[:32]


# -- enrollment request (edge -> cloud) -------------------------------------------------------


def parse_token(text: str) -> tuple[str, bytes]:
    """A technician's token `{token_id}.{secret}` -> (token_id, the 32 secret bytes).

    The secret is base32 without padding (case-insensitive, surrounding blanks ignored).
    ValueError says what is wrong and never repeats the secret."""
    token_id, sep, secret = text.strip().partition(".")
    if not sep or not TOKEN_ID_RE.fullmatch(token_id):
        raise ValueError("expected {token_id}.{secret} as `edge-cloud tokens create` prints it")
    padded = secret.upper() + "=" * (-len(secret) % 8)
    try:
        raw = base64.b32decode(padded)
    except (binascii.Error, ValueError):
        raise ValueError("the part after the first '.' is not base32 (check for a typo)") from None
    if len(raw) != TOKEN_SECRET_BYTES:
        raise ValueError(f"the secret is {len(raw)} bytes, expected {TOKEN_SECRET_BYTES} (is the token complete?)")
    return token_id, raw




def _enroll_message(  # noqa: PLR0917 - the spec's array, in its order
    tenant: str, store: str, device: str, token_id: str, pub: bytes, t: int
) -> bytes:
    return pack([tenant, store, device, token_id, pub, t])


def build_enroll_request(
    *, tenant: str, store: str, device: str, token_id: str, secret: bytes, key: Ed25519PrivateKey, t: int
) -> bytes:
    """The enrollment request map: v, token_id, pub, t, mac (token secret), s (device key)."""
    pub = public_raw(key.public_key())
    msg = _enroll_message(tenant, store, device, token_id, pub, t)
    return pack({"v": VERSION, "token_id": token_id, "pub": pub, "t": t,
                 "mac": hmac.new(secret, ENROLL_MAC_CONTEXT + msg, hashlib.sha256).digest(),
                 "s": key.sign(ENROLL_SIG_CONTEXT + msg)})


@dataclass(slots=True, frozen=True)
class EnrollRequest:
    """A request whose device signature verified (it holds the key of `pub`); the cloud still
    checks the token: `verify_mac(secret)`, scope, use, expiry."""

    tenant: str
    store: str
    device: str
    token_id: str
    pub: bytes
    t: int
    mac: bytes

    @property
    def kid(self) -> str:
        return kid_of(self.pub)

    def verify_mac(self, secret: bytes) -> bool:
        msg = _enroll_message(self.tenant, self.store, self.device, self.token_id, self.pub, self.t)
        return hmac.compare_digest(self.mac, hmac.new(secret, ENROLL_MAC_CONTEXT + msg, hashlib.sha256).digest())


def parse_enroll_request(payload: bytes, *, topic: str, prefix: str) -> EnrollRequest:
    """A request received on `{prefix}/{tenant}/{store}/{device}/enroll`; the identity is the topic's."""
    where = parse_down_topic(topic, prefix)
    if where.kind != "enroll":
        raise DocumentError("topic-mismatch", "not an enroll topic")
    if len(payload) > MAX_ENROLL:
        raise DocumentError("too-large", f"{len(payload)} bytes > {MAX_ENROLL}")
    req = _unpack(payload, "request", max_len=MAX_ENROLL, max_items=8)
    if not isinstance(req, dict) or set(req) != {"v", "token_id", "pub", "t", "mac", "s"}:
        raise DocumentError("malformed", "request is not a map of v, token_id, pub, t, mac, s")
    if not _is_int(req["v"]) or req["v"] != VERSION:
        raise DocumentError("unsupported-version", f"request v is not {VERSION}")
    token_id = _str(req, "token_id", "malformed")
    t = _int(req, "t", 0, "malformed")
    pub, mac, s = req["pub"], req["mac"], req["s"]
    if type(pub) is not bytes or len(pub) != 32 or type(mac) is not bytes or len(mac) != 32 \
            or type(s) is not bytes or len(s) != 64:
        raise DocumentError("malformed", "pub, mac, s must be bin of 32, 32 and 64 bytes")
    msg = _enroll_message(where.tenant, where.store, where.device, token_id, pub, t)
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(s, ENROLL_SIG_CONTEXT + msg)
    except (InvalidSignature, ValueError):
        raise DocumentError("bad-signature", "s does not verify with pub") from None
    return EnrollRequest(where.tenant, where.store, where.device, token_id, pub, t, mac)


# -- consent, configuration layers ----------------------------------------------------------


def consent_shard(pseudonym: str) -> str:
    """First byte of SHA-256 over the pseudonym's UTF-8, two lowercase hex digits."""
    return hashlib.sha256(pseudonym.encode("utf-8")).digest()[:1].hex()


def effective_hash(config: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of `config` as canonical JSON: sorted keys, no spaces, UTF-8
    (non-ASCII characters as themselves, not \\u escapes)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge, later layers over earlier: maps merge key by key, any other value (lists
    included) replaces, and a None value removes the key (the lower layer or default applies)."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = _merge({}, value)  # drops nulls inside a new map too
        else:
            out[key] = value
    return out


def unsettable_paths(config: Mapping[str, Any]) -> list[str]:
    """Dotted key paths of a layer's `config` that a layer may not touch (empty: settable)."""
    bad: list[str] = []
    for key, value in config.items():
        excluded = REMOTELY_SETTABLE.get(str(key))
        if excluded is None:
            bad.append(str(key))
        elif isinstance(value, Mapping):
            bad += [f"{key}.{sub}" for sub in value if sub in excluded]
        elif excluded:
            bad.append(str(key))  # replacing the whole section would replace the excluded keys too
    return sorted(bad)
