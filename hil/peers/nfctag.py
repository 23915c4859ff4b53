"""An NFC Forum Type 3 tag emulated over nfcpy's udp transport (tests and the HIL rig).

nfcpy's `udp` driver carries the NFC-F (FeliCa, 212 kbps) exchange as UDP datagrams: a
reader opened as `udp:127.0.0.1:<port>` polls by sending to that port, and a second
`ContactlessFrontend` in card-emulation mode (`clf.connect(card=...)`) listens on it and
answers as a tag. This module is that second side: a Type 3 tag with an NDEF area
(attribute block + data blocks, service 0x000B), served from a thread.

    with EmulatedTag(product_tag(), port) as tag:   # the tag is on the reader
        ...
    tag.place(); tag.lift()                          # put it back, take it away

`lift()` stops answering: the reader's presence check fails, as when a customer takes
the card away. Killing a process running `python -m hil.peers.nfctag --port P --tag
loyalty` makes the tag vanish without a goodbye (what a dying emulator or a tag snatched
mid-read looks like). The tag listens on 0.0.0.0:<port> (nfcpy binds that way).

What the udp transport cannot do: it has no reader hardware, so nothing here can make
the *reader* fail; to a reader, an emulator that vanishes is a tag that was lifted.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import ndef

DEFAULT_IDM = bytes.fromhex("03FEFFE011223344")  # not 01FE.. (that would announce NFC-DEP)
# PMm: IC code 0xFF (no FeliCa product: plain Type 3 tag); 0xFF timing bytes give the
# reader its longest timeouts, so a busy test machine does not look like a flaky tag
PMM = bytes.fromhex("00FFFFFFFFFFFFFF")
SYSTEM_CODE = bytes.fromhex("12FC")  # NFC Forum NDEF system
BLOCK = 16
NDEF_READ_SERVICE = 0x000B
NDEF_WRITE_SERVICE = 0x0009


def attribute_block(ln: int, nmaxb: int, *, nbr: int = 4, ver: int = 0x10, checksum: int | None = None) -> bytes:
    """The Type 3 tag attribute information block (block 0): version, blocks per read,
    max NDEF blocks, read-only, NDEF length `ln`; checksum over bytes 0-13 unless given."""
    a = bytearray(BLOCK)
    a[0], a[1], a[2] = ver, nbr, 1
    a[3:5] = struct.pack(">H", nmaxb)
    a[9], a[10] = 0x00, 0x00  # WriteF: done; RWFlag: read-only
    a[11:14] = struct.pack(">I", ln)[1:]
    a[14:16] = struct.pack(">H", sum(a[0:14]) if checksum is None else checksum)
    return bytes(a)


def ndef_area(message: bytes) -> bytes:
    """Attribute block + `message` padded to whole blocks (one spare block)."""
    blocks = (len(message) + BLOCK - 1) // BLOCK + 1
    return attribute_block(len(message), blocks) + message.ljust(blocks * BLOCK, b"\x00")


def encode(*records: Any) -> bytes:
    """An NDEF message of ndeflib records."""
    return b"".join(ndef.message_encoder(list(records)))


@dataclass(slots=True, frozen=True)
class TagImage:
    """What the emulated tag holds: its IDm (the UID a reader sees) and its NDEF area."""

    idm: bytes
    area: bytes

    def __repr__(self) -> str:
        return f"TagImage(area={len(self.area)} bytes)"


def product_tag(
    gtin: str = "09506000134352",
    batch: str | None = "ABC123",
    serial: str | None = "12345",
    *,
    host: str = "id.gs1.org",
    idm: bytes = DEFAULT_IDM,
) -> TagImage:
    """A product tag: a GS1 Digital Link URI and a Text record with the product name."""
    uri = f"https://{host}/01/{gtin}" + (f"/10/{batch}" if batch else "") + (f"/21/{serial}" if serial else "")
    return TagImage(idm, ndef_area(encode(ndef.UriRecord(uri), ndef.TextRecord("Oat drink 1 l", "en"))))


def text_tag(text: str = "Welcome to ACME", *, idm: bytes = DEFAULT_IDM) -> TagImage:
    """A tag with one plain Text record."""
    return TagImage(idm, ndef_area(encode(ndef.TextRecord(text, "en"))))


def loyalty_tag(
    number: str, *, prefix: str = "https://club.acme-retail.example/card/", idm: bytes = DEFAULT_IDM
) -> TagImage:
    """A loyalty card: a URI record with the member number after `prefix`."""
    return TagImage(idm, ndef_area(encode(ndef.UriRecord(prefix + number))))


def mime_tag(mime: str, payload: bytes, *, idm: bytes = DEFAULT_IDM) -> TagImage:
    """A tag with one MIME record (e.g. a loyalty card app's own type)."""
    return TagImage(idm, ndef_area(encode(ndef.Record(mime, None, payload))))


def malformed_tag(*, idm: bytes = DEFAULT_IDM) -> TagImage:
    """A correctly framed NDEF area whose message is garbage: a URI record header that
    claims a 255-byte payload, followed by 13 bytes."""
    return TagImage(idm, ndef_area(b"\xd1\x01\xffU\x04" + b"example.com/x"))


def raw_tag(area: bytes, *, idm: bytes = DEFAULT_IDM) -> TagImage:
    """Any NDEF area bytes, e.g. a bad attribute checksum (`attribute_block(..., checksum=0)`)."""
    return TagImage(idm, area)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmulatedTag:
    """One emulated Type 3 tag answering readers on `udp:127.0.0.1:<port>`, in a thread.

    `activations` counts how often a reader activated it; `blocks_read` the data blocks
    it served.
    """

    def __init__(self, image: TagImage, port: int, *, listen_timeout: float = 0.5) -> None:
        self.image = image
        self.port = port
        self._listen_timeout = listen_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.activations = 0
        self.blocks_read = 0

    def __enter__(self) -> EmulatedTag:
        self.place()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.lift()

    @property
    def present(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def place(self, image: TagImage | None = None) -> None:
        """Put the tag (or another `image`) on the reader: start answering."""
        if self.present:
            raise RuntimeError("the tag is already on the reader; lift() it first")
        if image is not None:
            self.image = image
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"nfctag-{self.port}", daemon=True)
        self._thread.start()

    def lift(self, timeout: float = 10.0) -> None:
        """Take the tag away: stop answering and release the port."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            self._poke()  # ends a blocking wait for the reader's next command
            thread.join(0.2)
        if thread.is_alive():
            raise RuntimeError(f"emulated tag on port {self.port} did not stop within {timeout} s")
        self._thread = None

    def _poke(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"RFOFF", ("127.0.0.1", self.port))  # nfcpy udp: the peer's field went off

    def _serve(self) -> None:
        import nfc

        clf = nfc.ContactlessFrontend(f"udp:127.0.0.1:{self.port}")
        options = {
            "on-startup": self._on_startup,
            "on-connect": self._on_connect,
            "timeout": self._listen_timeout,
        }
        try:
            while not self._stop.is_set():
                clf.connect(card=options, terminate=self._stop.is_set)
        finally:
            clf.close()

    def _on_startup(self, target: Any) -> Any:
        target.brty = "212F"
        target.sensf_res = b"\x01" + self.image.idm + PMM + SYSTEM_CODE
        return target

    def _on_connect(self, tag: Any) -> bool:
        self.activations += 1
        tag.add_service(NDEF_WRITE_SERVICE, self._read_block, None)
        tag.add_service(NDEF_READ_SERVICE, self._read_block, None)
        return True

    def _read_block(self, block: int, _rb: bool, _re: bool) -> bytes | None:
        area = self.image.area
        if (block + 1) * BLOCK > len(area):
            return None  # nfcpy answers with an error status
        self.blocks_read += 1
        return area[block * BLOCK : (block + 1) * BLOCK]


_TAGS = ("product", "text", "loyalty", "malformed")


def _image(args: argparse.Namespace) -> TagImage:
    idm = bytes.fromhex(args.idm)
    if args.tag == "product":
        return product_tag(args.gtin, idm=idm)
    if args.tag == "text":
        return text_tag(idm=idm)
    if args.tag == "loyalty":
        return loyalty_tag(args.number, idm=idm)
    return malformed_tag(idm=idm)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hil.peers.nfctag --port P --tag loyalty`: serve one tag until SIGTERM or --for."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tag", choices=_TAGS, default="product")
    p.add_argument("--idm", default=DEFAULT_IDM.hex(), help="8-byte IDm (the UID readers see), hex")
    p.add_argument("--gtin", default="09506000134352")
    p.add_argument("--number", default="987654321098", help="loyalty number on a loyalty tag")
    p.add_argument("--for", dest="seconds", type=float, default=None, help="lift the tag after this long")
    args = p.parse_args(argv)
    done = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tag = EmulatedTag(_image(args), args.port)
    with tag:
        print(f"nfctag ready port={args.port} tag={args.tag}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait(args.seconds)
    print(f"nfctag lifted activations={tag.activations}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
