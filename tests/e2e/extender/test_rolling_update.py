"""A peer rolling update through the real kube-scheduler and the extender: the seed's sample
Deployment (maxSurge 30% -> 1, maxUnavailable 30% -> 0 at 3 replicas) on 3 full bases, then
replaced. Each surge Pod can only go to a base that runs the old version, which SOFAArk upgrades in
place; another workload's module of the same name never gets such a base.

No provider runs here (nothing installs): the scheduling is asserted. To let the Deployment go on
past its first surge Pod, `PodStatuses` stands in for the provider's status writes: a Pod bound to a
base becomes Ready, and the module it replaced there (same bizName) goes NotReady, as the provider
shows a version SOFAArk deactivated; a Pod being deleted is deleted at once."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from koupleless import keys
from koupleless.kube import ApiError, pod_path
from tests.e2e.extender.conftest import RunningExtender, get_json, module_pod_spec
from tests.e2e.extender.test_scheduling import failed_scheduling, pods_by_name
from tests.e2e.extender.vnodes import VirtualNodes
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

OLD_VERSION = "0.0.1-SNAPSHOT"
NEW_VERSION = "0.0.2"
NEW_JAR = ("https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
           f"biz1-web-single-host-{NEW_VERSION}-ark-biz.jar")


def seed_deployment(name: str, namespace: str, base: str, *, replicas: int = 3,
                    version: str = OLD_VERSION) -> dict[str, Any]:
    """The seed's sample (its strategy, revisionHistoryLimit, labels), with this test's base name,
    and what the webhook adds (module resource, scheduler name); version = the module's."""
    spec = module_pod_spec(biz="biz1", base=base)
    if version != OLD_VERSION:
        container = spec["containers"][0]
        container["image"] = NEW_JAR
        container["env"] = [{"name": keys.ENV_BIZ_VERSION, "value": version}]
    labels = {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE, "app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "30%", "maxUnavailable": "30%"}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def biz_version(pod: dict[str, Any]) -> str:
    return next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == keys.ENV_BIZ_VERSION)


class PodStatuses:
    """The provider's status writes, reduced to what a Deployment's progress reads."""

    def __init__(self, vnodes: VirtualNodes, namespace: str) -> None:
        self.vnodes = vnodes
        self.namespace = namespace

    def step(self) -> None:
        self.vnodes.run(self._step())

    async def _step(self) -> None:
        client = self.vnodes.client
        pods = (await client.list(pod_path(self.namespace)))["items"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                await client.delete(pod_path(self.namespace, meta["name"]), grace_period_seconds=0)
        # Per base, the newest Pod holding biz1 is the active version; older ones are deactivated.
        for pod in live:
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            newer = [p for p in live if p["spec"].get("nodeName") == node
                     and p["metadata"]["creationTimestamp"] > pod["metadata"]["creationTimestamp"]]
            ready = "False" if newer else "True"
            if _ready(pod) == ready:
                continue
            status = {"phase": "Running", "conditions": [
                {"type": kind, "status": ready, "lastTransitionTime": now}
                for kind in ("Initialized", "Ready", "ContainersReady")]}
            try:
                await client.patch(pod_path(self.namespace, pod["metadata"]["name"]), {"status": status},
                                   "strategic", subresource="status")
            except ApiError as exc:
                if not exc.not_found:  # deleted meanwhile
                    raise


def _ready(pod: dict[str, Any]) -> str | None:
    if pod.get("status", {}).get("phase") != "Running":
        return None
    return next((c["status"] for c in pod["status"].get("conditions") or [] if c["type"] == "Ready"), None)


def rolled_out(cp: ControlPlane, statuses: PodStatuses, name: str, namespace: str, version: str) -> bool:
    """Advance the Pods' statuses once; True when the Deployment's rollout has completed at `version`."""
    statuses.step()
    deployment = get_json(cp, "deployment", name, "-n", namespace)
    status = deployment["status"]
    pods = [p for p in pods_by_name(cp, namespace).values() if not p["metadata"].get("deletionTimestamp")]
    return (status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("replicas") == status.get("availableReplicas") == 3
            and len(pods) == 3 and all(biz_version(p) == version for p in pods))


def test_the_seeds_rolling_update_at_replicas_equal_bases_upgrades_each_base_in_place(
    control_plane: ControlPlane, extender: RunningExtender, vnodes: VirtualNodes, namespace: str
) -> None:
    cp = control_plane
    base = f"base-{namespace}"
    names = [f"virtual-node-{namespace}-{i}" for i in range(3)]
    # One module slot per base: the surge Pod also proves that neither kube-scheduler (the module
    # resource is ignoredByScheduler) nor the extender asks for a second slot for an upgrade.
    vnodes.add_many(names, base=base, max_modules=1)
    cp.kubectl("apply", "-f", "-", input=json.dumps(seed_deployment("sample", namespace, base)))

    def placed(pods: dict[str, dict[str, Any]]) -> dict[str, str]:
        return {n: p["spec"]["nodeName"] for n, p in pods.items() if p["spec"].get("nodeName")}

    old = wait_until(lambda: (lambda got: got if len(got) == 3 else None)(placed(pods_by_name(cp, namespace))),
                     timeout=90, what="3 replicas scheduled")
    assert sorted(old.values()) == sorted(names)

    # Replace the module (new jar + BIZ_VERSION): one revision.
    cp.kubectl("apply", "-f", "-", input=json.dumps(seed_deployment("sample", namespace, base, version=NEW_VERSION)))

    def surge() -> tuple[str, dict[str, Any]] | None:
        new = [(n, p) for n, p in pods_by_name(cp, namespace).items() if n not in old]
        return new[0] if len(new) == 1 and new[0][1]["spec"].get("nodeName") else None

    surge_name, surge_pod = wait_until(surge, timeout=90, what="the new ReplicaSet's surge Pod scheduled")
    assert biz_version(surge_pod) == NEW_VERSION
    assert surge_pod["spec"]["nodeName"] in names, "onto a base that holds the old version"
    events = get_json(cp, "events", "-n", namespace, "--field-selector", f"involvedObject.name={surge_name}")["items"]
    assert any(e["reason"] == "Scheduled" for e in events)
    assert not failed_scheduling(cp, namespace, surge_name)
    # maxUnavailable 0: nothing else moves while no Pod is Ready (no provider here).
    assert len(pods_by_name(cp, namespace)) == 4

    # Another workload's biz1 at yet another version: no base, and the reason says why.
    cp.kubectl("apply", "-f", "-", input=json.dumps(seed_deployment("intruder", namespace, base, replicas=1,
                                                                    version="0.0.3")))
    intruder = wait_until(lambda: next((n for n in pods_by_name(cp, namespace) if n.startswith("intruder-")), None),
                          timeout=60, what="the other workload's Pod")
    # (Nodes other tests of the session left behind may add reasons of their own.)
    expected = re.compile(r"0/\d+ nodes are available: (.+, )?3 base already has module biz1[,.]")
    message = wait_until(lambda: next((m for m in failed_scheduling(cp, namespace, intruder) if expected.match(m)),
                                      None), timeout=60, what=f"FailedScheduling for {intruder}: {expected.pattern}")
    assert "3 base already has module biz1" in cp.kubectl("describe", "pod", intruder, "-n", namespace).stdout, message
    assert not pods_by_name(cp, namespace)[intruder]["spec"].get("nodeName")
    cp.kubectl("delete", "deployment", "intruder", "-n", namespace, "--wait=false")

    # With the provider's statuses stood in for, the rollout completes: every base upgraded in place.
    statuses = PodStatuses(vnodes, namespace)
    wait_until(lambda: rolled_out(cp, statuses, "sample", namespace, NEW_VERSION), timeout=180, interval=0.5,
               what="the rollout to complete at the new version")
    nodes = sorted(p["spec"]["nodeName"] for p in pods_by_name(cp, namespace).values()
                   if not p["metadata"].get("deletionTimestamp"))
    assert nodes == sorted(names)
    cp.kubectl("rollout", "status", "deployment/sample", "-n", namespace, "--timeout=30s")

    # `rollout undo`: the old version goes back the same way.
    cp.kubectl("rollout", "undo", "deployment/sample", "-n", namespace, "--to-revision=1")
    wait_until(lambda: rolled_out(cp, statuses, "sample", namespace, OLD_VERSION), timeout=180, interval=0.5,
               what="the rollback to complete at the old version")
    nodes = sorted(p["spec"]["nodeName"] for p in pods_by_name(cp, namespace).values()
                   if not p["metadata"].get("deletionTimestamp"))
    assert nodes == sorted(names)
