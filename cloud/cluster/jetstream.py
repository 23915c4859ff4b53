"""The cloud's JetStream layout: two streams and one shared durable pull consumer on each.

EDGE_BATCHES captures every device's uplink batches (`{p}.*.*.*.batch`, `p` the subject form
of the uplink prefix). It is a work queue: a batch leaves the stream when a worker acks it,
and a worker acks only after the batch's PostgreSQL transaction committed, so the stream holds
exactly what is not yet stored. Replicated on 3 nodes with file storage: a batch JetStream took
survives the loss of any one node. Bounded by bytes and age with `discard: new`: when full, the
stream refuses new batches instead of dropping unstored ones; the device keeps every batch until
its signed ack and resends, so a refusal is backpressure, not loss.

EDGE_CONTROL captures the small edge -> cloud documents: `status` (retained, last will),
`reported`, `cmd-result` and `enroll` requests. Limits retention (they are state, not work):
at most `control_per_subject` messages per device and kind, and `control_max_age`, so one
chatty device cannot crowd out the others. Its own durable consumer `control` serves the
workers that keep the registry and the fleet view (issue 16).

One durable pull consumer per stream (`ingest`, `control`) is shared by every worker on any
machine: JetStream hands each message to one of them, redelivers what is not acked within
`ack_wait`, keeps at most `max_ack_pending` in flight across all workers, and gives up after
`max_deliver` attempts (a poison batch then stays in the stream, visible as consumer lag and a
max-deliveries advisory, while its device still resends it). Everything is created or updated
idempotently by `ensure`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from cloud.cluster.natsconf import subject_prefix

BATCH_STREAM = "EDGE_BATCHES"
CONTROL_STREAM = "EDGE_CONTROL"
BATCH_CONSUMER = "ingest"
CONTROL_CONSUMER = "control"
CONTROL_KINDS = ("status", "reported", "cmd-result", "enroll")
DAY = 86_400.0


@dataclass(slots=True, frozen=True)
class Layout:
    """Every tunable of the two streams and their consumers (defaults fit a chain of ~1,000 stores)."""

    prefix: str = "edge/v1"
    replicas: int = 3
    batch_max_bytes: int = 2 * 1024**3  # unstored batches the cluster holds before refusing new ones
    batch_max_age: float = 7 * DAY  # a batch nobody stored within a week is dropped (device still holds it)
    max_msg_size: int = 8 * 1024 * 1024  # = the broker's max_payload
    control_max_bytes: int = 256 * 1024**2
    control_max_age: float = 30 * DAY
    control_per_subject: int = 64
    ack_wait: float = 30.0  # s a worker may hold a batch before it is redelivered to another
    max_ack_pending: int = 4096  # batches in flight across all workers
    max_deliver: int = 50  # attempts before a batch is left aside (with an advisory)

    @property
    def batch_subject(self) -> str:
        return f"{subject_prefix(self.prefix)}.*.*.*.batch"

    @property
    def control_subjects(self) -> list[str]:
        p = subject_prefix(self.prefix)
        return [f"{p}.*.*.*.{kind}" for kind in CONTROL_KINDS]

    def batch_stream(self) -> StreamConfig:
        return StreamConfig(
            name=BATCH_STREAM,
            description="uplink-v1 batches not yet stored in PostgreSQL",
            subjects=[self.batch_subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_bytes=self.batch_max_bytes,
            max_age=self.batch_max_age,
            max_msg_size=self.max_msg_size,
            discard=DiscardPolicy.NEW,
        )

    def control_stream(self) -> StreamConfig:
        return StreamConfig(
            name=CONTROL_STREAM,
            description="status, reported, cmd-result and enroll documents from the edges",
            subjects=self.control_subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_bytes=self.control_max_bytes,
            max_age=self.control_max_age,
            max_msgs_per_subject=self.control_per_subject,
            max_msg_size=1024 * 1024,
            discard=DiscardPolicy.OLD,
        )

    def consumer(self, name: str) -> ConsumerConfig:
        return ConsumerConfig(
            name=name,
            durable_name=name,
            description="shared by every ingest worker",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            max_deliver=self.max_deliver,
            max_waiting=512,  # pull requests waiting at once (workers x their concurrent fetches)
            num_replicas=self.replicas,
        )


async def ensure(nc: NATS, layout: Layout) -> None:
    """Create or update both streams and both durable consumers (safe to run any number of times)."""
    js = nc.jetstream()
    for stream, consumer in ((layout.batch_stream(), BATCH_CONSUMER), (layout.control_stream(), CONTROL_CONSUMER)):
        name = stream.name or ""
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(stream)
        else:
            await js.update_stream(stream)
        await js.add_consumer(name, layout.consumer(consumer))


async def pending(nc: NATS, stream: str = BATCH_STREAM, consumer: str = BATCH_CONSUMER) -> int:
    """Consumer lag: messages not yet delivered plus delivered but not yet acked."""
    info = await nc.jetstream().consumer_info(stream, consumer)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
