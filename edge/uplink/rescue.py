"""Rescue by USB stick, signed: `edge export --signed --out FILE` writes the sealed uplink-v1 batches.

Everything still unsealed in the buffer is sealed first (the same Batcher the uplink uses, so
seq, prev and signature are exactly what the network would have carried), then every sealed,
unacknowledged batch is written, byte for byte as it would be published, in this framing:

    b"edge-batches-v1\\n"                         magic line
    then per batch:  u16 big-endian topic length, topic (UTF-8, `{prefix}/{t}/{s}/{d}/batch`),
                     u32 big-endian payload length, payload (the uplink-v1 batch)

`edge-cloud import FILE` reads it and ingests every batch through the receiver's ingest core,
exactly as if it had arrived over MQTT (verified, deduplicated, chain-checked); batches sent
later over the network are then duplicates, acked ok, and the device deletes them. Nothing is
deleted by the export itself. Written to `FILE.partial`, fsynced, renamed when complete.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.status import private_opener
from edge.wire.uplink import batch_topic

MAGIC = b"edge-batches-v1\n"
MAX_TOPIC = 65535


def write_record(fh: BinaryIO, topic: str, payload: bytes) -> None:
    t = topic.encode("utf-8")
    fh.write(struct.pack(">H", len(t)) + t + struct.pack(">I", len(payload)) + payload)


def read_records(fh: BinaryIO, *, max_payload: int) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) per record; ValueError on a file that is not this framing or is cut short.

    A payload above `max_payload` is skipped (read in chunks, not kept) and yielded as b"" (the core
    refuses it). Records before a cut-short one have been yielded when the ValueError comes."""
    if fh.read(len(MAGIC)) != MAGIC:
        raise ValueError("not an edge-batches-v1 file (made by `edge export --signed`)")
    while True:
        head = fh.read(2)
        if not head:
            return
        if len(head) < 2:
            raise ValueError("file cut short (topic length)")
        (tlen,) = struct.unpack(">H", head)
        topic = fh.read(tlen)
        size = fh.read(4)
        if len(topic) < tlen or len(size) < 4:
            raise ValueError("file cut short (topic)")
        (plen,) = struct.unpack(">I", size)
        if plen > max_payload:
            _skip(fh, plen)  # read and dropped in bounded chunks: a cut-short file is still noticed
            yield topic.decode("utf-8", "replace"), b""
            continue
        payload = fh.read(plen)
        if len(payload) < plen:
            raise ValueError("file cut short (payload)")
        yield topic.decode("utf-8", "replace"), payload


def _skip(fh: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = fh.read(min(n, 1 << 16))
        if not chunk:
            raise ValueError(f"file cut short (an oversized payload, {n} bytes missing)")
        n -= len(chunk)


async def export_signed(cfg: Config, out: Path, clock: Clock) -> tuple[int, int]:
    """Seal what is unsealed, write every pending batch; (batches newly sealed, batches written)."""
    from edge.buffer import Buffer
    from edge.privacy.keys import KeyStore
    from edge.uplink.batcher import Batcher

    buf = await Buffer.open(cfg, clock)
    try:
        batcher = Batcher(cfg, buf, KeyStore(cfg.paths.keys_dir, clock), clock)
        sealed = 0
        while await batcher.seal_next(force=True) is not None:
            sealed += 1
        pending = await buf.pending_batches()
    finally:
        await buf.close()
    ident = cfg.identity
    topic = batch_topic(cfg.uplink.prefix, ident.tenant, ident.store, ident.device)
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb", opener=private_opener) as fh:  # noqa: ASYNC230 - one-shot CLI; nothing else on this loop
            fh.write(MAGIC)
            for b in pending:
                write_record(fh, topic, b.payload)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sealed, len(pending)


def export_signed_main(config_path: str, out: str) -> int:
    """`edge export --signed --out FILE`: 0 when written, 2 when FILE cannot be written."""
    from edge.configload import load_config
    from edge.status import out_problem

    cfg = load_config(config_path)
    out_path = Path(out)
    if (problem := out_problem(out_path)) is not None:
        print(f"edge: export --out {out}: {problem}", file=sys.stderr)
        return 2
    if not cfg.buffer_path.exists():
        print(f"edge: no buffer at {cfg.buffer_path}", file=sys.stderr)
        return 1
    from edge.statelock import StateLock, StateLocked

    try:  # sealing writes to the buffer: never beside a running daemon (its ids and counters would go stale)
        with StateLock(cfg.paths.state_dir):
            sealed, written = asyncio.run(export_signed(cfg, out_path, SystemClock()))
    except StateLocked as exc:
        print(f"edge: export --signed: {exc}; stop it first, or use `edge export` (read-only JSON lines)",
              file=sys.stderr)
        return 2
    print(f"{written} signed batches written to {out_path} ({sealed} sealed now); "
          f"import them with: edge-cloud import --config RECEIVER.yaml {out_path}")  # fmt: skip
    return 0
