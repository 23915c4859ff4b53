"""The device side of downlink-v1 (docs: /work/shared/spec/downlink-v1.md): commands, consent, trust."""
