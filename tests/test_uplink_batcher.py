"""The batcher against a large backlog: a fresh event is sealed within a couple of batches,
not after the whole backlog (batches alternate between the oldest and the newest unsent)."""

from __future__ import annotations

from pathlib import Path

from edge.buffer import Buffer
from edge.clock import FakeClock
from edge.config import Config
from edge.events import Pending
from edge.privacy.keys import KeyStore
from edge.uplink.batcher import Batcher
from edge.wire.uplink import parse_batch, verify_batch

BACKLOG = 50_000


async def test_a_fresh_event_is_sealed_within_two_batches_of_a_large_backlog(tmp_path: Path) -> None:
    """50,000 events a day old wait unsent (1,000 per batch = 50 batches of backlog); an
    event captured now is in the first or second sealed batch, and nothing is lost or doubled."""
    clock = FakeClock()
    cfg = Config.model_validate(
        {
            "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
            "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
        }
    )
    keys = KeyStore(cfg.paths.keys_dir, clock)
    keys.init()
    buf = await Buffer.open(cfg, clock)
    try:
        day_ago = clock.wall_ms() - 86_400_000
        for i in range(BACKLOG):
            await buf.put(Pending(ts=day_ago + i, src="ble", type="presence.enter", data={"i": i}))
        await buf.put(Pending(ts=clock.wall_ms(), src="pos", type="pos.receipt", data={"fresh": True}))
        await buf.flush()
        batcher = Batcher(cfg, buf, keys, clock)
        sealed = []
        while (batch := await batcher.seal_next(force=True)) is not None:
            sealed.append(batch)
        ids = [i for b in sealed for i in range(b.first, b.last + 1)]
        assert sorted(ids) == list(range(1, BACKLOG + 2))  # every event once
        fresh_at = next(n for n, b in enumerate(sealed) if b.first <= BACKLOG + 1 <= b.last)
        assert fresh_at <= 1
        assert [b.seq for b in sealed] == list(range(1, len(sealed) + 1))
        parsed = parse_batch(sealed[fresh_at].payload)
        events = verify_batch(parsed, keys={keys.kid(): keys.signing_key().public_key()}, topic_ids=None)
        assert any(e["data"] == {"fresh": True} for e in events)
    finally:
        await buf.close()
