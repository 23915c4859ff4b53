"""Acks: the last stage of the ingest core. Every ack is signed by the cloud key.

Design. An ack binds (tenant, store, device, seq, hh, ok) under the cloud's Ed25519 key
(`b"edge-ack-v1\\n" + msgpack([...])`, uplink-v1); a device deletes a batch only on an `ok`
ack that verifies with the cloud public key it trusts. The receiver refuses to start without
a cloud key, so there is no unsigned mode. Which batches get an ack at all is decided by the
core: stored or already stored (ok), and rejections of AUTHENTICATED input only
(cloud/verify.py); acks that claim new data go out only after the store committed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.store import Ids
from cloud.transport import Outbound
from edge.wire.uplink import ack_topic, make_ack


@dataclass(slots=True, frozen=True)
class AckSigner:
    key: Ed25519PrivateKey
    prefix: str

    def ack(self, ids: Ids, seq: int, hh: bytes, *, ok: bool, err: str | None = None) -> Outbound:
        payload = make_ack(tenant=ids[0], store=ids[1], device=ids[2], seq=seq, hh=hh, ok=ok,
                           err=None if ok else err, key=self.key)  # fmt: skip
        return Outbound(ack_topic(self.prefix, *ids), payload)


@dataclass(slots=True)
class DuplicateAcks:
    """At most one "already stored" ack per (identity, seq) every `interval` seconds.

    The core answers a stored batch's resend before authenticating it (issue 14), so anybody who
    saw a batch on the broker can replay it and make the receiver sign and send an ack, as often
    as they like. This bounds that to one ack per interval per (identity, seq); a device's own
    resend comes after its `uplink.ack_timeout` (15 s by default), so keep `interval` below that and
    a genuine resend is always answered. Bounded: the `capacity` most recent keys (LRU); a key
    evicted is answered again, at worst."""

    interval: float = 5.0
    capacity: int = 65_536
    _last: OrderedDict[tuple[Ids, int], float] = field(default_factory=OrderedDict)

    def allow(self, ids: Ids, seq: int, now: float) -> bool:
        key = (ids, seq)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)
        return True
