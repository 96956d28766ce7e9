"""The Pod reconciler against a fake API server and a recording tunnel: every way a message can be
lost, late, duplicated, replayed or wrong still ends in the state a user expects."""

from __future__ import annotations

from koupleless import arklet, arklet_base_payloads
from tests.unit.provider.rig import URL1, URL2, Rig, ready

INSTALL, UNINSTALL = arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ


async def running(rig: Rig, name: str) -> None:
    """A module Pod of biz1:0.0.1 on b1, installed: the base answered SUCCESS."""
    rig.add_pod(name)
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()


async def install_timed_out() -> Rig:
    """A Pod whose installBiz went unanswered past --install-timeout 3."""
    rig = Rig(install_timeout=3)
    rig.online()
    rig.add_pod("p")
    await rig.settle()
    age(rig, 4)
    await rig.settle()
    return rig


def age(rig: Rig, seconds: float) -> None:
    """Make every command in flight and every back-off `seconds` older, as if time had passed."""
    for rec in rig.reconciler.records.values():
        for pend in rec.pending.values():
            if pend.sent_at is not None:
                pend.sent_at -= seconds
        for fail in rec.failed.values():
            fail.retry_at -= seconds
    for key in list(rig.reconciler.records):
        rig._queue(key)


async def test_happy_path_install_then_ready() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("p")
    await rig.settle()
    assert rig.tunnel.commands(INSTALL) == [{"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": rig.pod("p")["spec"]
                                            ["containers"][0]["image"]}]
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert ready(rig.pod("p"))
    assert rig.events.reasons("p") == ["Installing", "Installed"]


async def test_install_sent_during_an_outage_goes_out_again_when_the_base_is_heard() -> None:
    rig = Rig()
    rig.online()
    rig.tunnel.connected.clear()
    rig.registry.connection_changed(False)
    rig.add_pod("p")
    await rig.settle()
    [pend] = rig.reconciler.records["ns/p"].pending.values()
    assert pend.sent_at is None  # no timeout runs for a command that could not be sent
    # the broker comes back empty: our install was lost with it
    rig.tunnel.connected.set()
    rig.tunnel.connect_count += 1
    rig.registry.connection_changed(True)
    rig.heartbeat()
    await rig.settle()
    assert len(rig.tunnel.commands(INSTALL)) == 2
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert ready(rig.pod("p"))


async def test_timed_out_install_backs_off_retries_and_a_late_success_is_adopted() -> None:
    rig = await install_timed_out()
    waiting = rig.waiting("p")
    assert waiting["reason"] == "InstallFailed" and "did not answer installBiz biz1:0.0.1 within 3s" in waiting["message"]
    assert "InstallFailed" in rig.events.reasons("p")
    # retried after the back-off, never final
    age(rig, 11)
    await rig.settle()
    assert len(rig.tunnel.commands(INSTALL)) == 2
    age(rig, 4)
    await rig.settle()
    assert "2 tries" in rig.waiting("p")["message"]
    # the base finishes the first install late: the Pod runs, the failure is gone
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert ready(rig.pod("p"))
    assert rig.pod("p")["status"]["containerStatuses"][0]["restartCount"] == 0


async def test_inventory_showing_the_module_active_adopts_it_without_a_reply() -> None:
    rig = await install_timed_out()
    assert rig.waiting("p")["reason"] == "InstallFailed"
    rig.inventory("b1", ("biz1", "0.0.1"))
    await rig.settle()
    assert ready(rig.pod("p"))
    assert len(rig.tunnel.commands(INSTALL)) == 1


async def test_repeat_biz_means_installed() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("p")
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1", code="FAILED", message="REPEAT_BIZ: biz biz1:0.0.1 has been installed")
    await rig.settle()
    assert ready(rig.pod("p"))
    assert "InstallFailed" not in rig.events.reasons("p")


async def test_replayed_uninstall_reply_changes_nothing() -> None:
    rig = Rig()
    rig.online()
    await running(rig, "p")
    writes = len(rig.kube.status_writes)
    rig.reply(UNINSTALL, "biz1", "0.0.1")  # nobody asked for this uninstall
    await rig.settle()
    assert ready(rig.pod("p")) and len(rig.kube.status_writes) == writes
    assert len(rig.tunnel.commands(INSTALL)) == 1
    assert rig.tunnel.commands(arklet.CMD_QUERY_ALL_BIZ)  # it asks the base what is true instead


async def test_the_base_installing_another_version_is_shown_never_as_running() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("p", image=URL2, version="0.0.1")  # jar of 0.0.2, BIZ_VERSION kept at 0.0.1
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1", installed_version="0.0.2")
    await rig.settle()
    pod = rig.pod("p")
    assert not ready(pod)
    waiting = rig.waiting("p")
    assert waiting["reason"] == "VersionMismatch"
    assert "biz1:0.0.2" in waiting["message"] and "biz1:0.0.1" in waiting["message"]
    assert pod["status"]["containerStatuses"][0]["containerID"] == "arklet://biz1:0.0.2"
    # deleting the Pod uninstalls what the base really has
    rig.delete_pod("p")
    await rig.settle()
    assert rig.tunnel.commands(UNINSTALL) == [{"bizName": "biz1", "bizVersion": "0.0.2", "bizUrl": URL2}]


async def test_pod_deleted_during_its_install_leaves_nothing_behind() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("p")
    await rig.settle()
    rig.delete_pod("p")
    await rig.settle()
    assert "ns/p" in rig.kube.pods  # waits for the install in flight
    assert rig.events.reasons("p").count("UninstallTimeout") == 0
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert rig.tunnel.commands(UNINSTALL) == [{"bizName": "biz1", "bizVersion": "0.0.1",
                                              "bizUrl": "https://h/biz1-0.0.1-ark-biz.jar"}]
    rig.reply(UNINSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert "ns/p" not in rig.kube.pods


async def test_install_landing_after_its_pod_is_gone_is_uninstalled() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("p")
    await rig.settle()
    rig.delete_pod("p", grace_s=0)
    await rig.settle()
    assert "ns/p" not in rig.kube.pods  # the grace period is over: the deletion completes
    assert "UninstallTimeout" not in rig.events.reasons("p")  # no uninstall was ever sent
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    assert [c["bizVersion"] for c in rig.tunnel.commands(UNINSTALL)] == ["0.0.1"]


async def test_copy_left_on_a_base_cut_off_while_its_pod_was_evicted_is_uninstalled_when_heard() -> None:
    rig = Rig()
    base = rig.online()
    await running(rig, "p")
    rig.registry.set_not_ready(base, "BaseHeartbeatMissed", "silent")
    rig.delete_pod("p")
    await rig.settle()
    assert "ns/p" not in rig.kube.pods and not rig.tunnel.commands(UNINSTALL)
    # healed: the base still has the copy, which no Pod wants
    rig.heartbeat()
    rig.inventory("b1", ("biz1", "0.0.1"))
    await rig.settle()
    assert [c["bizName"] for c in rig.tunnel.commands(UNINSTALL)] == ["biz1"]


async def test_module_installed_outside_kubernetes_follows_the_orphan_policy() -> None:
    rig = Rig()
    rig.online("b1", ("sidecar", "9.9"))
    assert not rig.tunnel.commands(UNINSTALL)
    rig2 = Rig(orphan_policy="uninstall")
    rig2.online("b1", ("sidecar", "9.9"))
    assert [c["bizName"] for c in rig2.tunnel.commands(UNINSTALL)] == ["sidecar"]


async def test_second_pod_of_a_module_on_one_base_fails_and_its_deletion_completes() -> None:
    rig = Rig()
    rig.online()
    await running(rig, "first")
    rig.add_pod("second", version="0.0.1")
    await rig.settle()
    status = rig.pod("second")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "ModuleConflict"
    assert "biz1:0.0.1 for Pod ns/first" in status["message"]
    assert len(rig.tunnel.commands(INSTALL)) == 1 and ready(rig.pod("first"))
    rig.delete_pod("second")
    await rig.settle()
    assert "ns/second" not in rig.kube.pods and not rig.tunnel.commands(UNINSTALL)
    assert ready(rig.pod("first"))


async def test_non_module_pod_is_failed_with_the_cause_and_deleted_at_once() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("agent", labels={"module-controller.koupleless.io/component": "modul"})
    await rig.settle()
    status = rig.pod("agent")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "NotAModule"
    assert "module-controller.koupleless.io/component=modul" in status["message"]
    rig.delete_pod("agent")
    await rig.settle()
    assert "ns/agent" not in rig.kube.pods


async def test_phase_never_goes_back_while_a_restarted_base_reinstalls() -> None:
    rig = Rig()
    rig.online()
    await running(rig, "p")
    assert ready(rig.pod("p"))
    rig.say("b1", arklet.QUERY_BASELINE, rig.base().heartbeat.metadata.to_wire())  # type: ignore[union-attr]
    rig.inventory("b1")  # restarted empty
    await rig.settle()
    pod = rig.pod("p")
    assert pod["status"]["phase"] == "Running" and not ready(pod)
    # reinstalled by its baseline, not by an installBiz of its own
    assert "ModuleLost" in rig.events.reasons("p") and len(rig.tunnel.commands(INSTALL)) == 1
    [baseline] = rig.tunnel.commands(arklet.CMD_BASELINE)
    assert baseline == [{"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": URL1}]
    model = arklet.BizModel("biz1", "0.0.1", URL1)
    rig.say("b1", arklet.BATCH_INSTALL_RESPONSE, arklet_base_payloads.batch_install_response_data(
        {URL1: arklet_base_payloads.batch_install_entry(arklet.CODE_SUCCESS, "", model, arklet.ACTIVATED)}))
    await rig.settle()
    assert ready(rig.pod("p"))
    assert "Pending" not in rig.phases("p")[rig.phases("p").index("Running"):]


def owned_by(rig: Rig, name: str, replicaset: str, template_hash: str) -> None:
    meta = rig.pod(name)["metadata"]
    meta["labels"]["pod-template-hash"] = template_hash
    meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replicaset, "uid": replicaset,
                                "controller": True}]


async def test_next_version_of_the_same_deployment_upgrades_in_place_another_workload_is_refused() -> None:
    rig = Rig()
    rig.online()
    rig.add_pod("old")
    owned_by(rig, "old", "web-aaa", "aaa")
    await rig.settle()
    rig.reply(INSTALL, "biz1", "0.0.1")
    await rig.settle()
    rig.add_pod("new", image=URL2, version="0.0.2")
    owned_by(rig, "new", "web-bbb", "bbb")  # the Deployment's next ReplicaSet
    await rig.settle()
    assert rig.pod("new")["status"]["phase"] != "Failed"
    assert [c["bizVersion"] for c in rig.tunnel.commands(INSTALL)] == ["0.0.1", "0.0.2"]
    rig.add_pod("other", image=URL2, version="0.0.2")
    owned_by(rig, "other", "team-b-ccc", "ccc")  # another Deployment's module of the same name
    await rig.settle()
    assert rig.pod("other")["status"]["reason"] == "ModuleConflict"
