"""The ack alarm (edge/ackwatch.py): sealed batches waiting longer than health.ack_timeout_alarm
without a valid ack make /healthz 503 ("degraded", with the reason) and `edge status` loud."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from test_buffer_uplink import Builder, ev, make_cfg, put_all

from edge.ackwatch import ack_alarm, refused_acks
from edge.buffer import Buffer
from edge.buffer.stats import read_stats
from edge.clock import FakeClock
from edge.health import Snapshot, health_doc
from edge.status import _render, collect_status

T0 = 1_767_225_600_000


def test_no_alarm_while_nothing_waits_or_acks_keep_up() -> None:
    """Nothing pending, or waiting less than the threshold: no alarm."""
    assert ack_alarm(pending=0, oldest_pending_ms=None, last_ack_ms=None, now_ms=T0, refused={},
                     threshold_s=600.0) is None
    assert ack_alarm(pending=3, oldest_pending_ms=T0, last_ack_ms=None, now_ms=T0 + 600_000,
                     refused={}, threshold_s=600.0) is None


def test_alarm_after_the_threshold_names_the_refusals() -> None:
    """8 batches, 11 minutes, refused acks: the reason counts them and points at the cloud key."""
    alarm = ack_alarm(pending=8, oldest_pending_ms=T0, last_ack_ms=None, now_ms=T0 + 660_000,
                      refused={"bad-signature": 5}, threshold_s=600.0)
    assert alarm is not None
    assert alarm.batches == 8
    assert alarm.waited_s == 660.0
    assert alarm.reason.startswith("8 batches unacknowledged for 11m: acks refused (5 bad-signature)")
    assert "uplink.cloud_public_key" in alarm.reason
    silent = ack_alarm(pending=2, oldest_pending_ms=T0, last_ack_ms=None, now_ms=T0 + 660_000, refused={},
                       threshold_s=600.0)
    assert silent is not None
    assert "no ack received" in silent.reason


def test_a_recent_valid_ack_restarts_the_wait() -> None:
    """Acks flowing (the last one 1 min ago) with an old batch still pending: no alarm yet."""
    assert ack_alarm(pending=1, oldest_pending_ms=T0, last_ack_ms=T0 + 3_000_000, now_ms=T0 + 3_060_000,
                     refused={}, threshold_s=600.0) is None


def test_refused_counts_come_from_the_uplink_status() -> None:
    """acks_forged is bad-signature, acks_malformed malformed; unknown (late duplicates) is not a refusal."""
    assert refused_acks({"acks_forged": 3, "acks_malformed": 0, "acks_unknown": 9}) == {"bad-signature": 3}
    assert refused_acks(None) == {}


async def _pending_batch(tmp_path: Path) -> FakeClock:
    clock = FakeClock()
    buf = await Buffer.open(make_cfg(tmp_path), clock)
    await put_all(buf, [ev(i=i) for i in range(5)])
    await buf.seal(await buf.unsealed(5, 1 << 20), Builder())
    clock.advance(30)
    stats = await buf.stats()
    await buf.close()
    assert stats.oldest_pending_sealed_ms == T0
    return clock


async def test_buffer_stats_carry_the_oldest_pending_batchs_sealing_time(tmp_path: Path) -> None:
    """Both the daemon's stats and the read-only ones of `edge status` know when it was sealed."""
    await _pending_batch(tmp_path)
    assert read_stats(tmp_path / "state" / "buffer.db").oldest_pending_sealed_ms == T0


def test_healthz_is_degraded_with_the_reason() -> None:
    """Only the ack alarm: status "degraded" (served as 503), the reason listed, the alarm in the body."""
    alarm = ack_alarm(pending=8, oldest_pending_ms=T0, last_ack_ms=None, now_ms=T0 + 700_000,
                      refused={"bad-signature": 2}, threshold_s=600.0)
    snap = Snapshot(device="d1", tenant="t1", store="s1", wall_ms=T0, synchronized=True, stats=None,
                    stats_fresh=True, pipeline={}, drivers=[], components={"uplink": {"state": "online"}},
                    reason=None, lag_s=0.0, ack_alarm=alarm)
    doc = health_doc(snap)
    assert doc["status"] == "degraded"
    assert alarm is not None
    assert doc["reasons"] == [f"uplink: {alarm.reason}"]
    assert doc["ack_alarm"]["batches"] == 8
    ok = health_doc(Snapshot(device="d1", tenant="t1", store="s1", wall_ms=T0, synchronized=True, stats=None,
                             stats_fresh=True, pipeline={}, drivers=[], components={}, reason=None, lag_s=0.0))
    assert (ok["status"], ok["ack_alarm"]) == ("ok", None)


async def test_edge_status_is_loud_about_refused_acks(tmp_path: Path) -> None:
    """A batch sealed long ago (2026-01-01) and a running daemon counting refused acks: an ALARM
    line in the text and `ack_alarm` in --json."""
    await _pending_batch(tmp_path)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"tenant": "t1", "store": "s1", "device": "d1"},
        "paths": {"state_dir": str(tmp_path / "state"), "keys_dir": str(tmp_path / "keys")},
        "health": {"ack_timeout_alarm": "5m"},
    }))
    (tmp_path / "state" / "runtime.json").write_text(json.dumps({
        "state": "running", "updated_ms": T0, "components": {"uplink": {"state": "online", "acks_forged": 4}}}))
    doc = collect_status(str(cfg))
    assert doc["ack_alarm"]["batches"] == 1
    assert doc["ack_alarm"]["refused"] == {"bad-signature": 4}
    text = _render(doc)
    assert text.splitlines()[1].startswith("ALARM       1 batches unacknowledged for ")
    assert "acks refused (4 bad-signature)" in text
