"""`edge run`: the daemon in the foreground (systemd runs exactly this).

Under systemd (`Type=notify`) it says READY=1 once config, keys, buffer and the enabled
drivers are up, keeps STATUS= current, pings the watchdog from its event loop while the
pipeline makes progress, and says STOPPING=1 on SIGTERM (edge/notify.py). The health
endpoint and the zeroconf announcement are components after the uplink.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from edge.clock import Clock, SystemClock
from edge.config import Config
from edge.configload import load_config
from edge.coredump import disable_core_dumps
from edge.errors import ConfigError, StartupError
from edge.health import Liveness
from edge.logs import capture_uncaught, configure_logging
from edge.notify import Notifier, ServiceLink
from edge.preflight import startup_problems, state_dir_problems
from edge.statelock import StateLock, StateLocked
from edge.supervisor import RESTART_EXIT, ComponentFactory, Supervisor, install_signal_handlers

if TYPE_CHECKING:
    from edge.downlink.desired import Boot


def components_for(
    cfg: Config, liveness: Liveness | None = None, config_path: str | None = None, boot: Boot | None = None
) -> list[ComponentFactory]:
    """The optional components after the pipeline, in start order: uplink, downlink (with `boot`,
    the persisted desired layers `edge run` started with), health, advertise."""
    factories: list[ComponentFactory] = []
    if cfg.uplink.enabled:
        from edge.uplink.service import uplink_component

        factories.append(uplink_component)
    if cfg.downlink_active and boot is not None and config_path is not None:
        from edge.downlink.component import downlink_component

        factories.append(downlink_component(config_path, boot))
    if cfg.health.enabled and liveness is not None:
        from edge.health import health_component

        factories.append(health_component(liveness, config_path))
    if cfg.health.advertise:
        from edge.advertise import advertise_component

        factories.append(advertise_component)
    return factories


async def run_daemon(
    cfg: Config,
    config_path: str,
    *,
    notifier: Notifier | None = None,
    clock: Clock | None = None,
    extra_components: Sequence[ComponentFactory] = (),
    cloud_consent: bool | None = None,
    boot: Boot | None = None,
) -> bool:
    """Run until stopped; True when the stop was a requested restart (the `restart` command, an
    applied config layer). `cloud_consent` None: `cfg.cloud_consent` when there is a downlink."""
    if cloud_consent is None:
        cloud_consent = cfg.cloud_consent and boot is not None
    clock = clock or SystemClock()
    notifier = notifier or Notifier.from_env()
    stop = asyncio.Event()
    liveness = Liveness(clock, cfg.health.stall_timeout)
    link = ServiceLink(notifier, clock, liveness, stop, drain_timeout=cfg.health.drain_timeout)
    install_signal_handlers(stop, on_signal=link.on_signal)
    sup = Supervisor(
        cfg, clock, components=[*components_for(cfg, liveness, config_path, boot), *extra_components],
        config_path=config_path, on_ready=link.ready, cloud_consent=cloud_consent,
    )
    try:
        await sup.run(stop)
    finally:
        await link.close()
    return sup.restart_requested


PRIVATE_UMASK = 0o077  # buffer.db (+ -wal, -shm), runtime.json, keys: owner only, whoever started us


def run_main(config_path: str) -> int:
    """`edge run`: 0 after a clean stop, RESTART_EXIT (75) after a stop for the `restart` command,
    1 when a component fails to start, 2 for a config
    problem (the same checks as `edge check-config`) or a state folder another daemon holds."""
    no_core = disable_core_dumps()  # first: memory will hold raw identifiers (edge/coredump.py)
    os.umask(PRIVATE_UMASK)  # systemd sets UMask=0077; a shell's 022 would leave the buffer world-readable
    cfg = load_config(config_path)
    if state_problems := state_dir_problems(cfg, config_path):  # the lock lives in the state folder
        raise ConfigError(config_path, state_problems)
    lock = StateLock(cfg.paths.state_dir)
    try:
        lock.acquire()  # before the buffer, the keys or the broker session are opened
    except StateLocked as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    try:
        boot = None
        if cfg.downlink_active:  # the persisted desired layers over the file (edge/downlink/desired.py)
            from edge.downlink.desired import boot_config

            boot = boot_config(config_path, cfg)
            cfg = boot.effective.cfg
        configure_logging(cfg.logging.level, cfg.logging.format)
        capture_uncaught()
        log = structlog.get_logger("edge.daemon")
        problems = startup_problems(cfg, config_path)
        if problems:  # the lines go to stderr (edge.cli); the journal's JSON gets the event too
            log.error("startup_failed", component="preflight", problems=problems)
            raise ConfigError(config_path, problems)
        return _run_locked(cfg, config_path, no_core, log, boot)
    finally:
        lock.release()


def _run_locked(
    cfg: Config, config_path: str, no_core: bool, log: structlog.typing.FilteringBoundLogger, boot: Boot | None
) -> int:
    if not no_core:
        log.warning("core_dumps_not_disabled", hint="set LimitCORE=0 in the unit or ulimit -c 0")
    try:
        restart = asyncio.run(run_daemon(cfg, config_path, boot=boot))
    except StartupError as exc:
        log.error("startup_failed", component=exc.component, error=str(exc))
        print(f"edge: {exc}", file=sys.stderr)
        return 1
    if restart:
        log.info("exit_for_restart", exit_status=RESTART_EXIT)
        return RESTART_EXIT
    return 0
