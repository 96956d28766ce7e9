"""Old and current MQTT dialects and an HTTP-tunnel base in one cluster, and a restarted base made
whole by its baseline: the provider and base-sim as subprocesses, the real control plane and mosquitto (README "Compatibility")."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest

from devcluster.processes import free_port
from koupleless import arklet, keys
from tests.e2e.phasewatch import PhaseWatch
from tests.e2e.provider.conftest import System, node_ready
from tests.e2e.provider.modules import URL_V1, URL_V2, base_of, live, pods, sample_deployment, wait_live_ready
from tests.e2e.provider.test_faults import Wire
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

DEPLOY = "deployment/test-module-deployment"


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def versions(system: System, sims: list[Any]) -> dict[str, set[str]]:
    """base ID -> versions of biz1 ACTIVATED on it, for every simulated base."""
    return {b: {m["version"] for m in v["modules"] if m["name"] == "biz1" and m["state"] == "ACTIVATED"}
            for sim in sims for b, v in sim.bases().items()}


def test_old_current_and_http_bases_release_scale_replace_roll_back_lose_a_base_and_go_offline(
        system: System, namespace: str) -> None:
    port = free_port()
    system.start_provider("--gone-after", "10", "--http-tunnel-port", str(port), "--http-heartbeat-interval", "1")
    current = system.start_sim(count=1, id_prefix=f"{system.env[3:]}-cur-")
    old = system.start_sim("--dialect", "1.3.0", count=1, id_prefix="slot-130-")
    newer_old = system.start_sim("--dialect", "1.3.2", count=1, id_prefix="slot-132-")
    http = system.start_sim("--tunnel", "http", "--http-heartbeat-endpoint", f"http://127.0.0.1:{port}", count=1,
                            id_prefix=f"{system.env[3:]}-http-")
    sims = [current, old, newer_old, http]
    [old_id] = old.bases()
    [newer_old_id] = newer_old.bases()
    assert is_uuid(old_id) and is_uuid(newer_old_id)
    nodes = system.wait_nodes_ready(4)
    names = {n["metadata"]["name"] for n in nodes}
    assert {keys.vnode_name(old_id), keys.vnode_name(newer_old_id)} <= names
    for n in nodes:
        labels = n["metadata"]["labels"]
        assert (labels[keys.LABEL_BASE_NAME], labels[keys.LABEL_BASE_VERSION]) == ("base", "1.1.1")

    # release, then scale to one copy on every base: old, current, HTTP
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_live_ready(system, namespace, 1)
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=4")
    scaled = wait_live_ready(system, namespace, 4)
    assert sorted(base_of(p) for p in scaled) == sorted(versions(system, sims))
    assert all(v == {"0.0.1-SNAPSHOT"} for v in versions(system, sims).values())

    # replace: the new jar and its BIZ_VERSION
    container = {"name": "biz1", "image": URL_V2, "env": [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]}
    system.cp.kubectl("patch", DEPLOY, "-n", namespace, "-p",
                      json.dumps({"spec": {"template": {"spec": {"containers": [container]}}}}))
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=150s", timeout=160)
    wait_until(lambda: all(v == {"0.0.2-SNAPSHOT"} for v in versions(system, sims).values()), 60,
               what="every base on 0.0.2")
    assert all(p["spec"]["containers"][0]["image"] == URL_V2 for p in wait_live_ready(system, namespace, 4))

    # roll back
    system.cp.kubectl("rollout", "undo", DEPLOY, "-n", namespace)
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=150s", timeout=160)
    wait_until(lambda: all(v == {"0.0.1-SNAPSHOT"} for v in versions(system, sims).values()), 60,
               what="every base back on 0.0.1")
    before = wait_live_ready(system, namespace, 4)

    # base loss: a 1.3.0 JVM restarts under a new UUID, a new Node; the old one is lost like a dead
    # base, and its module Pod is made again on the new one
    lost = next(p for p in before if base_of(p) == old_id)
    restarted = old._call("POST", f"/bases/{old_id}/restart")
    new_id = restarted["baseID"]
    assert is_uuid(new_id) and new_id != old_id and restarted["slot"] == "slot-130-0"
    wait_until(lambda: node_ready(system.kubectl_json("get", "node", keys.vnode_name(new_id))) == "True", 60,
               what="the new JVM's Node Ready")
    wait_until(lambda: keys.vnode_name(old_id) not in {n["metadata"]["name"] for n in system.nodes()}, 120,
               what="the old JVM's Node gone")
    after = wait_live_ready(system, namespace, 4, timeout=180)
    assert lost["metadata"]["uid"] not in {p["metadata"]["uid"] for p in after}
    assert sorted(base_of(p) for p in after) == sorted(versions(system, sims))
    assert versions(system, sims)[new_id] == {"0.0.1-SNAPSHOT"}

    # offline
    system.cp.kubectl("delete", DEPLOY, "-n", namespace)
    wait_until(lambda: not pods(system, namespace), 90, what="module Pods gone")
    wait_until(lambda: all(not v["modules"] for sim in sims for v in sim.bases().values()), 60,
               what="modules uninstalled from every base")


def test_a_base_restarting_empty_is_whole_again_from_one_baseline(system: System, namespace: str) -> None:
    system.start_provider()
    # installs take a moment: the batch is out for a while, and no installBiz may join it meanwhile
    sim = system.start_sim("--install-delay", "1", count=2)
    system.wait_nodes_ready(2)
    wire = Wire(system.broker, system.env)
    try:
        system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
        system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
        ready = wait_live_ready(system, namespace, 2)
        pod = ready[0]
        base_id = base_of(pod)
        watch = PhaseWatch(system.cp, namespace).start()
        try:
            start = len(wire.messages)
            before = sim.bases()[base_id]
            sim.restart(base_id)

            def on_base(kind: str) -> list[bytes]:
                topic = arklet.topic(system.env, base_id, kind)
                return [p for t, p in wire.messages[start:] if t == topic]

            wait_until(lambda: on_base(arklet.BATCH_INSTALL_RESPONSE), 60, what="the base's batch answer")
            back = wait_live_ready(system, namespace, 2)
            assert {p["metadata"]["uid"] for p in back} == {p["metadata"]["uid"] for p in ready}, "same Pods"
            wait_until(lambda: watch.pods[pod["metadata"]["uid"]].seen[-1].ready == "True", 30)
        finally:
            watch.stop()

        # one question, one answer, one batch, and no installBiz of its own
        assert len(on_base(arklet.QUERY_BASELINE)) == 1
        [baseline] = on_base(arklet.CMD_BASELINE)
        assert orjson.loads(baseline) == [{"bizName": "biz1", "bizVersion": "0.0.1-SNAPSHOT", "bizUrl": URL_V1}]
        assert len(on_base(arklet.BATCH_INSTALL_RESPONSE)) == 1
        assert on_base(arklet.CMD_INSTALL_BIZ) == []
        after = sim.bases()[base_id]
        assert after["install_commands"] == before["install_commands"] and after["baselines"] == before["baselines"] + 1
        assert [(m["name"], m["state"]) for m in after["modules"]] == [("biz1", "ACTIVATED")]

        # Ready again once the batch answered, and never NotReady after that
        readiness = [s.ready for s in watch.pods[pod["metadata"]["uid"]].seen]
        collapsed = [r for i, r in enumerate(readiness) if i == 0 or readiness[i - 1] != r]
        assert collapsed in (["True"], ["True", "False", "True"]), collapsed
        restarted = next(p for p in live(pods(system, namespace)) if p["metadata"]["uid"] == pod["metadata"]["uid"])
        assert restarted["status"]["containerStatuses"][0]["restartCount"] == 1
    finally:
        wire.close()
