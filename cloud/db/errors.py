"""Errors of the database tooling; each carries a hint an operator can act on."""

from __future__ import annotations

from edge.errors import EdgeError


class DbError(EdgeError):
    """A migration, registry or token operation failed."""
