"""The durable event buffer (SQLite, WAL): group commit, bounds, retention, sealed batches."""

from __future__ import annotations

from edge.buffer.batches import SealConflict
from edge.buffer.salvage import OpenReport
from edge.buffer.schema import SealedBatch, StoredEvent
from edge.buffer.stats import BufferStats, SourceBacklog, iter_events, read_stats
from edge.buffer.store import Buffer

__all__ = [
    "Buffer",
    "BufferStats",
    "OpenReport",
    "SealConflict",
    "SealedBatch",
    "SourceBacklog",
    "StoredEvent",
    "iter_events",
    "read_stats",
]
