"""Publishing signed downlink-v1 documents: MQTT 3.1.1, QoS 1, retained where the spec says.

Design. NATS keeps an MQTT retained message only when an MQTT client published it (its
`$MQTT_rmsgs` stream is written by the MQTT layer; a NATS core publish on the subject
`edge.v1.t.s._all.desired` reaches connected subscribers but is not retained for the next
one). Desired layers and consent shards must reach a device that connects tomorrow, so the
cloud publishes over MQTT 3.1.1 (NATS refuses MQTT 5), as the broker's admin user, with
`retain=True` and QoS 1: `publish()` returns after the broker's PUBACK, i.e. after NATS stored
the retained copy. Commands go the same way, not retained.

One connection per command invocation; the first broker URL that accepts the login is used
(the nodes of a cluster are equivalent). A failure is a `PublishError` naming the broker.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

import aiomqtt

from cloud.db.errors import DbError
from edge.errors import EdgeError


class PublishError(EdgeError):
    """The broker could not be reached or did not take a message."""


@dataclass(slots=True, frozen=True)
class Broker:
    """Where and as whom the cloud publishes: `urls` are `mqtt://host:port`, tried in order."""

    urls: Sequence[str]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = "edge/v1"
    timeout: float = 10.0

    def endpoints(self) -> list[tuple[str, int]]:
        out = []
        for url in self.urls:
            u = urlsplit(url)
            if u.scheme != "mqtt" or not u.hostname:
                raise DbError(f"broker {url!r} is not mqtt://host:port",
                              hint="the cloud publishes over plain MQTT on the cluster's loopback or private network")
            out.append((u.hostname, u.port or 1883))
        if not out:
            raise DbError("no broker given", hint="pass --broker mqtt://host:port or --dir of a local cloud")
        return out


class Publisher:
    """`async with Publisher(broker) as pub: await pub.publish(topic, payload, retain=True)`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._client: aiomqtt.Client | None = None
        self.where = ""

    async def __aenter__(self) -> Publisher:
        errors = []
        for host, port in self.broker.endpoints():
            client = self.client(host, port)
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            self._client, self.where = client, f"{host}:{port}"
            return self
        raise PublishError(f"no broker accepted the connection ({'; '.join(errors)})",
                           hint="check --broker, the user and password, and that the cluster runs")

    def client(self, host: str, port: int) -> aiomqtt.Client:
        """A new MQTT 3.1.1 client (clean session, a random id) for one endpoint."""
        return aiomqtt.Client(host, port, username=self.broker.user, password=self.broker.password,
                              identifier=f"edge-cloud-{secrets.token_hex(6)}", protocol=aiomqtt.ProtocolVersion.V311,
                              clean_session=True, timeout=self.broker.timeout, keepalive=30)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            # leaving a connection that already broke: what was published got its PUBACK
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(et, e, tb)

    @property
    def mqtt(self) -> aiomqtt.Client:
        if self._client is None:
            raise PublishError("the publisher is not connected")
        return self._client

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """QoS 1; returns after the broker's PUBACK."""
        try:
            await self.mqtt.publish(topic, payload, qos=1, retain=retain, timeout=self.broker.timeout)
        except aiomqtt.MqttError as exc:
            raise PublishError(f"publishing to {self.where} failed: {exc}",
                               hint="nothing newer than the last published document reached the devices; "
                                    "run the command again") from None
