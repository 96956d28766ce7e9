"""Release paths as real clusters run them, through the whole system `scripts/dev` starts (webhook,
extender registered with kube-scheduler, provider, three simulated bases): Pods that bypass the
scheduler, Pods that are not modules, and a Node an operator deletes."""

from __future__ import annotations

import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devcluster.processes import ManagedProcess, free_port
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


def module_template(app: str, jar: str, version: str) -> str:
    """A module Pod template written like the seed's Deployment's, without the toleration."""
    return f"""
  template:
    metadata:
      labels: {{app: {app}, module-controller.koupleless.io/component: module}}
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
"""


def module_deployment(ns: str, name: str, jar: str, version: str) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}""" + module_template(name, jar, version) + """      tolerations:
      - {key: schedule.koupleless.io/virtual-node, operator: Equal, value: "True", effect: NoExecute}
"""


def module_daemonset(ns: str, jar: str, version: str) -> str:
    return f"""
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: biz1-everywhere, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: biz1-everywhere}}}}""" + module_template("biz1-everywhere", jar, version)


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


SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "module-deployment.yaml"
DEPLOY = "deployment/test-module-deployment"
SAMPLE_JAR_2 = ("https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
                "biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar")


def versions_on_bases(stack: DevStack, name: str = "biz1") -> dict[str, list[str]]:
    """Versions of module `name` each base holds, ACTIVATED or not."""
    return {b: sorted(m["version"] for m in v["modules"] if m["name"] == name) for b, v in bases(stack).items()}


def test_peer_rolling_update_of_the_seed_sample_completes_and_rolls_back(stack: DevStack) -> None:
    kubectl = stack.plane.kubectl
    before = {b: v["installs"] for b, v in bases(stack).items()}
    kubectl("apply", "-f", str(SAMPLE))  # the seed's sample, unchanged
    try:
        kubectl("scale", DEPLOY, "-n", "default", "--replicas=3")
        wait_until(lambda: versions_on_bases(stack) == {b: ["0.0.1-SNAPSHOT"] for b in before}
                   and len([p for p in stack.sample_pods() if ready(p)]) == 3, 120,
                   what="3 replicas, one on each of the 3 bases")
        # replace, as README says: the jar and its version in one rollout
        kubectl("rollout", "pause", DEPLOY, "-n", "default")
        warned = kubectl("set", "image", DEPLOY, "-n", "default", f"biz1={SAMPLE_JAR_2}")
        assert "BIZ_VERSION 0.0.1-SNAPSHOT" in warned.stderr and "0.0.2-SNAPSHOT" in warned.stderr, warned.stderr
        kubectl("set", "env", DEPLOY, "-n", "default", "-c", "biz1", "BIZ_VERSION=0.0.2-SNAPSHOT")
        kubectl("rollout", "resume", DEPLOY, "-n", "default")
        kubectl("rollout", "status", DEPLOY, "-n", "default", "--timeout=240s", timeout=260)
        wait_until(lambda: versions_on_bases(stack) == {b: ["0.0.2-SNAPSHOT"] for b in before}, 90,
                   what="every base runs only 0.0.2-SNAPSHOT")
        kubectl("rollout", "undo", DEPLOY, "-n", "default", "--to-revision=1")
        kubectl("rollout", "status", DEPLOY, "-n", "default", "--timeout=240s", timeout=260)
        wait_until(lambda: versions_on_bases(stack) == {b: ["0.0.1-SNAPSHOT"] for b in before}, 90,
                   what="every base back on only 0.0.1-SNAPSHOT")
        after = bases(stack)
        # each base installed 0.0.1, 0.0.2, then 0.0.1 again: once each, nothing repeated
        assert {b: v["installs"] - before[b] for b, v in after.items()} == {b: 3 for b in before}
        assert all(v["repeats"] == 0 for v in after.values())
    finally:
        kubectl("delete", DEPLOY, "-n", "default", "--wait=true", check=False, timeout=120)
    wait_until(lambda: not stack.sample_pods() and all(v == [] for v in versions_on_bases(stack).values()), 90,
               what="offline: Pods gone, modules uninstalled")


def test_module_daemonset_one_per_matching_base_rolls_survives_drain_and_goes_offline(stack: DevStack,
                                                                                       ns: str) -> None:
    kubectl = stack.plane.kubectl
    matching = sorted(bases(stack))
    # one more base, of another version: the DaemonSet must leave it alone
    other_port = free_port()
    other = ManagedProcess("base-sim-2", [
        sys.executable, "-m", "koupleless.cli", "base-sim", "--mqtt-broker", stack.broker.address, "--env",
        stack.options.env, "--count", "1", "--version", "2.0.0", "--id-prefix", f"other-{ns}-",
        "--status-port", str(other_port), *stack.base_logins([f"other-{ns}-0"])], stack.workdir / "logs" / f"base-sim-{ns}.log").start()
    try:
        wait_until(lambda: len(stack.ready_vnodes()) == len(matching) + 1, 90, what="the 2.0.0 base's Node Ready")
        # written like the seed's Deployment template, without even the toleration: the webhook adds it
        kubectl("apply", "-f", "-", input=module_daemonset(ns, JAR_1, "0.0.1-SNAPSHOT"))

        def one_per_base(version: str) -> list[dict[str, Any]] | None:
            items = [p for p in pods(stack, ns) if not p["metadata"].get("deletionTimestamp")]
            good = [p for p in items if ready(p) and p["spec"]["containers"][0]["env"][0]["value"] == version]
            on = sorted(p["spec"]["nodeName"] for p in good)
            if on != [keys.vnode_name(b) for b in matching] or len(items) != len(matching):
                return None
            return items if versions_on_bases(stack) == {b: [version] for b in matching} else None

        wait_until(lambda: one_per_base("0.0.1-SNAPSHOT"), 120, what="one biz1 Pod Running on each 1.1.1 base")
        assert all(m["name"] != "biz1" for v in bases_of(other_port).values() for m in v["modules"])

        # a template change rolls to every base
        kubectl("set", "image", "daemonset/biz1-everywhere", "-n", ns, f"biz1={JAR_2}")
        kubectl("set", "env", "daemonset/biz1-everywhere", "-n", ns, "-c", "biz1", "BIZ_VERSION=0.0.2-SNAPSHOT")
        kubectl("rollout", "status", "daemonset/biz1-everywhere", "-n", ns, "--timeout=240s", timeout=260)
        wait_until(lambda: one_per_base("0.0.2-SNAPSHOT"), 120, what="0.0.2-SNAPSHOT on every 1.1.1 base")

        # drain: DaemonSet Pods are ignored, as Kubernetes defines --ignore-daemonsets; the drain completes
        drained = keys.vnode_name(matching[0])
        kubectl("drain", drained, "--ignore-daemonsets", "--timeout=120s", timeout=150)
        try:
            assert kjson(stack, "get", "node", drained)["spec"].get("unschedulable") is True
            assert one_per_base("0.0.2-SNAPSHOT"), "the module on the drained base stays, as a DaemonSet's does"
        finally:
            kubectl("uncordon", drained)

        delete_without_force(stack, ns, "daemonset", "biz1-everywhere")
        wait_until(lambda: not pods(stack, ns) and all(v == [] for v in versions_on_bases(stack).values()), 90,
                   what="deleting the DaemonSet uninstalls it everywhere")
    finally:
        other.stop()


def bases_of(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/bases", timeout=5) as resp:
        return dict(orjson.loads(resp.read())["bases"])
