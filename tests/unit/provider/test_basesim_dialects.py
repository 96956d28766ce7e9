"""`base-sim --dialect 1.3.0 | 1.3.2` against a real mosquitto: exactly the old runtimes' messages on
the wire (provider/basesim_dialects.py)."""

from __future__ import annotations

import uuid

from koupleless import arklet, arklet_parse
from provider.basesim import BaseSimulator
from provider.tunnel import BrokerOptions
from tests.helpers import async_wait_until
from tests.unit.provider.test_basesim import V1, Start, _at_least, _true, start

__all__ = ["start"]  # the fixture, shared with test_basesim

FAILING = arklet.BizModel("badbiz", "0.0.1", "https://h/badbiz-0.0.1-ark-biz.jar")


def is_uuid(value: str) -> bool:
    return str(uuid.UUID(value)) == value


def test_old_dialects_heartbeat_as_their_runtime_by_default() -> None:
    broker = BrokerOptions("127.0.0.1", 1)
    assert BaseSimulator(broker, dialect="1.3.0").heartbeat_interval == 120.0
    assert BaseSimulator(broker, dialect="1.3.2").heartbeat_interval == 10.0
    assert BaseSimulator(broker).heartbeat_interval == 10.0
    assert BaseSimulator(broker, dialect="1.3.0", heartbeat_interval=1.0).heartbeat_interval == 1.0


async def test_1_3_0_speaks_the_old_dialect(start: Start) -> None:
    sim, ctl = await start(dialect="1.3.0")
    ids = list(sim.bases)
    assert all(is_uuid(b) for b in ids) and len(set(ids)) == 3
    assert [sim.bases[b].slot for b in ids] == ["base-1-1-1-0", "base-1-1-1-1", "base-1-1-1-2"]
    await async_wait_until(lambda: _true(all(len(ctl.of(b, arklet.HEART)) >= 2 for b in ids)), 15, what="heartbeats")
    base = ids[0]
    assert ctl.of(base, arklet.HEART)[0].data == {
        "masterBizInfo": {"name": "base", "version": "1.1.1"},
        "networkInfo": {"localIP": sim.bases[base].ip, "localHostName": "base-1-1-1-0"},
        "state": "ACTIVATED",
    }
    assert not ctl.of(base, arklet.QUERY_BASELINE), "baselines came with runtime 1.4"

    # a successful install: no bizOperation, only the full module list on base/biz
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    [listed] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ), 1), 10, what="base/biz")
    assert listed.data["code"] == "SUCCESS"
    [info] = listed.data["data"]
    assert (info["bizName"], info["bizVersion"], info["bizState"]) == ("biz1", "0.0.1", "activated")
    assert set(info) == {"bizName", "bizState", "bizVersion", "mainClass", "webContextPath", "bizStateRecords"}
    assert arklet_parse.parse_biz(listed.data)[0].key == "biz1:0.0.1"

    # queryAllBiz is answered on base/biz too, never on simpleBiz
    ctl.send(base, arklet.CMD_QUERY_ALL_BIZ)
    await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ), 2), 10, what="queryAllBiz on base/biz")

    # a failure: bizOperation {command, response}, naming no biz
    ctl.send(base, arklet.CMD_INSTALL_BIZ, FAILING)
    [failed] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 1), 10, what="failure")
    assert set(failed.data) == {"command", "response"} and failed.data["response"]["code"] == "FAILED"
    assert arklet_parse.parse_biz_operation(failed.data).biz_name == ""
    # a successful uninstall: again only the module list
    ctl.send(base, arklet.CMD_UNINSTALL_BIZ, V1)
    listed = (await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ), 3), 10, what="uninstall list"))[-1]
    assert listed.data["data"] == []
    await ctl.barrier()
    assert len(ctl.of(base, arklet.BIZ_OPERATION)) == 1 and not ctl.of(base, arklet.SIMPLE_BIZ)

    # a baseline is not something this runtime knows
    ctl.send_baseline(base, [V1])
    await ctl.barrier()
    assert sim.snapshot()["bases"][base]["baselines"] == 0

    # a new JVM is a new base: a new UUID, same slot, nothing under the old ID any more
    new = sim.restart(base)
    assert is_uuid(new) and new != base and base not in sim.bases and sim.bases[new].slot == "base-1-1-1-0"
    await async_wait_until(lambda: _at_least(ctl.of(new, arklet.HEART), 1), 10, what="the new JVM's heartbeat")
    assert not ctl.of(new, arklet.QUERY_BASELINE)
    ctl.send(new, arklet.CMD_INSTALL_BIZ, V1)
    await async_wait_until(lambda: _at_least(ctl.of(new, arklet.BIZ), 1), 10, what="the new JVM answers")
    beats = len(ctl.of(base, arklet.HEART))
    await async_wait_until(lambda: _at_least(ctl.of(new, arklet.HEART), 3), 10)
    assert len(ctl.of(base, arklet.HEART)) == beats, "the old ID fell silent"


async def test_1_3_2_has_the_old_heartbeat_but_names_its_replies(start: Start) -> None:
    sim, ctl = await start(dialect="1.3.2")
    base = next(iter(sim.bases))
    assert is_uuid(base)
    hb = (await async_wait_until(lambda: _at_least(ctl.of(base, arklet.HEART), 1), 10, what="heartbeat"))[0]
    assert set(hb.data) == {"masterBizInfo", "networkInfo", "state"}
    assert not ctl.of(base, arklet.QUERY_BASELINE)
    ctl.send(base, arklet.CMD_INSTALL_BIZ, V1)
    ctl.send(base, arklet.CMD_INSTALL_BIZ, FAILING)
    ops = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.BIZ_OPERATION), 2), 10, what="replies")
    parsed = sorted((arklet_parse.parse_biz_operation(o.data) for o in ops), key=lambda op: op.biz_name)
    assert [(op.key, op.success) for op in parsed] == [("badbiz:0.0.1", False), ("biz1:0.0.1", True)]
    ctl.send(base, arklet.CMD_QUERY_ALL_BIZ)
    [listed] = await async_wait_until(lambda: _at_least(ctl.of(base, arklet.SIMPLE_BIZ), 1), 10, what="simpleBiz")
    assert [b.key for b in arklet_parse.parse_simple_biz(listed.data)] == ["biz1:0.0.1"]
    assert not ctl.of(base, arklet.BIZ)
