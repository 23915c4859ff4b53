"""Errors of the cluster tooling; every one carries a hint an operator can act on."""

from __future__ import annotations

from edge.errors import EdgeError


class ClusterError(EdgeError):
    """A local NATS node or PostgreSQL could not be configured, started or stopped."""
