"""The cloud side of fleet management (downlink-v1, issue 16); operator guide: docs/fleet.md."""
