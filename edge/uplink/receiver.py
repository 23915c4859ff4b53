"""Moved to the cloud package: `cloud.receiver` (the ingest core is cloud/core.py). Old name kept."""

from cloud.receiver import Receiver, ReceiverStats, receive_main

__all__ = ["Receiver", "ReceiverStats", "receive_main"]
