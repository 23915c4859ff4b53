"""Moved to `edge.wire.uplink` (the one wire module both the device and the cloud import).

This name stays so code written against it keeps working; new code imports `edge.wire.uplink`.
"""

from edge.wire.uplink import *  # noqa: F403 - a re-export of the whole module under its old name
