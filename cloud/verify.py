"""Parse and verify: the first stage of the ingest core, and the only one that sees raw bytes.

Design. A payload is parsed ONCE, bounded before work (`edge.wire.uplink.Limits`: size first,
then a MessagePack decode whose bin/str/array/map lengths are capped), into a `Batch`. The
core then asks the store whether that exact batch (identity, seq, hh) is already stored and,
if so, answers "already stored" before any other check. Otherwise `authenticate` runs, in
this order:

1. identity: the key registered for the TOPIC's identity with the batch's kid
   (cloud/identity.py), else `unknown-key`;
2. signature over `b"edge-batch-v1\\n" + h`, else `bad-signature`;
3. SHA-256 of the body equals `bh`, else `bad-body-hash`.

Until all three passed the input is unauthenticated: anybody on the broker can publish it, and
its hh may be a genuine in-flight batch's hh with a forged body or envelope. Such input gets NO
ack at all (counted and logged): the receiver never signs a rejection carrying the hh of input
it could not authenticate. After authentication, `check` finds the spec's remaining faults,
which the device itself produced and is told about in a signed rejection: the header's identity
differs from the topic's (`topic-mismatch`, only possible when one key is registered for two
identities), and a body that does not decode as the header says (`malformed`, within
`max_body` and `max_events`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud.identity import DeviceKeys, Ids
from edge.errors import WireError
from edge.wire.uplink import Batch, Limits, decode_body, parse_batch, verify_signature


@dataclass(slots=True, frozen=True)
class Refusal(Exception):
    """Why a batch was refused. Which stage raised it decides whether it may be answered: only
    `check`'s refusals (after `authenticate` passed) get a signed rejection (cloud/core.py)."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def parse(payload: bytes, limits: Limits) -> Batch:
    """Bounded, single parse; Refusal (never answered) when the bytes are not a batch."""
    try:
        return parse_batch(payload, limits=limits)
    except WireError as exc:
        raise Refusal(exc.reason, str(exc)) from None


def authenticate(batch: Batch, topic_ids: Ids, keys: DeviceKeys) -> None:
    """Key bound to the topic's identity, signature, body hash; Refusal (never answered) if not."""
    key = keys.key_for(topic_ids, batch.kid)
    if key is None:
        raise Refusal(
            "unknown-key",
            f"kid {batch.kid[:32]!r} is not the key registered for {'/'.join(topic_ids)}",
        )
    try:
        verify_signature(batch, key)
    except WireError as exc:
        raise Refusal(exc.reason, str(exc)) from None


def check(batch: Batch, topic_ids: Ids, limits: Limits) -> list[dict[str, Any]]:
    """After `authenticate`: topic match and body; returns the events. Refusal (answered, signed)."""
    if batch.ids != topic_ids:
        raise Refusal("topic-mismatch", "header tenant/store/device differ from the topic's")
    try:
        return decode_body(batch, limits)
    except WireError as exc:
        raise Refusal(exc.reason, str(exc)) from None
