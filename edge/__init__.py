"""store-edge: edge runtime for in-store IoT."""

__version__ = "0.1.0"
