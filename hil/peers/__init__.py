"""Simulated peers of the real drivers, shared by tests/ and the rig's `--target sim`:
BlueZ on a private D-Bus, an NFC tag over nfcpy's udp transport, a POS on a pty pair,
and a real Mosquitto."""
