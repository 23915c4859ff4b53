"""The ingest worker's pieces without peers: its config (config/cloud.yaml), secrets, retry delays
and Prometheus names.

What must hold: the shipped config loads with the documented defaults; relative paths resolve
against the config's folder; secrets come from one-line files or the environment and never
appear in what is logged; the backoff doubles, is capped, jittered downwards and resets; the
metrics carry the documented names and count a group's result by reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cloud.cluster.js_transport import Backoff
from cloud.core import GroupResult
from cloud.ingest_config import load_ingest_config, postgres_dsn, read_secret, redacted_target
from cloud.metrics import IngestMetrics
from edge.errors import ConfigError, KeyError_

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "cloud.yaml"


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cloud.yaml"
    path.write_text(body)
    return path


def test_the_shipped_config_loads_with_its_documented_defaults() -> None:
    cfg = load_ingest_config(SHIPPED)
    assert cfg.nats.stream == "EDGE_BATCHES"
    assert cfg.nats.consumer == "ingest"
    assert cfg.nats.user == "worker"
    assert cfg.prefix == "edge/v1"
    assert cfg.max_group == 64
    assert (cfg.backoff.initial, cfg.backoff.max) == (0.5, 5.0)
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9310)
    assert cfg.cloud_key == Path("/run/credentials/edge-cloud-ingest.service/cloud-key")
    assert cfg.token_key == Path("/run/credentials/edge-cloud-ingest.service/token-key")
    assert cfg.limits.max_payload == 4 * 256 * 1024 + 4096


def test_relative_paths_resolve_against_the_configs_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, "nats:\n  servers: [nats://n1:4222]\n  password_file: nats.pw\npostgres:\n"
                            "  dsn: postgresql://edge@db/edge\n  password_file: pg.pw\ncloud_key: cloud.key\n")
    cfg = load_ingest_config(path)
    assert cfg.nats.password_file == tmp_path / "nats.pw"
    assert cfg.postgres.password_file == tmp_path / "pg.pw"
    assert cfg.cloud_key == tmp_path / "cloud.key"


def test_a_password_in_the_dsn_or_url_and_two_password_sources_are_refused_without_echoing_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "nats:\n  servers: ['nats://worker:hunter2@n1:4222']\n"
                            "postgres:\n  dsn: postgresql://edge:hunter2@db/edge\n  password_file: a\n"
                            "  password_env: PGPW\ncloud_key: k\nmetrics:\n  listen: nowhere\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(path)
    text = "\n".join(err.value.problems)
    assert "nats.servers" in text
    assert "postgres.dsn: the DSN is not valid" in text
    assert "metrics.listen" in text
    assert "hunter2" not in text
    both = _write(tmp_path, "nats:\n  servers: [nats://n1:4222]\npostgres:\n  dsn: postgresql://edge@db/edge\n"
                            "  password_file: a\n  password_env: PGPW\ncloud_key: k\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(both)
    assert "give password_file or password_env, not both" in "\n".join(err.value.problems)


def test_secrets_are_one_line_files_and_the_dsn_gets_the_password_but_logs_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "pg.pw").write_text("s3cret\n")
    path = _write(tmp_path, "nats:\n  servers: [nats://n1:4222]\n"
                            "postgres:\n  dsn: postgresql://edge@db:5433/edge\n  password_file: pg.pw\ncloud_key: k\n")
    cfg = load_ingest_config(path)
    assert "password=s3cret" in postgres_dsn(cfg)
    assert redacted_target(cfg) == {"pg_host": "db", "pg_port": "5433", "pg_dbname": "edge", "pg_user": "edge"}
    (tmp_path / "two.pw").write_text("a\nb\n")
    with pytest.raises(KeyError_, match="exactly one non-empty line"):
        read_secret(tmp_path / "two.pw", "postgres.password_file")
    with pytest.raises(KeyError_, match="cannot be read"):
        read_secret(tmp_path / "missing", "nats.password_file")
    env_cfg = load_ingest_config(_write(tmp_path, "nats:\n  servers: [nats://n1:4222]\npostgres:\n  dsn: "
                                                  "postgresql://edge@db/edge\n  password_env: PGPW\ncloud_key: k\n"))
    assert "password=fromenv" in postgres_dsn(env_cfg, {"PGPW": "fromenv"})
    with pytest.raises(KeyError_, match="PGPW"):
        postgres_dsn(env_cfg, {})


def test_backoff_doubles_up_to_its_cap_with_downward_jitter_and_resets() -> None:
    b = Backoff(initial=0.5, max=2.0)

    def failing() -> bool:
        return b.failing

    assert not failing()
    delays = [b.delay() for _ in range(5)]
    for got, nominal in zip(delays, [0.5, 1.0, 2.0, 2.0, 2.0], strict=True):
        assert 0.8 * nominal <= got <= nominal
    assert failing()
    b.reset()
    assert not failing()
    assert b.delay() <= 0.5


def test_metrics_count_a_groups_result_under_the_documented_names() -> None:
    m = IngestMetrics()
    m.observe_result(GroupResult(counts=Counter(accepted=3, events=30, duplicate=1, unauthenticated=2),
                                 rejected=Counter({"malformed": 1, "unknown-key": 1})))  # fmt: skip
    m.observe_result(GroupResult(committed=False))
    m.observe_group(4, 0.02, True)
    text = m.exposition().decode()
    for line in ("edge_cloud_ingest_batches_stored_total 3.0", "edge_cloud_ingest_events_stored_total 30.0",
                 "edge_cloud_ingest_duplicates_total 1.0", "edge_cloud_ingest_unauthenticated_total 2.0",
                 'edge_cloud_ingest_rejected_total{reason="malformed"} 1.0',
                 'edge_cloud_ingest_rejected_total{reason="unknown-key"} 1.0',
                 "edge_cloud_ingest_commit_failures_total 1.0", "edge_cloud_ingest_group_seconds_count 1.0"):
        assert line in text.splitlines(), line
    assert m.totals() == {"batches": 3, "events": 30}
