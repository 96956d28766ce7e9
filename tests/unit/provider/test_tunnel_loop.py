"""The MQTT tunnel on the event loop, against a real mosquitto: messages in and out in order, a burst
larger than a socket buffer, the broker dying under it, and a stop that is prompt whatever state the
connection is in. No network thread: paho's socket is served by the loop."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

import pytest

from devcluster.broker import FLEET_USER, Broker
from devcluster.processes import free_port
from provider.tunnel import MQTT_CONNECTS, BrokerOptions, MqttTunnel
from tests.helpers import async_wait_until


class Echo:
    """A tunnel subscribed to its own topic, recording what arrives and on which thread."""

    def __init__(self, broker: BrokerOptions) -> None:
        self.topic = f"koupleless_test/{uuid.uuid4().hex[:8]}/echo"
        self.received: list[bytes] = []
        self.threads: set[int] = set()
        self.tunnel = MqttTunnel(broker, client_id=f"test-{uuid.uuid4().hex[:8]}", subscriptions=[(self.topic, 1)],
                                 on_message=self._on, persistent_session=False, name="test")

    def _on(self, _topic: str, payload: bytes) -> None:
        self.threads.add(threading.get_ident())
        self.received.append(payload)

    async def up(self) -> None:
        await asyncio.wait_for(self.tunnel.subscribed.wait(), 30)


@pytest.fixture
async def echo(mqtt_broker: Broker) -> AsyncIterator[Echo]:
    e = Echo(BrokerOptions(mqtt_broker.host, mqtt_broker.port, username=FLEET_USER,
                           password=mqtt_broker.password(FLEET_USER)))
    await e.tunnel.start()
    try:
        yield e
    finally:
        await e.tunnel.stop()


async def test_messages_arrive_in_order_on_the_loop_thread_with_no_network_thread(echo: Echo) -> None:
    await echo.up()
    assert not [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]
    for i in range(200):
        assert echo.tunnel.send(echo.topic, f"m{i}".encode(), qos=1 if i % 2 else 0)
    await async_wait_until(lambda: asyncio.sleep(0, len(echo.received) >= 200), timeout=30, interval=0.05,
                           what="200 messages back")
    # MQTT orders messages of one QoS (the broker may let a QoS 0 one pass QoS 1 ones in flight).
    for parity in (0, 1):
        mine = [m for m in echo.received if int(m[1:]) % 2 == parity]
        assert mine == [f"m{i}".encode() for i in range(parity, 200, 2)]
    assert echo.threads == {threading.get_ident()}


async def test_a_burst_larger_than_the_socket_buffer_goes_out_whole(echo: Echo) -> None:
    await echo.up()
    payloads = [bytes([i % 251]) * 200_000 for i in range(40)]  # 8 MB: many times any socket buffer
    for p in payloads:
        assert echo.tunnel.send(echo.topic, p, qos=1)
    await async_wait_until(lambda: asyncio.sleep(0, len(echo.received) >= len(payloads)), timeout=60,
                           interval=0.05, what="the whole burst back")
    assert echo.received == payloads


async def test_a_killed_broker_is_reconnected_and_subscribed_again() -> None:
    with Broker(identity=False) as broker:
        e = Echo(BrokerOptions(broker.host, broker.port))
        await e.tunnel.start()
        try:
            await e.up()
            first = e.tunnel.connect_count
            broker.kill()
            await async_wait_until(lambda: asyncio.sleep(0, not e.tunnel.connected.is_set()), timeout=30,
                                   interval=0.05, what="the tunnel to notice the broker is gone")
            broker.start()
            await async_wait_until(lambda: asyncio.sleep(0, e.tunnel.connect_count > first and
                                                         e.tunnel.subscribed.is_set()),
                                   timeout=60, interval=0.05, what="a new connection with its subscription")
            assert e.tunnel.send(e.topic, b"after", qos=1)
            await async_wait_until(lambda: asyncio.sleep(0, b"after" in e.received), timeout=30, interval=0.05,
                                   what="a message over the new connection")
        finally:
            await e.tunnel.stop()


async def test_stop_is_prompt_while_the_broker_cannot_be_reached() -> None:
    failed = MQTT_CONNECTS.labels("test", "failed")
    before = failed._value.get()
    tunnel = MqttTunnel(BrokerOptions("127.0.0.1", free_port()), client_id="test-unreachable", subscriptions=[],
                        on_message=lambda _t, _p: None, persistent_session=False, name="test")
    await tunnel.start()
    await async_wait_until(lambda: asyncio.sleep(0, failed._value.get() > before), timeout=30, interval=0.05,
                           what="a refused connect, counted")
    await asyncio.wait_for(tunnel.stop(), 15)
    assert not tunnel.connected.is_set()
