"""What the commands act on in a running daemon: `command_deps(rt, ...)` for the downlink component."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edge.downlink.commands import CommandDeps, Refused
from edge.downlink.loglevel import TemporaryLogLevel
from edge.downlink.trust import TrustedKeys
from edge.supervisor import Runtime


def status_of(config_path: str) -> Callable[[], dict[str, Any]]:
    """The `status` command's result: `edge status --json` of this config, without the store
    page's access token (a secret for the LAN, not for the broker and the cloud)."""

    def status() -> dict[str, Any]:
        from edge.status import collect_status

        doc = collect_status(config_path)
        page = doc.get("page")
        if isinstance(page, dict) and page.get("token"):
            page["token"] = "[withheld]"  # noqa: S105 - a placeholder, not a password
        return doc

    return status


def command_deps(
    rt: Runtime,
    *,
    status: Callable[[], Mapping[str, Any]] | None,
    trust: TrustedKeys | None,
    log_level: TemporaryLogLevel | None = None,
) -> CommandDeps:
    """`status`: what `edge status --json` shows (edge.status.collect_status with the config
    path); restart, keys.rotate and uplink.resend act on the runtime's supervisor, KeyStore and
    uplink component (looked up when the command runs: components start after the downlink)."""

    async def resend() -> int:
        from edge.uplink.service import Uplink, UplinkOffline

        for comp in rt.components:
            if isinstance(comp, Uplink):
                try:
                    return await comp.resend_now()
                except UplinkOffline as exc:
                    raise Refused(str(exc)) from None
        raise Refused("the uplink is not enabled on this device")

    return CommandDeps(status=status, restart=rt.request_restart, keys=rt.keys, resend=resend,
                       log_level=log_level or TemporaryLogLevel(), trust=trust)
