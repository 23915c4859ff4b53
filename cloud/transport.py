"""The transport seam: how batches reach the ingest core and acks reach the devices.

Design. A transport owns its connection (reconnects with jittered, escalating backoff) and
delivers messages in *groups*: whatever arrived together, at most `max_group`. For each group
it awaits the handler (the ingest core), which returns only after the store transaction
committed, with the acks to send and whether the commit happened:

    async def handler(group: Sequence[Inbound]) -> Settlement

then the transport publishes `settlement.acks` (each to its `{prefix}/.../ack` topic, QoS 1)
and settles the group at its source:

- MQTT (cloud/mqtt.py, any broker; what `edge demo` and a single-store pilot use): the broker
  got its PUBACK on receipt, nothing more to settle; a message lost in a crash before the
  commit is resent by the device, which deletes a batch only on our signed `ok` ack.
- NATS JetStream (durable pull consumer; cloud/cluster/, later): `msg.ack()` for every message
  of the group only when `settlement.committed` is true, and only after the handler returned
  (so after the commit); otherwise `msg.nak(delay)` so JetStream redelivers once the store is
  back. `Inbound.token` carries the JetStream message for that.

A handler that raises means a bug: the transport logs it, settles nothing (JetStream
redelivers after AckWait) and goes on with the next group. `ready` is set while the
transport is subscribed and able to deliver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, frozen=True)
class Inbound:
    """One message as received: its topic (MQTT form, `{prefix}/{t}/{s}/{d}/batch`) and payload."""

    topic: str
    payload: bytes
    token: object = field(default=None, compare=False)  # the transport's handle to settle it; opaque


@dataclass(slots=True, frozen=True)
class Outbound:
    """One ack to publish (QoS 1) on `topic` (MQTT form, `{prefix}/{t}/{s}/{d}/ack`)."""

    topic: str
    payload: bytes


@dataclass(slots=True, frozen=True)
class Settlement:
    """What the handler decided for a group: acks to send, and whether the store committed."""

    acks: Sequence[Outbound]
    committed: bool


Handler = Callable[[Sequence[Inbound]], Awaitable[Settlement]]


class Transport(Protocol):
    """Delivers groups of batch messages to a handler and publishes the acks it returns."""

    @property
    def ready(self) -> asyncio.Event:
        """Set while subscribed (cleared on a disconnect)."""
        ...

    async def run(self, stop: asyncio.Event, handler: Handler) -> None:
        """Deliver groups to `handler` until `stop` is set; settle each group as the module doc says.

        Returns after `stop`, once the group in hand (if any) has been handled and settled.
        """
        ...
