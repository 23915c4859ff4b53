"""POS framers (pure, incremental): lines grouped into receipts, STX/ETX with LRC and
ACK/NAK, the ESC/POS receipt tap (python-escpos output), JSON lines. Bad input is reported
as problems without content, chunking never changes the result, buffers stay bounded, and
no input makes a framer raise (hypothesis, derandomized)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from escpos.printer import Dummy
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from drivers.pos.framing import (
    EscPosFramer,
    Framer,
    JsonFrame,
    JsonLinesFramer,
    LinesFramer,
    Output,
    Problem,
    Reply,
    StxEtxFramer,
    TextFrame,
)
from hil.peers.pos import Item, receipt_job, stx_frame


def feed_all(framer: Framer, chunks: Sequence[bytes]) -> list[Output]:
    out: list[Output] = []
    for c in chunks:
        out += framer.feed(c)
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def texts(outs: Sequence[Output]) -> list[str]:
    return [o.text for o in outs if isinstance(o, TextFrame)]


def reasons(outs: Sequence[Output]) -> list[str]:
    return [o.reason for o in outs if isinstance(o, Problem)]


# -- lines ------------------------------------------------------------------------------


def test_lines_group_into_receipts_at_form_feed_end_pattern_and_idle() -> None:
    """A form feed, a line matching receipt_end, or idle() ends a receipt; CR of CRLF and
    other control characters never reach the text."""
    f = LinesFramer(receipt_end=re.compile(r"^=+$"))
    out = f.feed(b"A 1\r\nB\x07 2\r\n\x0cC 3\n=====\nD 4\nE")
    assert texts(out) == ["A 1\nB 2", "C 3\n====="]
    assert texts(f.idle()) == ["D 4\nE"]
    assert f.buffered == 0


def test_lines_a_form_feed_ends_the_receipt_at_once() -> None:
    """Text, newline, form feed and nothing after it: the receipt is out without waiting
    for another line or a silence."""
    f = LinesFramer()
    assert texts(f.feed(b"Receipt: 1\nTOTAL 1.00\n\x0c")) == ["Receipt: 1\nTOTAL 1.00"]
    assert texts(f.feed(b"TOTAL 2.00\x0cTOTAL 3.00\x0c")) == ["TOTAL 2.00", "TOTAL 3.00"]
    assert f.buffered == 0


def test_lines_custom_terminator_and_encoding() -> None:
    f = LinesFramer(terminator=b"\r", encoding="cp1252")
    assert f.feed(b"Caf\xe9 1\rTOTAL 2.00\r") == []
    assert texts(f.idle()) == ["Caf\u00e9 1\nTOTAL 2.00"]


def test_lines_invalid_utf8_is_replaced_and_counted_not_dropped() -> None:
    f = LinesFramer()
    out = f.feed(b"ok\n\xff\xfe bad\n") + f.idle()
    assert reasons(out) == ["decode"]
    assert texts(out) == ["ok\n\ufffd\ufffd bad"]


def test_lines_an_overlong_line_is_dropped_as_it_streams() -> None:
    """A line longer than max_frame never sits in memory; the link then resyncs at the
    next terminator."""
    f = LinesFramer(max_frame=100)
    out: list[Output] = []
    for _ in range(50):
        out += f.feed(b"x" * 64)
        assert f.buffered <= 100
    out += f.feed(b"tail\nnext line\n") + f.idle()
    assert reasons(out) == ["oversize"]
    assert texts(out) == ["next line"]


def test_lines_a_receipt_over_max_frame_is_dropped_whole() -> None:
    f = LinesFramer(max_frame=100)
    out = f.feed(b"0123456789\n" * 20 + b"\x0c" + b"small\n") + f.idle()
    assert reasons(out) == ["oversize"]
    assert texts(out) == ["small"]


# -- STX/ETX ----------------------------------------------------------------------------


def test_stx_etx_good_frame_is_acked_bad_lrc_is_nakked() -> None:
    """LRC = XOR of the bytes after STX up to and including ETX; ACK 0x06, NAK 0x15."""
    good = b"\x02TOTAL 1.00\x03" + bytes([0x03 ^ 0x54 ^ 0x4F ^ 0x54 ^ 0x41 ^ 0x4C ^ 0x20 ^ 0x31 ^ 0x2E ^ 0x30 ^ 0x30])
    assert good == stx_frame(b"TOTAL 1.00")  # the peer's helper agrees with the literal
    f = StxEtxFramer(ack=True)
    assert f.feed(good) == [TextFrame("TOTAL 1.00"), Reply(b"\x06")]
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    assert f.feed(bad) == [Problem("lrc", 10), Reply(b"\x15")]


def test_stx_etx_without_ack_never_talks_and_answers_enq_only_with_ack() -> None:
    quiet = StxEtxFramer(ack=False)
    assert quiet.feed(b"\x05" + stx_frame(b"x")) == [TextFrame("x")]
    talking = StxEtxFramer(ack=True)
    assert talking.feed(b"\x05") == [Reply(b"\x06")]


def test_stx_etx_noise_restart_and_oversize() -> None:
    """Bytes between frames are noise; STX inside a frame restarts it (the old one is
    truncated); an oversize frame is NAKed without being kept."""
    f = StxEtxFramer(ack=True, max_frame=64)
    out = f.feed(b"garbage" + b"\x02half" + stx_frame(b"whole") + stx_frame(b"y" * 200))
    assert reasons(out) == ["noise", "truncated", "oversize"]
    assert texts(out) == ["whole"]
    assert [o.data for o in out if isinstance(o, Reply)] == [b"\x06", b"\x15"]
    assert f.buffered == 0


def test_stx_etx_multiline_message_and_split_anywhere() -> None:
    frame = stx_frame(b"Receipt: 77\r\nTOTAL 2.50\r\n")
    whole = StxEtxFramer().feed(frame)
    assert texts(whole) == ["Receipt: 77\nTOTAL 2.50"]
    assert feed_all(StxEtxFramer(), bytewise(frame)) == whole


# -- ESC/POS ----------------------------------------------------------------------------


def _printer() -> Dummy:
    return Dummy(profile="TM-T88V")


def test_escpos_python_escpos_receipt_text_survives_commands_are_stripped() -> None:
    """Text, styles, EAN-13 and CODE128 barcodes, a native QR code, a raster image: only
    the printed text lines remain; the cut ends the receipt."""
    p = _printer()
    total = receipt_job(
        p,
        register="till-1",
        receipt_no="0042-01-000123",
        items=[Item("OAT DRINK 1L", "4006381333931", 2, 149), Item("BANANAS", "SKU 4011", 1, 199)],
        loyalty="123456789012",
        cut=False,
    )
    p.image(Image.new("1", (64, 48)))
    p.cut()
    out = EscPosFramer().feed(p.output)
    assert reasons(out) == []
    (text,) = texts(out)
    assert total == 497
    assert text.splitlines()[:4] == ["FRESHMART", "12 Market Street, Springfield", "Register: till-1",
                                     "Receipt: 0042-01-000123"]
    assert "  4006381333931     2 x    1.49       2.98" in text.splitlines()
    assert text.endswith("Thank you for shopping with us!")
    assert "\x1b" not in text
    assert "\x1d" not in text
    assert "receipts.example" not in text  # QR payload is not text


def test_escpos_code_pages_follow_esc_t() -> None:
    """ESC t 16 selects WPC1252, ESC t 0 PC437; ESC @ resets to the configured one."""
    data = b"\x1bt\x10Caf\xe9\n\x1bt\x00Caf\x82\n\x1b@\x1bt\x63Caf\x82\n\x1dV\x00"
    assert texts(EscPosFramer().feed(data)) == ["Caf\u00e9\nCaf\u00e9\nCaf\u00e9"]


def test_escpos_each_cut_command_ends_a_receipt() -> None:
    """GS V 0, GS V 65 n (feed and cut), ESC i, ESC m: four cuts, four receipts."""
    data = b"one\n\x1dV\x00two\n\x1dVA\x03three\n\x1bifour\x1bm"
    assert texts(EscPosFramer().feed(data)) == ["one", "two", "three", "four"]


def test_escpos_split_at_every_byte_gives_the_same_receipts() -> None:
    p = _printer()
    receipt_job(p, register="r2", receipt_no="9", items=[Item("TEA", "4006381333931", 1, 100)])
    data = p.output
    assert feed_all(EscPosFramer(), bytewise(data)) == EscPosFramer().feed(data)


def test_escpos_unknown_commands_are_counted_and_text_kept() -> None:
    out = EscPosFramer().feed(b"a\x1b\xffb\n\x1dV\x00")
    assert reasons(out) == ["command"]
    assert texts(out) == ["ab"]


def _receipts(n: int, first: int = 0) -> tuple[bytes, list[str]]:
    """n python-escpos till receipts (ESC @ ... cut): their bytes and their texts."""
    data, want = b"", []
    for k in range(first, first + n):
        p = _printer()
        receipt_job(p, register="till-1", receipt_no=f"0042-01-{k:06d}",
                    items=[Item("OAT DRINK 1L", "4006381333931", k + 1, 149)])  # fmt: skip
        data += p.output
        want += texts(EscPosFramer().feed(p.output))
    return data, want


NOISE_RASTER = b"\x1dv0\x00\xff\xff\xff\xff"  # GS v 0: 65535 x 65535 bytes of image declared


def test_escpos_noise_declaring_a_huge_payload_does_not_swallow_the_receipts_after_it() -> None:
    """Noise in the middle of a receipt declares a 4 GB raster image; the six receipts
    after it (~6 KB, well inside any payload cap) all arrive, split anywhere. Only the
    receipt the noise interrupted is lost (its cut never came as a command): dropped as
    `truncated` with the skip counted, and the 4 GB declaration counted `oversize`."""
    before, (first,) = _receipts(1)
    after, want = _receipts(6, first=1)
    data = before[: len(before) // 2] + NOISE_RASTER + b"\x00\x1b\x02" * 50 + after
    for chunks in ([data], bytewise(data), [data[i : i + 97] for i in range(0, len(data), 97)]):
        out = feed_all(EscPosFramer(), chunks)
        assert texts(out) == want
        assert first not in texts(out)
        assert reasons(out) == ["oversize", "command", "truncated"]


def test_escpos_random_line_noise_never_swallows_later_receipts() -> None:
    """Seeded random noise bursts (a wrong baud rate) between python-escpos receipts: every
    receipt arrives exactly, split anywhere; the noise's cut-like bytes and the noise text
    before a receipt's ESC @ give no receipts, only `noise` counts."""
    data, want = b"", []
    for seed in range(12):
        more, more_texts = _receipts(2, first=2 * seed)
        data += random.Random(seed).randbytes(20_000) + more
        want += more_texts
    for chunks in ([data], [data[i : i + 61] for i in range(0, len(data), 61)]):
        out = feed_all(EscPosFramer(), chunks)
        assert texts(out) == want
        assert "noise" in reasons(out)


def test_escpos_idle_ends_a_payload_skip() -> None:
    """A silence inside a declared payload ends it: a real one streams without a pause."""
    f = EscPosFramer()
    out = f.feed(b"\x1d(L\xff\x7f0p")  # GS ( L declaring 32767 bytes, then silence
    out += f.idle()
    out += f.feed(b"next\n\x1dV\x00")
    assert texts(out) == ["next"]
    assert reasons(out) == ["command"]


def test_escpos_esc_init_inside_a_real_image_does_not_cut_it_short() -> None:
    """Raster and GS ( L image data that contains ESC @ (and text-like bytes) is skipped as
    declared: a probe started at such an ESC @ meets a bad command or the payload's end
    before any cut. (Only image bytes spelling ESC @, text and a cut would fool it.)"""
    row = b"\x1b@FAKE LINE\n" + bytes(range(256)) + b"\x1b@FAKE"
    p = _printer()
    receipt_job(p, register="till-1", receipt_no="7", items=[Item("TEA", "4006381333931", 1, 100)], cut=False)
    raster = b"\x1dv0\x00" + len(row).to_bytes(2, "little") + (40).to_bytes(2, "little") + row * 40
    graphics = b"\x1d(L" + (len(row) + 2).to_bytes(2, "little") + b"0p" + row
    data = p.output + raster + graphics + b"\x1dVA\x00"
    for chunks in ([data], bytewise(data)):
        out = feed_all(EscPosFramer(), chunks)
        assert reasons(out) == []
        (text,) = texts(out)
        assert "FAKE" not in text
        assert text.endswith("Thank you for shopping with us!")


def test_escpos_raster_payload_is_skipped_without_buffering() -> None:
    """GS v 0 with a 100x200 image: 20000 payload bytes, none of them become text."""
    payload = bytes(range(256)) * 78 + bytes(32)
    f = EscPosFramer(max_frame=1024)
    out = f.feed(b"\x1dv0\x00\x64\x00\xc8\x00")
    for i in range(0, len(payload), 1000):
        out += f.feed(payload[i : i + 1000])
        assert f.buffered == 0
    out += f.feed(b"after\n\x1dV\x00")
    assert texts(out) == ["after"]


def test_escpos_a_receipt_without_cut_over_max_frame_is_dropped_and_memory_bounded() -> None:
    f = EscPosFramer(max_frame=256)
    out: list[Output] = []
    for _ in range(100):
        out += f.feed(b"no cut in sight " * 8 + b"\n")
        assert f.buffered <= 256
    out += f.feed(b"\x1dV\x00ok\n\x1dV\x00")
    assert reasons(out) == ["oversize"]
    assert texts(out) == ["ok"]


# -- JSON lines -------------------------------------------------------------------------


def test_jsonl_objects_pass_everything_else_is_counted() -> None:
    f = JsonLinesFramer()
    out = f.feed(b'{"a": 1}\n\n[1]\nnot json\n\xff\n' + b"[" * 5000 + b"\n" + b'{"b": 2}')
    assert [o.obj for o in out if isinstance(o, JsonFrame)] == [{"a": 1}]
    assert reasons(out) == ["json", "json", "decode", "json"]
    assert [o.obj for o in f.idle() if isinstance(o, JsonFrame)] == [{"b": 2}]


def test_reset_reports_a_partial_message_as_truncated() -> None:
    for f, partial in (
        (LinesFramer(), b"half a line"),
        (StxEtxFramer(), b"\x02half"),
        (EscPosFramer(), b"half"),
        (JsonLinesFramer(), b'{"a"'),
    ):
        f.feed(partial)
        assert reasons(f.reset()) == ["truncated"]
        assert f.buffered == 0
        assert f.reset() == []


# -- fuzz -------------------------------------------------------------------------------

TOKENS = [
    b"\x02", b"\x03", b"\x05", b"\x1b", b"\x1d", b"\x1c", b"\x10", b"\x00", b"\n", b"\r", b"\x0c",
    b"\x1dV\x00", b"\x1dv0\x00\xff\xff\xff\xff", b"\x1dk\x02", b"\x1dkI\x05", b"\x1d(k\xff\xff",
    b"\x1d8L\xff\xff\xff\x7f", b"\x1bt\x10", b"\x1b@", b"\x1b*\x21\xff\x00", b"\x1bD", b"\x10\x14\x01",
    b"TOTAL 1.00", b'{"total_cents": 1}', b"\xff\xfe", b"\xc3\xa9", b"x" * 40,
]
streams = st.lists(
    st.one_of(st.sampled_from(TOKENS), st.binary(max_size=64)), max_size=80
).map(b"".join)
MAX = 256


def _framers() -> list[Framer]:
    return [
        LinesFramer(max_frame=MAX, receipt_end=re.compile("TOTAL")),
        StxEtxFramer(max_frame=MAX, ack=True),
        EscPosFramer(max_frame=MAX),
        JsonLinesFramer(max_frame=MAX),
    ]


def _content(outs: Sequence[Output]) -> list[Output]:
    return [o for o in outs if not isinstance(o, Problem)]


@settings(derandomize=True, max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=8))
def test_framers_never_raise_stay_bounded_and_ignore_chunking(data: bytes, cuts: list[int]) -> None:
    """Any bytes, split anywhere: no exception, buffers within max_frame (+ a command
    header), text free of control characters, and the same frames/replies as unsplit."""
    chunks, i, k = [], 0, 0
    while i < len(data):
        step = cuts[k % len(cuts)]
        chunks.append(data[i : i + step])
        i, k = i + step, k + 1
    for whole, split in zip(_framers(), _framers(), strict=True):
        expected = whole.feed(data) + whole.idle()
        got: list[Output] = []
        # lines: receipt + line; ESC/POS: receipt + a probe's receipt (noise payload) + headers
        bound = 2 * MAX + 1 if isinstance(split, LinesFramer) else MAX + 16
        if isinstance(split, EscPosFramer):
            bound = 2 * MAX + 32
        for c in chunks:
            got += split.feed(c)
            assert split.buffered <= bound
        got += split.idle()
        assert _content(got) == _content(expected)
        for o in got:
            if isinstance(o, TextFrame):
                assert o.text
                assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", o.text)
                assert len(o.text) <= MAX
            elif isinstance(o, Reply):
                assert o.data in (b"\x06", b"\x15")
        split.reset()
        assert split.buffered == 0


def test_escpos_holds_a_receipt_and_its_open_line_within_max_frame_in_any_chunking() -> None:
    """The receipt so far and its unfinished line together stay within max_frame (a probe of
    a suspect payload may hold as much again, plus unfinished command headers): fed 1 MiB of
    seeded noise in chunks of 1 byte to 64 KiB, `buffered` never passes 2 * (max_frame + 16),
    and without noise payloads (only text, no control bytes) never passes max_frame."""
    rng = random.Random(6)
    noise = rng.randbytes(1 << 20)
    text = bytes(rng.choice(b"ABCDEFGH 0123456789") for _ in range(1 << 18))
    for chunk in (1, 7, 64, 1000, 4096, 65536):
        f = EscPosFramer(max_frame=4096)
        for i in range(0, len(noise) if chunk > 1 else 1 << 18, chunk):
            f.feed(noise[i : i + chunk])
            assert f.buffered <= 2 * (4096 + 16), chunk
        g = EscPosFramer(max_frame=4096)
        for i in range(0, len(text), chunk):
            g.feed(text[i : i + chunk] + (b"\n" if i % 3 else b""))
            assert g.buffered <= 4096, chunk
