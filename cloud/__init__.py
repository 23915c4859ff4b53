"""store-edge cloud side: ingest, registry and fleet management for a chain of stores."""

from edge import __version__

__all__ = ["__version__"]
