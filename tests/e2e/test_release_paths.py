"""Release paths as real clusters run them, through the whole system `scripts/dev` starts (webhook,
extender registered with kube-scheduler, provider, three simulated bases): Pods that bypass the
scheduler, Pods that are not modules, and a Node an operator deletes."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devcluster.stack import DevStack, StackOptions
from koupleless import keys
from tests.e2e.phasewatch import PhaseWatch
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

JAR_1 = "https://repo.example/modules/biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar"
JAR_2 = "https://repo.example/modules/biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar"
BASE_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": keys.LABEL_BASE_NAME, "operator": "In", "values": ["base"]},
                          {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": ["1.1.1"]}]}]}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    system = DevStack(StackOptions(bases=3, apply_sample=False, workdir=tmp_path_factory.mktemp("paths")),
                      progress=lambda _: None)
    system.start()
    try:
        yield system
    finally:
        system.stop()


@pytest.fixture
def ns(stack: DevStack) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    stack.plane.kubectl("create", "namespace", name)
    stack.plane.wait_for_service_account(name)
    try:
        yield name
    finally:
        stack.plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def kjson(stack: DevStack, *args: str) -> Any:
    return orjson.loads(stack.plane.kubectl(*args, "-o", "json").stdout)


def pods(stack: DevStack, ns: str) -> list[dict[str, Any]]:
    return list(kjson(stack, "get", "pods", "-n", ns)["items"])


def bases(stack: DevStack) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.base_sim_port}/bases", timeout=5) as resp:
        return dict(orjson.loads(resp.read())["bases"])


def sim(stack: DevStack, base_id: str, action: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.base_sim_port}/bases/{base_id}/{action}", method="POST")
    urllib.request.urlopen(req, timeout=5).close()


def ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod.get("status", {}).get("phase") == "Running" and conds.get("Ready") == "True"


def module_deployment(ns: str, name: str, jar: str, version: str) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}, module-controller.koupleless.io/component: module}}
    spec:
      containers:
      - name: biz1
        image: {jar}
        env: [{{name: BIZ_VERSION, value: {version}}}]
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
            - matchExpressions:
              - {{key: base.koupleless.io/name, operator: In, values: [base]}}
              - {{key: base.koupleless.io/version, operator: In, values: [1.1.1]}}
      tolerations:
      - {{key: schedule.koupleless.io/virtual-node, operator: Equal, value: "True", effect: NoExecute}}
"""


def delete_without_force(stack: DevStack, ns: str, *what: str) -> None:
    proc = stack.plane.kubectl("delete", *what, "-n", ns, "--timeout=90s", check=False, timeout=120)
    assert proc.returncode == 0, f"kubectl delete {' '.join(what)} did not complete: {proc.stderr}"


def test_pod_of_another_namespace_pinned_onto_a_base_cannot_displace_its_module(stack: DevStack, ns: str) -> None:
    team_b = ns
    stack.plane.kubectl("apply", "-f", "-", input=module_deployment(team_b, "team-b-biz1", JAR_1, "0.0.1-SNAPSHOT"))
    [holder] = wait_until(lambda: [p for p in pods(stack, team_b) if ready(p)] or None, 90, what="team-b's module Ready")
    node = holder["spec"]["nodeName"]
    base_id = node[len(keys.VNODE_NAME_PREFIX):]
    watch = PhaseWatch(stack.plane, team_b).start()
    team_a = f"{ns}-a"
    stack.plane.kubectl("create", "namespace", team_a)
    stack.plane.wait_for_service_account(team_a)
    try:
        # a bare Pod pinned onto team-b's base: the scheduler and its extender never see it
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "intruder", "namespace": team_a,
                         "labels": {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE}},
            "spec": {"nodeName": node, "containers": [
                {"name": "biz1", "image": JAR_2, "env": [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]}],
                "tolerations": [keys.vnode_toleration()], "affinity": BASE_AFFINITY},
        }
        stack.plane.kubectl("apply", "-f", "-", input=orjson.dumps(pod).decode())

        def failed() -> dict[str, Any] | None:
            [p] = pods(stack, team_a)
            return p if p["status"].get("phase") == "Failed" else None

        refused = wait_until(failed, 60, what="the intruding Pod Failed")
        assert refused["status"]["reason"] == "ModuleConflict"
        assert f"{team_b}/" in refused["status"]["message"] and "biz1:0.0.1-SNAPSHOT" in refused["status"]["message"]
        delete_without_force(stack, team_a, "pod", "intruder")
        # team-b untouched: its module never deactivated, its Pod Ready all along
        modules = [(m["name"], m["version"], m["state"]) for m in bases(stack)[base_id]["modules"]]
        assert modules == [("biz1", "0.0.1-SNAPSHOT", "ACTIVATED")]
        watch.stop()
        assert watch.not_ready_after_ready(holder["metadata"]["uid"]) == []
        assert ready(kjson(stack, "get", "pod", holder["metadata"]["name"], "-n", team_b))
    finally:
        watch.stop()
        stack.plane.kubectl("delete", "namespace", team_a, "--wait=false", check=False)
        stack.plane.kubectl("delete", "deployment", "team-b-biz1", "-n", team_b, check=False)


AGENT_DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: log-agent, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: log-agent}}}}
  template:
    metadata: {{labels: {{app: log-agent}}}}
    spec:
      tolerations: [{{operator: Exists}}]
      containers: [{{name: agent, image: busybox:1.36, command: [sleep, "3600"]}}]
"""


def test_pods_that_are_not_modules_fail_on_bases_and_delete_cleanly(stack: DevStack, ns: str) -> None:
    stack.plane.kubectl("apply", "-f", "-", input=AGENT_DAEMONSET.format(ns=ns))
    mistyped = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "typo", "namespace": ns, "labels": {keys.LABEL_COMPONENT: "modul"}},
        "spec": {"containers": [{"name": "biz1", "image": JAR_1}], "tolerations": [keys.vnode_toleration()],
                 "affinity": BASE_AFFINITY},
    }
    stack.plane.kubectl("apply", "-f", "-", input=orjson.dumps(mistyped).decode())
    vnodes = {n["metadata"]["name"] for n in stack.ready_vnodes()}

    def settled() -> list[dict[str, Any]] | None:
        on_bases = [p for p in pods(stack, ns) if p["spec"].get("nodeName") in vnodes]
        typo_seen = any(p["metadata"]["name"] == "typo" for p in on_bases)
        if not typo_seen or any(p["status"].get("phase") != "Failed" for p in on_bases):
            return None
        return on_bases

    on_bases = wait_until(settled, 90, what="every Pod bound to a base Failed, none left Pending")
    for p in on_bases:
        assert p["status"]["reason"] == "NotAModule", p["status"]
        assert keys.LABEL_COMPONENT in p["status"]["message"]
    typo_pod = next(p for p in on_bases if p["metadata"]["name"] == "typo")
    assert f"{keys.LABEL_COMPONENT}=modul" in typo_pod["status"]["message"]
    delete_without_force(stack, ns, "pod", "typo")
    delete_without_force(stack, ns, "daemonset", "log-agent")
    wait_until(lambda: not [p for p in pods(stack, ns) if p["spec"].get("nodeName") in vnodes], 90,
               what="the agent's Pods gone from every base")
    for base in bases(stack).values():
        assert all(m["name"] != "agent" for m in base["modules"])


def test_deleted_node_of_a_shut_down_base_stays_deleted_until_it_heartbeats(stack: DevStack) -> None:
    leaving = sorted(bases(stack))[-1]
    node = keys.vnode_name(leaving)
    sim(stack, leaving, "shutdown")  # as arklet does: no goodbye, just silence

    def not_ready() -> bool:
        conds = kjson(stack, "get", "node", node)["status"]["conditions"]
        return any(c["type"] == "Ready" and c["status"] != "True" for c in conds)

    wait_until(not_ready, 90, what="the silent base's Node NotReady")
    stack.plane.kubectl("delete", "node", node)
    # An observation window, not a wait for something: for 30 s the Node must stay gone.
    until = time.monotonic() + 30
    while time.monotonic() < until:
        proc = stack.plane.kubectl("get", "node", node, "--ignore-not-found", "-o", "name", check=False)
        assert not proc.stdout.strip(), f"Node {node} came back while its base is silent"
        time.sleep(2)
    sim(stack, leaving, "restart")  # heard again: its Node is back
    wait_until(lambda: any(n["metadata"]["name"] == node for n in stack.ready_vnodes()), 90,
               what="the Node back once its base heartbeats")
    log = Path(stack.components["provider"].log_path).read_text(errors="replace")
    assert "Traceback" not in log
