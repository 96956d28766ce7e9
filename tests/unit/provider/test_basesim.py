"""base-sim against a real mosquitto, driven by a controller-side MQTT client speaking the protocol.

Every assertion is about what is on the wire (topics, envelopes, payload fields) or what the status
port shows; waiting is always `async_wait_until` with a deadline."""

from __future__ import annotations

import argparse
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from devcluster.broker import FLEET_USER, Broker
from koupleless import arklet, arklet_parse
from provider.basesim import BaseSimulator, heartbeat_schedule
from provider.basesim_cli import add_arguments, make_app
from provider.tunnel import BrokerOptions, MqttTunnel
from tests.helpers import async_wait_until

V1 = arklet.BizModel("biz1", "0.0.1", "https://h/biz1-0.0.1-ark-biz.jar")
V2 = arklet.BizModel("biz1", "0.0.2", "https://h/biz1-0.0.2-ark-biz.jar")
#: The jar says 0.0.2-SNAPSHOT, the request says 0.0.1.
MISMATCHED = arklet.BizModel(
    "biz1", "0.0.1", "https://h/modules/biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar"
)


class Controller:
    """The controller end of the tunnel: records every base message by (baseID, kind), raw bytes too."""

    def __init__(self, broker: BrokerOptions, env: str) -> None:
        self.env = env
        self.received: list[tuple[str, str, arklet.Envelope, bytes]] = []
        self.tunnel = MqttTunnel(
            broker, client_id=f"test-controller-{env}", subscriptions=[(arklet.controller_subscription(env), 1)],
            on_message=self._on, persistent_session=False, name="test",
        )

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            base_id, kind = arklet.parse_topic(self.env, topic)
        except arklet.ArkletError:
            return  # our own base/baseline commands match the wildcard too
        self.received.append((base_id, kind, arklet.decode_envelope(payload), payload))

    def of(self, base_id: str, kind: str) -> list[arklet.Envelope]:
        return [e for b, k, e, _ in self.received if b == base_id and k == kind]

    def raw(self, base_id: str, kind: str) -> list[bytes]:
        return [p for b, k, _, p in self.received if b == base_id and k == kind]

    def timeline(self, base_id: str) -> list[str]:
        """The kinds a base published, in its own publishTimestamp order."""
        mine = sorted((e.publish_ts_ms, k) for b, k, e, _ in self.received if b == base_id)
        return [k for _, k in mine]

    def send(self, base_id: str, command: str, model: arklet.BizModel | None = None) -> None:
        self.tunnel.publish(arklet.topic(self.env, base_id, command), arklet.encode_command(model), qos=1)

    def send_baseline(self, base_id: str, models: list[arklet.BizModel]) -> None:
        payload = orjson.dumps([m.to_wire() for m in models])
        self.tunnel.publish(arklet.topic(self.env, base_id, arklet.CMD_BASELINE), payload, qos=1)

    async def barrier(self) -> None:
        """Everything published to the broker before this call has reached us: a marker message of
        our own comes back after it."""
        marker = f"barrier-{uuid.uuid4().hex[:8]}"
        self.tunnel.publish(arklet.topic(self.env, marker, arklet.SIMPLE_BIZ), arklet.encode_envelope([]), qos=1)
        await async_wait_until(lambda: _true(any(b == marker for b, *_ in self.received)), 10, what="barrier")


T = TypeVar("T")
Start = Callable[..., Awaitable[tuple[BaseSimulator, Controller]]]


@pytest.fixture
async def start(mqtt_broker: Broker) -> AsyncIterator[Start]:
    """start(**BaseSimulator kwargs): a controller listening on a fresh env, then 3 simulated bases."""
    # The test-only fleet account: one connection speaks for every simulated base, and the controller
    # here also plays bases (barrier markers).
    broker = BrokerOptions(mqtt_broker.host, mqtt_broker.port, username=FLEET_USER,
                           password=mqtt_broker.password(FLEET_USER))
    running: list[tuple[BaseSimulator, Controller]] = []

    async def _start(**kwargs: Any) -> tuple[BaseSimulator, Controller]:
        env = "sim" + uuid.uuid4().hex[:8]
        controller = Controller(broker, env)
        await controller.tunnel.start()
        await async_wait_until(lambda: _true(controller.tunnel.connected.is_set()), 10, what="controller connected")
        options: dict[str, Any] = dict(count=3, name="base", version="1.1.1", heartbeat_interval=0.5,
                                       fail_biz=frozenset({"badbiz"}), seed=1)
        sim = BaseSimulator(broker, env=env, **{**options, **kwargs})
        await sim.start()
        running.append((sim, controller))
        return sim, controller

    yield _start
    for sim, controller in running:
        await sim.stop()
        await controller.tunnel.stop()


# --- announce and heartbeat -----------------------------------------------------------------------------


async def test_bases_ask_for_their_baseline_then_heartbeat(start: Start) -> None:
    sim, ctl = await start()
    ids = list(sim.bases)
    assert ids == ["base-1-1-1-0", "base-1-1-1-1", "base-1-1-1-2"]
    await async_wait_until(lambda: _true(all(len(ctl.of(b, arklet.HEART)) >= 3 for b in ids)), 15, what="heartbeats")
    for b in ids:
        timeline = ctl.timeline(b)
        assert timeline[:2] == [arklet.QUERY_BASELINE, arklet.HEART], "queryBaseline first, then the first heartbeat"
        assert timeline.count(arklet.QUERY_BASELINE) == 1, "no baseline came: the base just heartbeats"
        [ask] = ctl.of(b, arklet.QUERY_BASELINE)
        assert ask.data == {"identity": b, "name": "base", "version": "1.1.1", "clusterName": "base"}
        hb = arklet_parse.parse_heartbeat(ctl.of(b, arklet.HEART)[0].data, b)
        assert hb.activated and hb.metadata.name == "base" and hb.metadata.version == "1.1.1"
        assert hb.local_ip == sim.bases[b].ip
        stamps = [e.publish_ts_ms for b2, _k, e, _p in ctl.received if b2 == b]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert len({sim.bases[b].ip for b in ids}) == 3

    # a restart announces the same way: queryBaseline, then a heartbeat, timestamps still rising
    base = ids[1]
    sim.restart(base)
    await async_wait_until(lambda: _true(ctl.timeline(base).count(arklet.QUERY_BASELINE) == 2), 10)
    await async_wait_until(lambda: _true(ctl.timeline(base)[-1] == arklet.HEART), 10)
    timeline = ctl.timeline(base)
    second = len(timeline) - 1 - timeline[::-1].index(arklet.QUERY_BASELINE)
    assert timeline[second + 1] == arklet.HEART
    stamps = [e.publish_ts_ms for b2, _k, e, _p in ctl.received if b2 == base]
    assert len(set(stamps)) == len(stamps)


# --- installs ----------------------------------------------------------------------------------------------


async def test_install_query_uninstall(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-1"
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 1), 10, what="install reply")
    op = arklet_parse.parse_biz_operation(ops[0].data)
    assert op.success and op.key == "biz1:0.0.1" and op.biz_state == arklet.ACTIVATED
    assert sim.snapshot()["bases"][base]["modules"][0]["state"] == arklet.ACTIVATED
    assert sim.snapshot()["bases"]["base-1-1-1-0"]["modules"] == []

    # a new version supersedes the old one
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V2)
    await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 2), 10)
    ctl.send(base, arklet.CMD_QUERY_ALL_BIZ)
    replies = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.SIMPLE_BIZ), 1), 10, what="simpleBiz")
    states = {b.key: b.state for b in arklet_parse.parse_simple_biz(replies[-1].data)}
    assert states == {"biz1:0.0.1": arklet.DEACTIVATED, "biz1:0.0.2": arklet.ACTIVATED}

    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, V1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 3), 10)
    assert arklet_parse.parse_biz_operation(ops[2].data).success
    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, V1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 4), 10)
    gone = arklet_parse.parse_biz_operation(ops[3].data)
    assert not gone.success and "NOT_FOUND_BIZ" in gone.message
    snap = sim.snapshot()["bases"][base]
    assert [m["version"] for m in snap["modules"]] == ["0.0.2"]
    assert (snap["installs"], snap["install_commands"], snap["repeats"], snap["uninstalls"]) == (2, 2, 0, 2)


async def test_version_from_jar_installs_what_the_jar_is(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-0"
    ctl.send(base, arklet.CMD_INSTALL_BIZ, MISMATCHED)
    [reply] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 1), 10)
    data = reply.data
    # the top level echoes the request, bizInfos[0] says what was installed
    assert (data["command"], data["bizName"], data["bizVersion"]) == ("installBiz", "biz1", "0.0.1")
    assert data["response"]["code"] == "SUCCESS"
    assert data["response"]["data"]["bizInfos"][0] == {
        "bizName": "biz1", "bizVersion": "0.0.2-SNAPSHOT", "bizState": "activated"
    }
    ctl.send(base, arklet.CMD_QUERY_ALL_BIZ)
    [inventory] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.SIMPLE_BIZ), 1), 10)
    assert [(i["name"], i["version"], i["state"]) for i in inventory.data] == [("biz1", "0.0.2-SNAPSHOT", "activated")]
    assert [m["version"] for m in sim.snapshot()["bases"][base]["modules"]] == ["0.0.2-SNAPSHOT"]

    # the repeat check uses the version it would install: another request for the same jar repeats
    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("biz1", "0.0.9", MISMATCHED.biz_url))
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 2), 10)
    repeat = ops[1].data
    assert (repeat["bizName"], repeat["bizVersion"]) == ("biz1", "0.0.9")
    assert repeat["response"]["code"] == "FAILED"
    assert repeat["response"]["data"]["message"] == "REPEAT_BIZ: biz biz1:0.0.2-SNAPSHOT has been installed"

    # a jar name without a version installs under the requested one
    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("biz2", "1.0.0", "https://h/biz2.jar"))
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 3), 10)
    assert ops[2].data["response"]["data"]["bizInfos"][0]["bizVersion"] == "1.0.0"
    snap = sim.snapshot()["bases"][base]
    assert (snap["installs"], snap["install_commands"], snap["repeats"]) == (2, 3, 1)

    # uninstall goes by the version it is sent, like arklet's: the requested one is not there
    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, MISMATCHED)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 4), 10)
    assert ops[3].data["response"]["code"] == "FAILED"
    assert ops[3].data["response"]["data"]["message"] == "NOT_FOUND_BIZ: biz biz1:0.0.1 not found"
    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, arklet.BizModel("biz1", "0.0.2-SNAPSHOT", MISMATCHED.biz_url))
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 5), 10)
    assert ops[4].data["response"]["code"] == "SUCCESS"
    assert [m["name"] for m in sim.snapshot()["bases"][base]["modules"]] == ["biz2"]

    # flag off: the requested version, whatever the jar says
    sim2, ctl2 = await start(version_from_jar=False)
    ctl2.send(base, arklet.CMD_INSTALL_BIZ, MISMATCHED)
    [reply] = await async_wait_until(lambda: _at_least(ctl2.of(base, arklet.BIZ_OPERATION), 1), 10)
    assert reply.data["response"]["data"]["bizInfos"][0]["bizVersion"] == "0.0.1"
    assert [m["version"] for m in sim2.snapshot()["bases"][base]["modules"]] == ["0.0.1"]


async def test_repeated_install_is_answered_at_once_and_counted_apart(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-2"
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 1), 10)

    # installs now take an hour: only an answer that skips the install delay can arrive in time
    sim.install_delay = 3600
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 2), 10, what="REPEAT_BIZ")
    repeat = ops[1].data
    assert (repeat["command"], repeat["bizName"], repeat["bizVersion"]) == ("installBiz", "biz1", "0.0.1")
    assert repeat["response"]["code"] == "FAILED"
    assert repeat["response"]["data"]["code"] == "REPEAT_BIZ"
    assert repeat["response"]["data"]["message"] == "REPEAT_BIZ: biz biz1:0.0.1 has been installed"
    parsed = arklet_parse.parse_biz_operation(repeat)
    assert not parsed.success and "REPEAT_BIZ" in parsed.message

    ctl.send(base, arklet.CMD_INSTALL_BIZ, V2)  # a real install: stuck in its hour
    await async_wait_until(lambda: _true(sim.bases[base].install_commands == 3), 10)
    snap = sim.snapshot()["bases"][base]
    assert (snap["installs"], snap["install_commands"], snap["repeats"]) == (1, 3, 1)
    assert len(ctl.of(base, arklet.BIZ_OPERATION)) == 2


async def test_failures_health_kill_restart(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-2"
    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("badbiz", "1", "https://h/badbiz.jar"))
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 1), 10)
    failed = arklet_parse.parse_biz_operation(ops[0].data)
    assert not failed.success and "simulated failure" in failed.message
    assert sim.bases[base].installs == 0 and sim.bases[base].install_commands == 1

    ctl.send(base, arklet.CMD_INSTALL_BIZ, arklet.BizModel("biz1", "1", "https://h/biz1.jar"))
    await async_wait_until(lambda: _true(bool(sim.bases[base].modules)), 10)
    sim.kill(base)
    assert sim.snapshot()["bases"][base]["lifecycle"] == "killed"
    cut = sim.bases[base].last_ts
    ctl.send(base, arklet.CMD_HEALTH)
    # the other bases keep beating while the dead one stays silent
    other = "base-1-1-1-0"
    mark = len(ctl.of(other, arklet.HEART))
    await async_wait_until(lambda: _true(len(ctl.of(other, arklet.HEART)) >= mark + 3), 10)
    assert [e for e in ctl.of(base, arklet.HEART) if e.publish_ts_ms > cut] == []
    assert ctl.of(base, arklet.BASE_HEALTH) == []

    # work a JVM started is dropped when it dies: a slow install begun before a restart never answers
    sim.restart(base)
    sim.install_delay = 1.0
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    await async_wait_until(lambda: _true(sim.bases[base].install_commands == 3), 10)
    sim.restart(base)
    sim.install_delay = 2.0
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V2)
    await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 3), 10)
    keys = [arklet_parse.parse_biz_operation(e.data).key for e in ctl.of(base, arklet.BIZ_OPERATION)]
    assert keys[2:] == ["biz1:0.0.2"], "the install from before the restart never answered"
    assert [m["version"] for m in sim.snapshot()["bases"][base]["modules"]] == ["0.0.2"]
    assert sim.snapshot()["bases"][base]["lifecycle"] == "running"


# --- health ----------------------------------------------------------------------------------------------


async def test_first_health_answer_after_each_start_lacks_jvm_and_cpu(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-0"
    ctl.send(base, arklet.CMD_HEALTH)
    [first] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BASE_HEALTH), 1), 10)
    assert first.data["code"] == "SUCCESS"
    assert set(first.data["data"]["healthData"]) == {"masterBizInfo"}
    assert first.data["data"]["healthData"]["masterBizInfo"]["bizState"] == "activated"
    assert arklet_parse.parse_health(first.data).memory_bytes is None

    ctl.send(base, arklet.CMD_HEALTH)
    health = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BASE_HEALTH), 2), 10)
    assert {"jvm", "cpu", "masterBizInfo"} <= set(health[1].data["data"]["healthData"])
    report = arklet_parse.parse_health(health[1].data)
    assert report.ok and report.memory_bytes == 4096 * 1024 * 1024 and report.cpu_count == 4

    # a restarted JVM registers its metrics late again
    sim.restart(base)
    ctl.send(base, arklet.CMD_HEALTH)
    health = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BASE_HEALTH), 3), 10)
    assert set(health[2].data["data"]["healthData"]) == {"masterBizInfo"}

    # flag off: the first answer already has them
    _sim2, ctl2 = await start(late_health_metrics=False)
    ctl2.send(base, arklet.CMD_HEALTH)
    [first] = await async_wait_until(lambda: _at_least(ctl2.of(base, arklet.BASE_HEALTH), 1), 10)
    assert arklet_parse.parse_health(first.data).memory_bytes == 4096 * 1024 * 1024
    assert {"jvm", "cpu"} <= set(first.data["data"]["healthData"])


# --- shutdown and goodbye ------------------------------------------------------------------------------


async def test_shutdown_is_silence_by_default(start: Start) -> None:
    sim, ctl = await start()
    leaving, other = "base-1-1-1-0", "base-1-1-1-1"
    await async_wait_until(lambda: _at_least(ctl.of(leaving, arklet.HEART), 1), 10, what="first heartbeat")
    sim.shutdown(leaving)
    cut = sim.bases[leaving].last_ts  # nothing it publishes from here on
    mark = len(ctl.of(other, arklet.HEART))
    await async_wait_until(lambda: _true(len(ctl.of(other, arklet.HEART)) >= mark + 3), 10)
    assert [e for e in ctl.of(leaving, arklet.HEART) if e.publish_ts_ms > cut] == []
    assert all(e.data["state"] == "activated" for e in ctl.of(leaving, arklet.HEART))
    snap = sim.snapshot()["bases"][leaving]
    assert (snap["alive"], snap["lifecycle"]) == (False, "stopped")

    await sim.stop(graceful=True)
    await ctl.barrier()
    assert all(e.data["state"] == "activated" for _b, k, e, _p in ctl.received if k == arklet.HEART)


async def test_goodbye_sends_one_deactivated_heartbeat(start: Start) -> None:
    sim, ctl = await start(goodbye=True)
    leaving = "base-1-1-1-0"
    sim.shutdown(leaving)
    beats = await async_wait_until(
        lambda: _true([e for e in ctl.of(leaving, arklet.HEART) if e.data["state"] == "deactivated"]), 10
    )
    assert len(beats) == 1 and arklet_parse.parse_heartbeat(beats[0].data, leaving).state == arklet.DEACTIVATED
    assert ctl.timeline(leaving)[-1] == arklet.HEART
    sim.shutdown(leaving)  # already stopped: no second goodbye

    await sim.stop(graceful=True)
    await ctl.barrier()
    goodbyes = sorted(b for b, k, e, _p in ctl.received if k == arklet.HEART and e.data["state"] == "deactivated")
    assert goodbyes == sorted(sim.bases), "one goodbye per base: the stopped one earlier, the others now"

    # graceful=False is a kill even with goodbye
    sim2, ctl2 = await start(goodbye=True)
    await sim2.stop(graceful=False)
    await ctl2.barrier()
    assert all(e.data["state"] == "activated" for _b, k, e, _p in ctl2.received if k == arklet.HEART)


# --- baseline -------------------------------------------------------------------------------------------


async def test_baseline_is_batch_installed_and_answered(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-1"
    bad = arklet.BizModel("badbiz", "1.0.0", "https://h/badbiz-1.0.0-ark-biz.jar")
    biz2 = arklet.BizModel("biz2", "1.0.0", "https://h/biz2-1.0.0-ark-biz.jar")
    ctl.send_baseline(base, [MISMATCHED, biz2, bad])
    [resp] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BATCH_INSTALL_RESPONSE), 1), 10)
    assert resp.data["command"] == "batchInstallBiz"
    response = resp.data["response"]
    assert response["code"] == "FAILED", "one module failed, so the batch did"
    inner = response["data"]
    assert inner["code"] == "FAILED" and isinstance(inner["elapsedSpace"], int)
    entries = inner["bizUrlToResponse"]
    assert set(entries) == {MISMATCHED.biz_url, biz2.biz_url, bad.biz_url}
    assert entries[MISMATCHED.biz_url]["code"] == "SUCCESS"
    assert entries[MISMATCHED.biz_url]["bizInfos"] == [
        {"bizName": "biz1", "bizVersion": "0.0.2-SNAPSHOT", "bizState": "activated"}
    ]
    assert entries[biz2.biz_url]["bizInfos"] == [{"bizName": "biz2", "bizVersion": "1.0.0", "bizState": "activated"}]
    assert entries[bad.biz_url]["code"] == "FAILED" and "simulated failure" in entries[bad.biz_url]["message"]
    assert entries[bad.biz_url]["bizInfos"] == []
    snap = sim.snapshot()["bases"][base]
    assert sorted((m["name"], m["version"]) for m in snap["modules"]) == [("biz1", "0.0.2-SNAPSHOT"), ("biz2", "1.0.0")]
    assert (snap["installs"], snap["install_commands"], snap["baselines"]) == (2, 0, 1)

    # the same baseline again: everything already there repeats, the batch succeeds only if all did
    ctl.send_baseline(base, [biz2])
    resps = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BATCH_INSTALL_RESPONSE), 2), 10)
    again = resps[1].data["response"]
    assert again["code"] == "FAILED"
    assert "REPEAT_BIZ" in again["data"]["bizUrlToResponse"][biz2.biz_url]["message"]
    assert sim.bases[base].repeats == 1

    ctl.send_baseline(base, [])
    resps = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BATCH_INSTALL_RESPONSE), 3), 10)
    assert resps[2].data["response"]["code"] == "SUCCESS"
    assert resps[2].data["response"]["data"]["bizUrlToResponse"] == {}

    # not an array: logged and dropped, the base keeps beating
    ctl.tunnel.publish(arklet.topic(ctl.env, base, arklet.CMD_BASELINE), b'{"bizName": "x"}', qos=1)
    mark = len(ctl.of(base, arklet.HEART))
    await async_wait_until(lambda: _true(len(ctl.of(base, arklet.HEART)) >= mark + 2), 10)
    assert len(ctl.of(base, arklet.BATCH_INSTALL_RESPONSE)) == 3


# --- the status port ------------------------------------------------------------------------------------


async def test_status_port_actions_and_replay(start: Start) -> None:
    sim, ctl = await start()
    base = "base-1-1-1-2"
    async with TestClient(TestServer(make_app(sim))) as http:
        resp = await http.post(f"/bases/{base}/replay")
        assert resp.status == 409 and "no bizOperation" in (await resp.json())["error"]
        assert (await http.post("/bases/nobody/kill")).status == 404
        resp = await http.post(f"/bases/{base}/explode")
        assert resp.status == 404 and "replay" in (await resp.json())["error"]

        ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
        await async_wait_until(lambda: _at_least(ctl.raw(base, arklet.BIZ_OPERATION), 1), 10)
        resp = await http.post(f"/bases/{base}/replay")
        assert resp.status == 200
        raws = await async_wait_until(lambda: _at_least(ctl.raw(base, arklet.BIZ_OPERATION), 2), 10, what="replay")
        assert raws[1] == raws[0], "byte for byte, publishTimestamp included"

        body = await (await http.get("/bases")).json()
        entry = body["bases"][base]
        assert {"installs", "install_commands", "repeats", "uninstalls", "lifecycle", "alive"} <= set(entry)
        assert (entry["installs"], entry["install_commands"], entry["repeats"]) == (1, 1, 0)

        resp = await http.post(f"/bases/{base}/shutdown")
        assert resp.status == 200 and (await resp.json())["lifecycle"] == "stopped"
        resp = await http.post(f"/bases/{base}/restart")
        assert (await resp.json())["lifecycle"] == "running"
        await async_wait_until(lambda: _true(len(ctl.of(base, arklet.QUERY_BASELINE)) == 2), 10)
        resp = await http.post(f"/bases/{base}/kill")
        assert (await resp.json())["alive"] is False


def test_cli_flags_default_to_arklet_habits() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--mqtt-broker", "127.0.0.1:1883"])
    assert (args.version_from_jar, args.goodbye, args.late_health_metrics) == (True, False, True)
    args = parser.parse_args(
        ["--mqtt-broker", "127.0.0.1:1883", "--no-version-from-jar", "--goodbye", "--no-late-health-metrics"]
    )
    assert (args.version_from_jar, args.goodbye, args.late_health_metrics) == (False, True, False)
    epilog = parser.epilog or ""
    for action in ("kill", "shutdown", "restart", "replay"):
        assert f"/bases/<id>/{action}" in epilog


async def _true(value: T) -> T:
    return value


async def _at_least(items: list[Any], n: int) -> list[Any] | None:
    return items if len(items) >= n else None


# --- the heartbeat timer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 3.0])
def test_heartbeats_keep_a_fixed_rate_schedule_and_jitter_only_moves_each_beat_off_its_slot(jitter: float) -> None:
    """arklet beats on a fixed-rate timer; --heartbeat-jitter moves each beat up to that far either
    way, independently, so gaps are interval +- 2 x jitter and the schedule never drifts."""
    beats = list(itertools.islice(heartbeat_schedule(5, 10.0, jitter, 100.0, random.Random(7)), 5 * 200))
    assert [t for t, _ in beats] == sorted(t for t, _ in beats)
    for i in range(5):
        times = [t for t, who in beats if who == i]
        assert len(times) == 200
        slots = [100.0 + jitter + i * 2.0 + k * 10.0 for k in range(200)]  # base i's slot: 2 s apart in the fleet
        assert all(abs(t - slot) <= jitter for t, slot in zip(times, slots, strict=True))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(10.0 - 2 * jitter <= g <= 10.0 + 2 * jitter for g in gaps)
        if jitter:
            assert max(gaps) > 10.0 + jitter and min(gaps) < 10.0 - jitter  # the jitter is really there
        else:
            assert gaps == pytest.approx([10.0] * 199)
    assert beats[0][0] >= 100.0  # nothing is due before the timer starts


def test_heartbeat_jitter_of_half_the_interval_or_more_is_refused() -> None:
    with pytest.raises(ValueError, match="--heartbeat-jitter 5: between 0 and half the heartbeat interval"):
        BaseSimulator(BrokerOptions("127.0.0.1", 1), heartbeat_interval=10.0, heartbeat_jitter=5.0)
