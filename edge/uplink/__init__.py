"""The uplink: uplink-v1 wire format (`wire`), offline verification (`verify`) and the
reference receiver (`receiver`). Import the submodule you need; this package imports nothing."""
