"""`edge-cloud ingest --config cloud.yaml`: run one ingest worker until SIGTERM/SIGINT.

The process: load and check the config (exit 2 with every problem listed), read the secrets
and the cloud key (exit 2 when unreadable), start the metrics listener, connect to NATS
(forever, with backoff), then run its consumer loops as tasks of one TaskGroup: today the
ingest loop (cloud/worker.py), the control loop (cloud/control.py: enrollment requests, and the
other edge -> cloud documents) and the consumer-lag poller. Another consumer of the same
connection is one more entry in `loops(...)`.

SIGTERM/SIGINT sets `stop`: no new fetch; the group in hand is committed, its device acks and
JetStream acks sent; then the connection is drained and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from edge.errors import ConfigError, KeyError_

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from cloud.control import ControlLoop
    from cloud.ingest_config import IngestConfig
    from cloud.metrics import IngestMetrics
    from cloud.worker import IngestWorker

log = structlog.get_logger()
PROG = "edge-cloud ingest"
DESCRIPTION = ("Run an ingest worker: pull uplink-v1 batches from the JetStream consumer, verify them against "
               "the PostgreSQL device registry, store them exactly once, and answer every device with acks "
               "signed by cloud_key. Prometheus metrics on metrics.listen. Runs until SIGINT/SIGTERM.")  # fmt: skip


def register(sub: Any) -> None:
    p = sub.add_parser("ingest", help="run an ingest worker (NATS JetStream -> PostgreSQL)", description=DESCRIPTION)
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the worker's YAML config (nats, postgres, cloud_key, limits, metrics; see config/cloud.yaml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(ingest_main(args.config))


def loops(cfg: IngestConfig, nc: NATS, worker: IngestWorker, metrics: IngestMetrics,
          stop: asyncio.Event, *, control: ControlLoop | None = None) -> list[Coroutine[Any, Any, None]]:  # fmt: skip
    """Every consumer loop this process runs on its one NATS connection."""
    from cloud.worker import poll_lag

    out = [worker.run(stop), poll_lag(nc, cfg, metrics, stop)]
    if control is not None:
        out.append(control.run(stop))
    return out


async def ingest_main(config_path: str) -> int:
    """0 on a clean stop, 2 on a bad config or unreadable secrets/keys, 1 otherwise."""
    from cloud.ingest_config import load_ingest_config
    from edge.logs import configure_logging

    try:
        cfg = load_ingest_config(config_path)
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"{PROG}: {len(exc.problems)} problem(s) in {exc.path}", file=sys.stderr)
        return 2
    configure_logging(cfg.logging.level, cfg.logging.format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(cfg, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(cfg: IngestConfig, stop: asyncio.Event) -> int:
    from cloud.control import control_loop
    from cloud.db.errors import DbError
    from cloud.db.tokens import TokenKey
    from cloud.ingest_config import nats_password, postgres_dsn, redacted_target
    from cloud.keys import load_cloud_key
    from cloud.metrics import IngestMetrics, MetricsServer
    from cloud.worker import IngestWorker, connect_nats
    from edge.clock import SystemClock

    try:
        password = nats_password(cfg)
        dsn = postgres_dsn(cfg)
        cloud_key = load_cloud_key(cfg.cloud_key)
        token_key = None if cfg.token_key is None else TokenKey.load(cfg.token_key)
    except (KeyError_, DbError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    metrics = IngestMetrics()
    server = None if cfg.metrics.listen is None else MetricsServer(metrics, cfg.metrics.host, cfg.metrics.port)
    if server is not None:
        try:
            await server.start()
        except OSError as exc:
            why = exc.strerror or exc
            print(f"{PROG}: cannot listen on metrics.listen {cfg.metrics.listen}: {why}", file=sys.stderr)
            return 2
    nc: NATS | None = None
    try:
        log.info("ingest_starting", servers=len(cfg.nats.servers), stream=cfg.nats.stream,
                 consumer=cfg.nats.consumer, prefix=cfg.prefix, max_group=cfg.max_group,
                 **redacted_target(cfg))  # fmt: skip
        nc = await connect_nats(cfg, password, metrics, stop)
        if nc is None:
            return 0
        worker = IngestWorker(cfg, nc=nc, dsn=dsn, cloud_key=cloud_key, clock=SystemClock(), metrics=metrics)
        control = control_loop(cfg, nc, metrics, dsn=dsn, cloud_key=cloud_key, token_key=token_key,
                               clock=SystemClock())  # fmt: skip
        failed: list[BaseException] = []
        try:
            async with asyncio.TaskGroup() as tg:
                for coro in loops(cfg, nc, worker, metrics, stop, control=control):
                    tg.create_task(coro)
        except* Exception as group:  # a bug in a loop: the others were cancelled; systemd restarts us
            failed.extend(group.exceptions)
        for bug in failed:
            log.error("ingest_loop_failed", error=repr(bug)[:300], exc_info=bug)
        log.info("ingest_stopped", **metrics.totals())
        return 1 if failed else 0
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), timeout=5)
        if server is not None:
            await server.stop()
