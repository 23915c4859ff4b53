"""`--target hw`: the rig's real devices facing the daemon's real devices (hil/README.md).

- POS: the rig writes receipts (ESC/POS, python-escpos) into its end of a USB-serial
  null-modem cable; the daemon's `serial` backend reads the other end.
- NFC: a PN532 in target mode (nfcpy `ContactlessFrontend.connect(card=...)`) emulates a
  Type 3 tag carrying the NDEF record of each tap, facing the daemon's reader.
- BLE: a second Bluetooth dongle on the rig advertises through raw HCI commands
  (`hcitool -i hciN cmd`, BlueZ's tools): one random static address per phone, iBeacon
  frames for beacons; the daemon scans with its own adapter. `ble.quiet` soft-blocks the
  daemon's adapter (`rfkill block`), `ble.back` unblocks it.

Each adapter's `unavailable()` says exactly what is missing (not configured, no such device,
cannot open it, tool not installed); the runner then skips that kind's steps, or the whole
scenario when nothing it needs is there. Nothing here has run against real hardware in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hil.peer import APPLIED, Ledger, Outcome, PeerMode
from hil.receipts import compose, escpos_bytes
from hil.scenario import (
    Beacon,
    BleBack,
    BleQuiet,
    Kind,
    NfcTap,
    PhoneAppear,
    PhoneLeave,
    PhoneMove,
    PosGarbage,
    PosReceipt,
    Scenario,
    Step,
)


@dataclass(slots=True, frozen=True)
class Rig:
    """Which device faces which; from `--rig FILE` (YAML with these keys)."""

    pos_port: str | None = None  # the daemon's POS port, e.g. /dev/serial/by-id/usb-FTDI_..._A-if00-port0
    pos_rig_port: str | None = None  # the rig's end of the null-modem cable
    pos_baudrate: int = 9600
    nfc_reader: str | None = None  # the daemon's reader (nfcpy path), e.g. usb:054c:06c3
    nfc_target: str | None = None  # the rig's PN532 in target mode, e.g. tty:USB2:pn532
    ble_adapter: str = "hci0"  # the daemon's scanner
    ble_advertiser: str | None = None  # the rig's advertiser dongle, e.g. hci1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Rig:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of rig settings")
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known, extra={k: v for k, v in doc.items() if k not in known})


def _port_problem(port: str | None, what: str) -> str | None:
    if not port:
        return f"{what} not configured (rig file)"
    if not Path(port).exists():
        return f"{what} {port} does not exist (cable unplugged?)"
    if not os.access(port, os.R_OK | os.W_OK):
        return f"{what} {port} is not readable and writable by this user (dialout group?)"
    return None


class SerialPosHw:
    """Receipts into the rig's end of a null-modem cable."""

    kind: Kind = "pos"
    mode: PeerMode = "hardware"

    def __init__(self, scenario: Scenario, rig: Rig) -> None:
        self.description = f"USB-serial null-modem {rig.pos_rig_port} -> {rig.pos_port}"
        self._sc, self._rig = scenario, rig
        self._ledger = Ledger(exact=True)
        self._rng = random.Random(0x9051)
        self._n = 0
        self._port: Any = None

    def unavailable(self) -> str | None:
        return _port_problem(self._rig.pos_port, "daemon POS port") or _port_problem(
            self._rig.pos_rig_port, "rig POS port")

    def driver_config(self) -> Any:
        return [{"name": self._sc.tills[0], "backend": "serial", "port": self._rig.pos_port,
                 "baudrate": self._rig.pos_baudrate, "framing": "escpos"}]  # fmt: skip

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        import serial

        self._port = serial.Serial(self._rig.pos_rig_port, self._rig.pos_baudrate, timeout=1, write_timeout=5)

    async def apply(self, step: Step) -> Outcome:
        if self._port is None:
            return Outcome("unsupported", "rig POS port not open")
        if isinstance(step, PosReceipt):
            self._n += 1
            printed = compose(step, self._n, self._rng)
            await asyncio.to_thread(self._write, escpos_bytes(printed))
            self._ledger.emit("pos.receipt", printed.identifiers)
            return APPLIED
        if isinstance(step, PosGarbage):
            await asyncio.to_thread(self._write, random.Random(step.seed).randbytes(step.size))
            return APPLIED
        return Outcome("unsupported", f"{step.do} has no POS meaning")

    def _write(self, data: bytes) -> None:
        self._port.write(data)
        self._port.flush()

    async def quiesce(self) -> None:
        return None

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        return self._ledger

    async def stop(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None


class Pn532NfcHw:
    """A PN532 in target mode emulating a Type 3 tag for each tap."""

    kind: Kind = "nfc"
    mode: PeerMode = "hardware"

    def __init__(self, scenario: Scenario, rig: Rig) -> None:
        self.description = f"PN532 target {rig.nfc_target} facing reader {rig.nfc_reader}"
        self._rig = rig
        self._ledger = Ledger(exact=True)
        self._rng = random.Random(0x9052)
        self._cards: dict[str, str] = {}

    def unavailable(self) -> str | None:
        if not self._rig.nfc_reader or not self._rig.nfc_target:
            return "nfc_reader / nfc_target not configured (rig file)"
        try:
            import nfc

            clf = nfc.ContactlessFrontend()
            found = clf.open(self._rig.nfc_target)
            clf.close()
        except (OSError, ImportError) as exc:
            return f"cannot open the PN532 at {self._rig.nfc_target}: {exc}"
        return None if found else f"no PN532 found at {self._rig.nfc_target}"

    def driver_config(self) -> Any:
        return {"enabled": True, "backend": "nfcpy", "device": self._rig.nfc_reader}

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        return None

    async def apply(self, step: Step) -> Outcome:
        if not isinstance(step, NfcTap):
            return Outcome("unsupported", f"{step.do} has no NFC meaning")
        import ndef

        if step.tag == "product":
            body = "40" + "".join(str(self._rng.randrange(10)) for _ in range(10))
            record = ndef.UriRecord(f"https://id.gs1.org/01/0{body}0")
        else:
            label = step.card or f"card{len(self._cards)}"
            number = self._cards.setdefault(label, "7" + "".join(str(self._rng.randrange(10)) for _ in range(11)))
            self._ledger.identifiers.append(("loyalty_id", number))
            record = ndef.TextRecord(f"LOYALTY:{number}")
        ok = await asyncio.to_thread(self._emulate, b"".join(ndef.message_encoder([record])))
        if not ok:
            return Outcome("unsupported", "the reader did not read the emulated tag within 5 s")
        self._ledger.emit("nfc.tap")
        return APPLIED

    def _emulate(self, ndef_bytes: bytes) -> bool:
        """One tap: listen as a Type 3 tag (as nfcpy's `tagtool.py emulate tt3`) until read."""
        import nfc

        idm = bytes([0x02, 0xFE]) + self._rng.randbytes(6)
        self._ledger.identifiers.append(("nfc_uid", idm.hex()))
        attr = bytearray(16)
        attr[0], attr[1], attr[2] = 0x10, 4, 1  # version 1.0, nbr 4, nbw 1
        blocks = (len(ndef_bytes) + 15) // 16
        attr[3:5] = blocks.to_bytes(2, "big")
        attr[10] = 1  # read/write
        attr[11:14] = len(ndef_bytes).to_bytes(3, "big")
        attr[14:16] = (sum(attr[0:14]) & 0xFFFF).to_bytes(2, "big")
        data = bytes(attr) + ndef_bytes + bytes(blocks * 16 - len(ndef_bytes))
        target = nfc.clf.LocalTarget("212F")
        target.sensf_res = bytes.fromhex("01") + idm + bytes.fromhex("03014B024F4993FF12FC")
        read = False

        def on_connect(tag: Any) -> bool:
            nonlocal read

            def read_block(block: int, _rb: int, _re: int) -> bytes:
                nonlocal read
                read = True
                return data[block * 16 : block * 16 + 16]

            tag.add_service(0x000B, read_block, lambda *_: True)
            return True

        clf = nfc.ContactlessFrontend(self._rig.nfc_target)
        try:
            clf.connect(card={"on-startup": lambda _t: target, "on-connect": on_connect},
                        terminate=lambda: read)  # fmt: skip
        finally:
            clf.close()
        return read

    async def quiesce(self) -> None:
        return None

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        return self._ledger

    async def stop(self) -> None:
        return None


class HciBleHw:
    """A second dongle advertising through raw HCI LE commands."""

    kind: Kind = "ble"
    mode: PeerMode = "hardware"

    def __init__(self, scenario: Scenario, rig: Rig) -> None:
        self.description = f"BLE advertiser {rig.ble_advertiser} facing scanner {rig.ble_adapter}"
        self._rig = rig
        self._ledger = Ledger(exact=False, notes=["radio: counts of advertisements seen are not exact"])
        self._rng = random.Random(0x9053)
        self._phones: dict[str, str] = {}
        self._seen: Counter[str] = Counter()

    def unavailable(self) -> str | None:
        adv = self._rig.ble_advertiser
        if not adv:
            return "ble_advertiser not configured (rig file)"
        for tool in ("hcitool", "rfkill"):
            if shutil.which(tool) is None:
                return f"{tool} not installed (apt-get install bluez rfkill)"
        for hci in (adv, self._rig.ble_adapter):
            if not Path(f"/sys/class/bluetooth/{hci}").exists():
                return f"no Bluetooth adapter {hci}"
        return None

    def driver_config(self) -> Any:
        return {"enabled": True, "backend": "bleak", "adapter": self._rig.ble_adapter}

    def daemon_env(self) -> Mapping[str, str]:
        return {}

    async def start(self) -> None:
        return None

    def _hci(self, ogf: int, ocf: int, params: bytes) -> None:
        args = ["hcitool", "-i", str(self._rig.ble_advertiser), "cmd", f"0x{ogf:02x}", f"0x{ocf:04x}"]
        subprocess.run(args + [f"{b:02x}" for b in params], capture_output=True, check=True, timeout=5)

    def _advertise(self, address: str | None, payload: bytes) -> None:
        self._hci(0x08, 0x000A, b"\x00")  # advertising off while changing it
        if address is not None:
            self._hci(0x08, 0x0005, bytes.fromhex(address.replace(":", ""))[::-1])  # LE set random address
        # 100 ms non-connectable undirected, own address random, all channels
        self._hci(0x08, 0x0006, bytes.fromhex("a000a000" "03" "01" "00" "000000000000" "07" "00"))
        self._hci(0x08, 0x0008, bytes([len(payload)]) + payload.ljust(31, b"\0"))
        self._hci(0x08, 0x000A, b"\x01")

    async def apply(self, step: Step) -> Outcome:
        try:
            return await asyncio.to_thread(self._apply, step)
        except (subprocess.SubprocessError, OSError) as exc:
            return Outcome("unsupported", f"HCI command failed: {type(exc).__name__}")

    def _apply(self, step: Step) -> Outcome:  # noqa: PLR0911 - one return per kind of step
        if isinstance(step, PhoneAppear):
            top = 0xC0 | self._rng.randrange(64)  # random static: top bits 0b11
            addr = ":".join(f"{b:02X}" for b in bytes([top]) + self._rng.randbytes(5))
            self._phones[step.phone] = addr
            self._advertise(addr, bytes.fromhex("020106" "020a08"))
            self._ledger.emit("presence.enter", [("ble_address", addr)])
            return APPLIED
        if isinstance(step, PhoneMove):
            return Outcome("approximated", "RSSI on a real radio follows distance, not the scenario")
        if isinstance(step, PhoneLeave):
            self._hci(0x08, 0x000A, b"\x00")
            return Outcome("applied", "advertising stopped; presence.exit follows the driver's timeout")
        if isinstance(step, Beacon):
            major, minor = 100, sum(step.beacon.encode()) % 65535
            frame = bytes.fromhex("020106" "1aff4c000215") + bytes(16) + major.to_bytes(2, "big") + minor.to_bytes(
                2, "big") + b"\xc5"
            self._advertise(None, frame)
            return Outcome("approximated", "iBeacon frames carry no battery level; needs Eddystone-TLM")
        if isinstance(step, BleQuiet | BleBack):
            action = "block" if isinstance(step, BleQuiet) else "unblock"
            found = sorted(Path(f"/sys/class/bluetooth/{self._rig.ble_adapter}").glob("rfkill*"))
            if not found:
                return Outcome("unsupported", f"{self._rig.ble_adapter} has no rfkill switch")
            subprocess.run(["rfkill", action, found[0].name.removeprefix("rfkill")],
                           capture_output=True, check=True, timeout=5)  # fmt: skip
            return Outcome("applied", f"rfkill {action} {self._rig.ble_adapter}")
        return Outcome("unsupported", f"{step.do} has no BLE meaning")

    async def quiesce(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            await asyncio.to_thread(self._hci, 0x08, 0x000A, b"\x00")

    async def ledger(self, received_by_src: Mapping[str, int]) -> Ledger:
        return self._ledger

    async def stop(self) -> None:
        await self.quiesce()


def hardware_peer(kind: str, scenario: Scenario, rig: Rig) -> SerialPosHw | Pn532NfcHw | HciBleHw:
    if kind == "pos":
        return SerialPosHw(scenario, rig)
    if kind == "nfc":
        return Pn532NfcHw(scenario, rig)
    return HciBleHw(scenario, rig)


__all__ = ["HciBleHw", "Pn532NfcHw", "Rig", "SerialPosHw", "hardware_peer"]
