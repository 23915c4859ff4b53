"""The device's uplink: batching, connection, discovery, the uplink service, offline verification
(`verify`). The wire format is edge/wire/uplink.py; the receiver lives in cloud/. Import the
submodule you need; this package imports nothing."""
