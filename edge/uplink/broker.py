"""An embedded MQTT broker (amqtt) for `edge demo`, so a demo needs nothing installed by hand.

    async with EmbeddedBroker() as broker:      # 127.0.0.1, a free port
        ... connect_params(uplink, url=broker.url) ...

Not for production (use Mosquitto or a cloud broker). What amqtt 0.12.1 does and does not do,
measured against aiomqtt clients:
- MQTT 3.1.1 only: an MQTT 5 CONNECT is refused (CONNACK 132, unsupported protocol version), but
  one carrying properties (e.g. Maximum Packet Size) is misparsed and the connect times out: a
  device uplink to it uses `uplink.protocol: "3.1.1"`.
- QoS 0/1/2 and retained messages work; many QoS 1 messages in flight are fine.
- Shared subscriptions (`$share/group/filter`) are NOT supported: the SUBACK grants them, but the
  filter is taken literally, so such a subscriber receives nothing. Use plain subscriptions here.
- amqtt sends a connecting client the retained messages matching *every* client's subscriptions,
  not only its own; `EmbeddedBroker` filters that out (see `_Broker`).
- No TLS (amqtt could, but the demo runs on loopback).

The TCP listener is ours (asyncio.start_server, so port 0 works and the real port is known); each
accepted connection is handed to amqtt through its public `stream_connected` entry point, with the
listener declared `external` in amqtt's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any

import structlog
from amqtt.broker import Broker

log = structlog.get_logger()

_LISTENER = "default"
_CONFIG: dict[str, Any] = {
    "listeners": {_LISTENER: {"type": "external"}},
    # only anonymous auth: no $SYS plugin (it would publish every 20 s), no event/packet loggers
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}
_NOISY_LOGGERS = ("amqtt", "transitions")


class _Broker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's Broker, minus the retained-message leak of 0.12.1.

    On connect, amqtt publishes to the new client the retained messages matching every subscription
    filter known to the broker, including other clients'. This override drops those whose filter the
    session does not hold. If amqtt renames the hook, the override is simply unused (the leak returns
    and tests/test_broker.py fails).
    """

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        holders = self.subscriptions.get(subscription[0], [])
        if any(holder is session for holder, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """amqtt on `host:port` (port 0: a free one) for as long as the `async with` block runs."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> None:
        self._host = host
        self._requested_port = port
        self._quiet = quiet
        self._port: int | None = None
        self._broker: _Broker | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        if self._quiet:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        broker = _Broker(_CONFIG)
        await broker.start()
        self._broker = broker
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._requested_port)
        except OSError:
            await broker.shutdown()
            self._broker = None
            raise
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("embedded_broker_started", url=self.url)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            if self._broker is not None:
                await self._broker.stream_connected(reader, writer, listener_name=_LISTENER)
        except Exception as exc:  # one client's failure must not reach the server; amqtt logs details
            log.warning("embedded_broker_client_failed", error=type(exc).__name__)
        finally:
            writer.close()
            if task is not None:
                self._connections.discard(task)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, broker = self._server, self._broker
        self._server = self._broker = None
        if server is not None:
            server.close()  # stop accepting first
        if broker is not None:
            await broker.shutdown()  # ends every session
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(OSError):
                await server.wait_closed()
        log.info("embedded_broker_stopped", port=self._port)
        self._port = None
