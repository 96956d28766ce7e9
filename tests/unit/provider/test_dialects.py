"""Old-dialect bases, the baseline answer and large replies, through the real registry and reconciler
(tests/unit/provider/rig.py): what a user sees on the Node and the Pods, and what goes on the wire."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from koupleless import arklet, arklet_base_payloads, keys
from provider import vnode
from provider.bases import LEGACY_HEARTBEAT_MAX_S
from tests.unit.provider.rig import ENV, URL1, URL2, Rig, ready

UUID = "3f2b8c1e-9d4a-4c7e-8b1f-2a6d5e9c0f13"
NODE = keys.VNODE_NAME_PREFIX + UUID
INSTALL = arklet.CMD_INSTALL_BIZ
FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "bizoperation_install_2500_jars.json"


def old_heartbeat(rig: Rig, base_id: str = UUID) -> None:
    rig.say(base_id, arklet.HEART, {"masterBizInfo": {"name": "base-web", "version": "2.1.5"},
                                    "networkInfo": {"localIP": "10.2.3.4", "localHostName": "base-web-5f7c"},
                                    "state": "ACTIVATED"})


def old_module_list(rig: Rig, *mods: tuple[str, str], base_id: str = UUID) -> None:
    items = [{"bizName": n, "bizState": "activated", "bizVersion": v, "mainClass": "M", "webContextPath": n,
              "bizStateRecords": [{"changeTime": 1, "state": "ACTIVATED", "reason": "STARTED", "message": None}]}
             for n, v in mods]
    rig.say(base_id, arklet.BIZ, {"code": "SUCCESS", "message": "", "data": items})


def old_failure(rig: Rig, command: str = INSTALL, base_id: str = UUID) -> None:
    rig.say(base_id, arklet.BIZ_OPERATION, {"command": command, "response": {
        "code": "FAILED", "message": "install biz failed",
        "data": {"code": "FAILED", "message": "java.io.FileNotFoundException: biz1.jar", "bizInfos": []}}})


def old_online(rig: Rig) -> None:
    old_heartbeat(rig)
    rig.base(UUID).owned = True
    old_module_list(rig)


def test_an_old_dialect_base_is_a_node_named_by_its_uuid_labelled_by_its_master_biz() -> None:
    rig = Rig()
    old_heartbeat(rig)
    base = rig.base(UUID)
    assert base.node_name == NODE and base.ready and base.ip == "10.2.3.4"
    labels = vnode.node_labels(base, vnode.NodeOptions(env=ENV))
    assert labels[keys.LABEL_BASE_NAME] == "base-web" and labels[keys.LABEL_BASE_VERSION] == "2.1.5"
    assert labels[keys.LABEL_BASE_CLUSTER_NAME] == "base-web"
    assert rig.tunnel.commands(arklet.CMD_QUERY_ALL_BIZ), "its modules are asked for, as any new base's"


async def test_an_old_base_answers_an_install_only_with_its_module_list() -> None:
    rig = Rig()
    old_online(rig)
    rig.add_pod("p", node=NODE)
    await rig.settle()
    assert len(rig.tunnel.commands(INSTALL)) == 1 and not ready(rig.pod("p"))
    old_module_list(rig, ("biz1", "0.0.1"))
    await rig.settle()
    assert ready(rig.pod("p"))
    assert "Installed" in rig.events.reasons("p")
    assert not rig.base(UUID).pending

    # offline: the uninstall is answered the same way, and the Pod goes without waiting for a timeout
    rig.delete_pod("p")
    await rig.settle()
    assert rig.tunnel.commands(arklet.CMD_UNINSTALL_BIZ) == [{"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": URL1}]
    old_module_list(rig)
    await rig.settle()
    assert "ns/p" not in rig.kube.pods and "Uninstalled" in rig.events.reasons("p")


async def test_an_old_failure_naming_no_biz_fails_the_one_install_in_flight() -> None:
    rig = Rig()
    old_online(rig)
    rig.add_pod("p", node=NODE)
    await rig.settle()
    old_failure(rig)
    await rig.settle()
    assert rig.waiting("p")["reason"] == "InstallFailed"
    assert "java.io.FileNotFoundException: biz1.jar" in rig.waiting("p")["message"]
    assert "InstallFailed" in rig.events.reasons("p")


async def test_an_old_failure_with_several_installs_in_flight_is_left_to_their_timeouts() -> None:
    rig = Rig()
    old_online(rig)
    rig.add_pod("a", node=NODE)
    rig.add_pod("b", node=NODE, image="https://h/biz2-0.0.1-ark-biz.jar", container="biz2")
    await rig.settle()
    assert len(rig.tunnel.commands(INSTALL)) == 2
    old_failure(rig)
    await rig.settle()
    assert len(rig.base(UUID).pending) == 2, "neither install is taken for failed on a guess"
    assert "InstallFailed" not in rig.events.reasons("a") + rig.events.reasons("b")


def test_an_old_base_is_judged_by_its_own_heartbeat_interval() -> None:
    rig = Rig(heartbeat_interval=10.0, missed_heartbeats=3)
    old_heartbeat(rig)
    rig.heartbeat("b1")
    base, current = rig.base(UUID), rig.base("b1")
    assert base.heartbeat_every == LEGACY_HEARTBEAT_MAX_S, "1.3.0 beats every 120 s: wait for its second one"
    later = time.monotonic() + 60
    rig.registry.judge(later)
    assert base.ready and not current.ready
    # its second heartbeat shows it beats every ~10 s (runtime 1.3.2): judged by that from now on
    base.last_heartbeat_at -= 10
    old_heartbeat(rig)
    assert base.heartbeat_every is not None and 9 < base.heartbeat_every < 12
    rig.registry.judge(time.monotonic() + 60)
    assert not base.ready and base.not_ready_reason == "BaseHeartbeatMissed"


def test_query_baseline_from_a_base_not_yet_heard_of_gets_an_empty_baseline() -> None:
    rig = Rig()
    rig.say("b9", arklet.QUERY_BASELINE, {"identity": "b9", "name": "base", "version": "1.1.1", "clusterName": "c"})
    assert rig.tunnel.commands(arklet.CMD_BASELINE) == [[]]
    assert rig.registry.get("b9") is None, "the base is known from its first heartbeat on"


def test_a_providers_own_baseline_answer_is_not_read_as_a_base_message(caplog: pytest.LogCaptureFixture) -> None:
    """The answer goes out under the base/ subtree every provider replica reads."""
    rig = Rig()
    rejected = REGISTRY.get_sample_value("koupleless_provider_mqtt_rejected_total", {"reason": "unknown_topic"}) or 0
    rig.registry.handle(arklet.topic(ENV, "b9", arklet.CMD_BASELINE), b"[]")
    assert (REGISTRY.get_sample_value("koupleless_provider_mqtt_rejected_total", {"reason": "unknown_topic"}) or 0) \
        == rejected
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_restarted_base_is_whole_again_from_its_baseline_with_no_install_of_its_own() -> None:
    rig = Rig()
    rig.online("b1")
    rig.add_pod("p")
    rig.add_pod("q", image="https://h/biz2-0.0.1-ark-biz.jar", container="biz2")
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1")
    model2 = arklet.BizModel("biz2", "0.0.1", "https://h/biz2-0.0.1-ark-biz.jar")
    rig.say("b1", arklet.BIZ_OPERATION, arklet_base_payloads.biz_operation_data(INSTALL, model2, "SUCCESS", biz_state="ACTIVATED"))
    await rig.settle()
    assert ready(rig.pod("p")) and ready(rig.pod("q"))
    installs = len(rig.tunnel.commands(INSTALL))

    # killed, then a new JVM: silent long enough to be NotReady, then queryBaseline and a heartbeat
    rig.registry.judge(time.monotonic() + 120)
    assert not rig.base("b1").ready
    rig.say("b1", arklet.QUERY_BASELINE, {"identity": "b1", "name": "base", "version": "1.1.1", "clusterName": "c"})
    rig.heartbeat("b1")
    rig.inventory("b1")  # empty: the batch is still being installed
    await rig.settle()
    [baseline] = rig.tunnel.commands(arklet.CMD_BASELINE)
    assert sorted(m["bizUrl"] for m in baseline) == sorted([URL1, model2.biz_url])
    assert len(rig.tunnel.commands(INSTALL)) == installs, "no installBiz of its own while the batch is out"
    assert not ready(rig.pod("p"))

    v1 = arklet.BizModel("biz1", "0.0.1", URL1)
    rig.say("b1", arklet.BATCH_INSTALL_RESPONSE, arklet_base_payloads.batch_install_response_data({
        URL1: arklet_base_payloads.batch_install_entry(arklet.CODE_SUCCESS, "", v1, arklet.ACTIVATED),
        model2.biz_url: arklet_base_payloads.batch_install_entry(arklet.CODE_SUCCESS, "", model2, arklet.ACTIVATED),
    }))
    await rig.settle()
    assert ready(rig.pod("p")) and ready(rig.pod("q"))
    assert rig.pod("p")["status"]["containerStatuses"][0]["restartCount"] == 1
    assert len(rig.tunnel.commands(INSTALL)) == installs
    assert not rig.base("b1").pending
    # an inventory the base took before the batch landed does not undo it
    rig.say("b1", arklet.SIMPLE_BIZ, [], ts=rig.ts - 5)
    await rig.settle()
    assert ready(rig.pod("p")) and ready(rig.pod("q"))


async def test_a_lost_baseline_answer_falls_back_to_the_install_timeout() -> None:
    rig = Rig(install_timeout=5.0)
    rig.online("b1")
    rig.add_pod("p")
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    rig.say("b1", arklet.QUERY_BASELINE, {"identity": "b1", "name": "base", "version": "1.1.1", "clusterName": "c"})
    rig.inventory("b1")
    await rig.settle()
    [[sent]] = rig.tunnel.commands(arklet.CMD_BASELINE)
    assert sent["bizUrl"] == URL1
    pend = rig.reconciler.records["ns/p"].pending["biz1"]
    assert pend.baseline
    pend.sent_at -= 10  # the batch answer never came
    rig.queued.append("ns/p")
    await rig.settle()
    assert rig.waiting("p")["reason"] == "InstallFailed" and "did not answer" in rig.waiting("p")["message"]


async def test_an_install_reply_carrying_2500_jars_installs_the_module() -> None:
    rig = Rig()
    rig.online("b1")
    rig.add_pod("big", image=URL2, version="0.0.1-SNAPSHOT", container="biz1-web-single-host")
    await rig.settle()
    [asked] = rig.tunnel.commands(INSTALL)
    assert asked["bizName"] == "biz1-web-single-host"
    rig.registry.handle(arklet.topic(ENV, "b1", arklet.BIZ_OPERATION), FIXTURE.read_bytes())
    await rig.settle()
    assert rig.base("b1").bizs["biz1-web-single-host:0.0.1-SNAPSHOT"].state == arklet.ACTIVATED
    assert ready(rig.pod("big"))
    assert "Installed" in rig.events.reasons("big")
