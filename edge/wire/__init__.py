"""The wire contracts, in one place both sides import: the device (edge/) and the cloud (cloud/).

`edge.wire.uplink` is uplink-v1 (/work/shared/spec/uplink-v1.md, carried in docs/spec/): batches
and acks. downlink-v1 goes beside it as `edge.wire.downlink`. Pure code: bytes in, values out; no
I/O, nothing from the cloud package, so a device installs without the cloud side.
"""
