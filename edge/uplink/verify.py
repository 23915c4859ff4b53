"""Offline verification of captured batch payloads (`edge verify --keys DIR FILE...`).

Each FILE holds one batch payload exactly as published. A sidecar `FILE.topic` holding the
MQTT topic it was captured on turns on the topic check. Across the given files, the chain is
checked per device: where the files hold batch `seq - 1`, `prev` must equal SHA-256 of its
header. One line per file, in the order given:

    OK  FILE  tenant/store/device seq=N n=M
    FAIL FILE  <reason>: <detail>

Exit code 0 when every file verifies, 1 when any fails, 2 on usage or I/O problems.

The keys folder is the receiver's (cloud/identity.py): each device's key at
`DIR/<tenant>/<store>/<device>.pub`, 64 hex characters (a raw Ed25519 public key); the kid is
computed from the key, never taken from the file name. A key verifies only batches of the identity
it is registered for (the sidecar topic's when there is one, else the header's): device A's key on
a batch of another device, store or tenant is `unknown-key`, exactly as the receiver answers.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.errors import KeyError_, WireError
from edge.wire.uplink import ID_RE, Batch, Limits, kid_of, parse_batch, verify_batch


def read_public_key(path: Path) -> tuple[str, Ed25519PublicKey]:
    """One `.pub` file -> (kid, key). ValueError names what is wrong; OSError if unreadable."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError("expected 64 hex characters (a raw Ed25519 public key)")
    return kid_of(raw), Ed25519PublicKey.from_public_bytes(raw)


def _sidecar_ids(payload_path: Path) -> tuple[str, str, str] | None:
    """(tenant, store, device) from `FILE.topic`, None without a sidecar; WireError if it is off."""
    sidecar = Path(f"{payload_path}.topic")
    if not sidecar.exists():
        return None
    parts = sidecar.read_text(encoding="utf-8").strip().split("/")
    if len(parts) < 5 or parts[-1] != "batch" or not all(ID_RE.fullmatch(x) for x in parts[-4:-1]):
        raise WireError("topic-mismatch", f"sidecar {sidecar.name} is not a {{prefix}}/t/s/d/batch topic")
    return parts[-4], parts[-3], parts[-2]


@dataclass(slots=True)
class _Result:
    path: str
    batch: Batch | None = None
    line: str = ""


def _chain_failures(results: list[_Result]) -> dict[int, str]:
    """index in `results` -> chain-broken detail, for files that contradict another file."""
    by_device: dict[tuple[str, str, str], dict[int, set[bytes]]] = defaultdict(lambda: defaultdict(set))
    for r in results:
        if r.batch is not None:
            by_device[r.batch.ids][r.batch.seq].add(r.batch.hh)
    failures: dict[int, str] = {}
    for i, r in enumerate(results):
        b = r.batch
        if b is None:
            continue
        held = by_device[b.ids]
        if len(held[b.seq]) > 1:
            failures[i] = f"another file holds a different batch with seq={b.seq}"
        elif b.seq - 1 in held and b.prev not in held[b.seq - 1]:
            failures[i] = f"prev does not match SHA-256 of the header of seq={b.seq - 1}"
    return failures


def verify_files(
    paths: Sequence[str],
    keys_dir: Path,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    limits: Limits | None = None,
) -> int:
    """Verify captured payloads offline; prints one line per file; returns the exit code.

    `limits` default to the largest batch any device configuration can make (a capture is
    trusted more than the network)."""
    limits = limits if limits is not None else Limits.largest()
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if not paths:
        print("edge verify: no files given (usage: edge verify --keys DIR FILE...)", file=err)
        return 2
    from cloud.identity import load_keys_dir  # here: cloud.identity imports read_public_key from us

    try:
        registered, problems = load_keys_dir(keys_dir)
    except KeyError_ as exc:
        print(f"edge verify: {exc}", file=err)
        return 2
    io_problem = bool(problems)
    for p in problems:
        print(f"edge verify: ignoring key file {p}", file=err)

    results: list[_Result] = []
    for name in paths:
        r = _Result(name)
        results.append(r)
        try:
            payload = Path(name).read_bytes()
            ids = _sidecar_ids(Path(name))
            batch = parse_batch(payload, limits=limits)
            # only the key registered for this batch's identity may have signed it (no global kid map)
            reg = registered.get(ids if ids is not None else batch.ids)
            keys = {reg.kid: reg.key} if reg is not None else {}
            verify_batch(batch, keys=keys, topic_ids=ids, limits=limits)
        except OSError as exc:
            io_problem = True
            r.line = f"FAIL {name}  io: {exc.strerror or exc}"
            continue
        except (WireError, UnicodeDecodeError) as exc:
            r.line = f"FAIL {name}  {exc}"
            continue
        r.batch = batch
        r.line = f"OK  {name}  {batch.tenant}/{batch.store}/{batch.device} seq={batch.seq} n={batch.n}"

    failures = _chain_failures(results)
    any_fail = False
    for i, r in enumerate(results):
        if i in failures:
            r.line = f"FAIL {r.path}  chain-broken: {failures[i]}"
        any_fail = any_fail or r.line.startswith("FAIL")
        print(r.line, file=out)
    if io_problem:
        return 2
    return 1 if any_fail else 0
