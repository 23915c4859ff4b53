"""Store analytics on the device: KPIs per interval from the pipeline's events (see docs/analytics.md)."""

from __future__ import annotations
