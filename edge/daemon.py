"""`edge run`: the daemon in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import asyncio
import sys

import structlog

from edge.clock import SystemClock
from edge.config import Config
from edge.configload import load_config
from edge.errors import StartupError
from edge.logs import configure_logging
from edge.supervisor import ComponentFactory, Supervisor, install_signal_handlers


def components_for(cfg: Config) -> list[ComponentFactory]:
    """The optional components after the pipeline, in start order."""
    factories: list[ComponentFactory] = []
    if cfg.uplink.enabled:
        from edge.uplink.service import uplink_component

        factories.append(uplink_component)
    return factories


async def run_daemon(cfg: Config, config_path: str) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    sup = Supervisor(cfg, SystemClock(), components=components_for(cfg), config_path=config_path)
    await sup.run(stop)


def run_main(config_path: str) -> int:
    cfg = load_config(config_path)
    configure_logging(cfg.logging.level, cfg.logging.format)
    log = structlog.get_logger("edge.daemon")
    try:
        asyncio.run(run_daemon(cfg, config_path))
    except StartupError as exc:
        log.error("startup_failed", component=exc.component, error=str(exc))
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    return 0
