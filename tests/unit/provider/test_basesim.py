"""base-sim against a real mosquitto, driven by a controller-side MQTT client speaking the protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from koupleless import arklet
from provider.basesim import BaseSimulator
from provider.tunnel import BrokerOptions, MqttTunnel
from tests.helpers import async_wait_until


class Controller:
    """The controller end of the tunnel: records every base message by (baseID, kind)."""

    def __init__(self, broker: BrokerOptions, env: str) -> None:
        self.env = env
        self.received: list[tuple[str, str, arklet.Envelope]] = []
        self.tunnel = MqttTunnel(
            broker, client_id="test-controller", subscriptions=[(arklet.controller_subscription(env), 1)],
            on_message=self._on, persistent_session=False, name="test",
        )

    def _on(self, topic: str, payload: bytes) -> None:
        base_id, kind = arklet.parse_topic(self.env, topic)
        self.received.append((base_id, kind, arklet.decode_envelope(payload)))

    def of(self, base_id: str, kind: str) -> list[arklet.Envelope]:
        return [e for b, k, e in self.received if b == base_id and k == kind]

    def send(self, base_id: str, command: str, model: arklet.BizModel | None = None) -> None:
        self.tunnel.publish(arklet.topic(self.env, base_id, command), arklet.encode_command(model), qos=1)


@pytest.fixture
async def pair(mqtt_broker, request) -> AsyncIterator[tuple[BaseSimulator, Controller]]:  # type: ignore[no-untyped-def]
    env = "sim" + request.node.name[-6:].replace("[", "").replace("]", "").lower()
    broker = BrokerOptions(mqtt_broker.host, mqtt_broker.port)
    controller = Controller(broker, env)
    await controller.tunnel.start()
    await asyncio.wait_for(controller.tunnel.connected.wait(), 10)
    sim = BaseSimulator(broker, env=env, count=3, name="base", version="1.1.1", heartbeat_interval=0.5,
                        fail_biz=frozenset({"badbiz"}), seed=1)
    await sim.start()
    yield sim, controller
    await sim.stop()
    await controller.tunnel.stop()


async def test_bases_announce_and_heartbeat(pair: tuple[BaseSimulator, Controller]) -> None:
    sim, ctl = pair
    ids = list(sim.bases)
    assert ids == ["base-1-1-1-0", "base-1-1-1-1", "base-1-1-1-2"]
    await async_wait_until(lambda: _true(all(len(ctl.of(b, arklet.HEART)) >= 3 for b in ids)), 15, what="heartbeats")
    for b in ids:
        beats = ctl.of(b, arklet.HEART)
        hb = arklet.parse_heartbeat(beats[0].data, b)
        assert hb.activated and hb.metadata.name == "base" and hb.metadata.version == "1.1.1"
        assert hb.local_ip == sim.bases[b].ip
        stamps = [e.publish_ts_ms for b2, _k, e in ctl.received if b2 == b]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert ctl.of(b, arklet.QUERY_BASELINE), "arklet asks for its baseline on start"
    assert len({sim.bases[b].ip for b in ids}) == 3


async def test_install_query_uninstall(pair: tuple[BaseSimulator, Controller]) -> None:
    sim, ctl = pair
    base = "base-1-1-1-1"
    v1 = arklet.BizModel("biz1", "0.0.1", "https://h/biz1-0.0.1-ark-biz.jar")
    v2 = arklet.BizModel("biz1", "0.0.2", "https://h/biz1-0.0.2-ark-biz.jar")
    ctl.send(base, arklet.CMD_INSTALL_BIZ, v1)
    ops = await async_wait_until(lambda: _ready(ctl.of(base, arklet.BIZ_OPERATION)), 10, what="install reply")
    op = arklet.parse_biz_operation(ops[0].data)
    assert op.success and op.key == "biz1:0.0.1" and op.biz_state == arklet.ACTIVATED
    assert sim.snapshot()["bases"][base]["modules"][0]["state"] == arklet.ACTIVATED
    assert sim.snapshot()["bases"]["base-1-1-1-0"]["modules"] == []

    # a second install of the same name:version is refused like arklet's REPEAT_BIZ
    ctl.send(base, arklet.CMD_INSTALL_BIZ, v1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 2), 10)
    repeat = arklet.parse_biz_operation(ops[1].data)
    assert not repeat.success and "REPEAT_BIZ" in repeat.message

    # a new version supersedes the old one
    ctl.send(base, arklet.CMD_INSTALL_BIZ, v2)
    await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 3), 10)
    ctl.send(base, arklet.CMD_QUERY_ALL_BIZ)
    replies = await async_wait_until(lambda: _ready(ctl.of(base, arklet.SIMPLE_BIZ)), 10, what="simpleBiz")
    states = {b.key: b.state for b in arklet.parse_simple_biz(replies[-1].data)}
    assert states == {"biz1:0.0.1": arklet.DEACTIVATED, "biz1:0.0.2": arklet.ACTIVATED}

    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, v1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 4), 10)
    assert arklet.parse_biz_operation(ops[3].data).success
    assert [m["version"] for m in sim.snapshot()["bases"][base]["modules"]] == ["0.0.2"]


async def test_failures_health_kill_restart(pair: tuple[BaseSimulator, Controller]) -> None:
    sim, ctl = pair
    base = "base-1-1-1-2"
    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("badbiz", "1", "https://h/badbiz.jar"))
    ops = await async_wait_until(lambda: _ready(ctl.of(base, arklet.BIZ_OPERATION)), 10)
    failed = arklet.parse_biz_operation(ops[0].data)
    assert not failed.success and "simulated failure" in failed.message

    ctl.send(base, arklet.CMD_HEALTH)
    health = await async_wait_until(lambda: _ready(ctl.of(base, arklet.BASE_HEALTH)), 10)
    report = arklet.parse_health(health[0].data)
    assert report.ok and report.memory_bytes == 4096 * 1024 * 1024 and report.cpu_count == 4

    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("biz1", "1", "https://h/biz1.jar"))
    await async_wait_until(lambda: _true(bool(sim.bases[base].modules)), 10)
    sim.kill(base)
    seen = len(ctl.of(base, arklet.HEART))
    ctl.send(base, arklet.CMD_HEALTH)
    # the other bases keep beating while the dead one stays silent
    other = "base-1-1-1-0"
    mark = len(ctl.of(other, arklet.HEART))
    await async_wait_until(lambda: _true(len(ctl.of(other, arklet.HEART)) >= mark + 3), 10)
    assert len(ctl.of(base, arklet.HEART)) == seen
    assert len(ctl.of(base, arklet.BASE_HEALTH)) == 1

    sim.restart(base)
    await async_wait_until(lambda: _true(len(ctl.of(base, arklet.QUERY_BASELINE)) == 2), 10)
    assert sim.bases[base].modules == {}

    sim.shutdown(base)
    beats = await async_wait_until(
        lambda: _true([e for e in ctl.of(base, arklet.HEART) if e.data["state"] == "deactivated"]), 10
    )
    assert orjson.dumps(beats[0].data)


async def _true(value: object) -> object:
    return value


async def _ready(items: list[arklet.Envelope]) -> list[arklet.Envelope] | None:
    return items or None


async def _at_least(items: list[arklet.Envelope], n: int) -> list[arklet.Envelope] | None:
    return items if len(items) >= n else None
