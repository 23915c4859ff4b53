"""Moved to `cloud.config`. Old name kept for code written against it."""

from cloud.config import ReceiverConfig, load_receiver_config

__all__ = ["ReceiverConfig", "load_receiver_config"]
