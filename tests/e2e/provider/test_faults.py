"""Faults a real cluster sees every week (issue 10), end to end: the broker restarts or stays away, a
base is partitioned past its Pods' eviction, an install is slower than --install-timeout or outlives
its Pod, replies are replayed or forged, a heartbeat is dated an hour ahead, two Pods want one module
on one base, a non-module Pod lands on a base. Each test asserts what a user would see with kubectl
and on the base; none depends on which Node kube-scheduler picks (they read where Pods landed).

Tests that kill the broker run on a broker of their own (`own_broker`), never the session's.
Waits are conditions with deadlines; the only fixed durations are the outages themselves and
observation windows counted in the bases' own heartbeats (1 s apart here, against the provider's
--resync-interval 2): "after N more heartbeats" is the base's clock saying time has passed, long
enough for the provider to have reacted to what the test did.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from koupleless import arklet, arklet_base_payloads, keys
from tests.e2e.phasewatch import NodeWatch, admin_ssl_context, api_request
from tests.e2e.provider.conftest import Sim, System, node_ready
from tests.e2e.provider.modules import (
    URL_V1,
    activated,
    base_of,
    live,
    module_pod,
    one_per_base,
    pod_summary,
    pods,
    running_ready,
    sample_deployment,
    wait_live_ready,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

DEPLOY = "deployment/test-module-deployment"
#: The sample's module as the provider asks for it.
BIZ1 = arklet.BizModel("biz1", "0.0.1-SNAPSHOT", URL_V1)
#: NoExecute taints a virtual Node carries by design; any other (not-ready, unreachable) evicts.
VNODE_TAINTS = frozenset({keys.TAINT_VIRTUAL_NODE, keys.TAINT_NODE_ENV})
#: Base heartbeats (1 s apart) the provider is given to react to a fault: 3 of its resyncs.
REACTION_HEARTBEATS = 6


# --- a bystander on the broker ------------------------------------------------------------------------------


class Wire:
    """Every message on the env's topics, as a bystander MQTT client sees it; it reconnects and
    resubscribes after a broker restart. Also publishes forged messages and waits for their echo
    (once the broker has delivered it to us it has delivered it to the provider too)."""

    def __init__(self, broker: Broker, env: str) -> None:
        self.env = env
        self._lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{env}-wire-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(1, 2)
        broker.login_as_fleet(c)  # reads every topic and forges any base's messages
        c.on_connect = lambda client, _u, _f, _rc, _p: client.subscribe(f"koupleless_{env}/#", qos=1)
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.loop_start()
        self.client = c
        if not self._subscribed.wait(15):
            self.close()
            raise AssertionError(f"bystander MQTT client not subscribed to {broker.address} after 15s")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()

    def on(self, base_id: str, kind: str) -> list[bytes]:
        topic = arklet.topic(self.env, base_id, kind)
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def count(self, base_id: str, kind: str) -> int:
        return len(self.on(base_id, kind))

    def replies(self, base_id: str) -> list[dict[str, Any]]:
        """The base's bizOperation replies, decoded (`data` of each envelope)."""
        out = []
        for payload in self.on(base_id, arklet.BIZ_OPERATION):
            with contextlib.suppress(Exception):
                out.append(arklet.decode_envelope(payload).data)
        return out

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish and wait until the broker has delivered the message back to us."""
        before = self._echoes(topic, payload)
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_until(lambda: self._echoes(topic, payload) > before, 15, what=f"our message on {topic} delivered")

    def _echoes(self, topic: str, payload: bytes) -> int:
        with self._lock:
            return sum(1 for t, p in self.messages if t == topic and p == payload)

    def wait_heartbeats(self, base_id: str, n: int, timeout: float = 60) -> None:
        """Wait until the base has sent `n` more heartbeats (time, by the base's own clock)."""
        start = self.count(base_id, arklet.HEART)
        wait_until(lambda: self.count(base_id, arklet.HEART) >= start + n, timeout,
                   what=f"{n} more heartbeats from base {base_id}")


WireFactory = Callable[[System], Wire]


@pytest.fixture
def wire_for() -> Iterator[WireFactory]:
    """`wire_for(system)`: a bystander on the system's broker and env, closed after the test."""
    wires: list[Wire] = []

    def make(system: System) -> Wire:
        w = Wire(system.broker, system.env)
        wires.append(w)
        return w

    yield make
    for w in wires:
        w.close()


# --- ordinary Nodes, kept Ready by the test -----------------------------------------------------------------


def _now(micro: bool = False) -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if micro else now.strftime("%Y-%m-%dT%H:%M:%SZ")


class OrdinaryNodes:
    """Plain (non-virtual) Nodes whose 'kubelet' is a thread of the test: it renews their Lease in
    kube-node-lease and their Ready condition every couple of seconds, so the node lifecycle
    controller sees healthy Nodes beside the bases (with none Ready it would hold back every taint:
    master disruption). Tainted NoSchedule so nothing runs on them."""

    TAINT = "e2e.koupleless.io/ordinary"

    def __init__(self, cp: ControlPlane, names: list[str], every: float = 2.0) -> None:
        self.cp = cp
        self.names = names
        self.every = every
        self.errors: list[str] = []
        self._ctx = admin_ssl_context(cp)
        self._since = _now()
        self._stop = threading.Event()
        for name in names:
            node = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {keys.LABEL_HOSTNAME: name, self.TAINT: "true"}},
                "spec": {"taints": [{"key": self.TAINT, "value": "true", "effect": "NoSchedule"}]},
            }
            self._ok(api_request(cp, "POST", "/api/v1/nodes", node, ctx=self._ctx), f"create Node {name}")
            lease = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)},
            }
            self._ok(api_request(cp, "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                                 lease, ctx=self._ctx), f"create Lease {name}")
            self._renew(name)
        self._thread = threading.Thread(target=self._run, name="ordinary-nodes", daemon=True)
        self._thread.start()

    @staticmethod
    def _ok(result: tuple[int, Any], what: str) -> None:
        status, body = result
        if status >= 300:
            raise AssertionError(f"{what}: HTTP {status}: {body}")

    def _renew(self, name: str) -> None:
        status = {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kept Ready by the e2e test", "lastHeartbeatTime": _now(),
                            "lastTransitionTime": self._since}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        }}
        self._ok(api_request(self.cp, "PATCH", f"/api/v1/nodes/{name}/status", status,
                             "application/merge-patch+json", ctx=self._ctx), f"Node {name} status")
        self._ok(api_request(self.cp, "PATCH",
                             f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                             {"spec": {"renewTime": _now(micro=True)}}, "application/merge-patch+json",
                             ctx=self._ctx), f"Lease {name}")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name in self.names:
                try:
                    self._renew(name)
                except Exception as exc:
                    self.errors.append(f"{name}: {exc!r}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the node lifecycle controller has seen them Ready (it then lifts the not-ready
        taint kube-apiserver puts on a new Node)."""
        def seen() -> bool:
            for name in self.names:
                _, node = api_request(self.cp, "GET", f"/api/v1/nodes/{name}", ctx=self._ctx)
                taints = {t["key"] for t in (node.get("spec") or {}).get("taints") or []}
                if node_ready(node) != "True" or keys.TAINT_NOT_READY in taints:
                    return False
            return True

        wait_until(seen, timeout, what=f"ordinary Nodes {self.names} Ready, seen by the node lifecycle controller")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for name in self.names:
            with contextlib.suppress(Exception):
                api_request(self.cp, "DELETE", f"/api/v1/nodes/{name}", ctx=self._ctx)
                api_request(self.cp, "DELETE",
                            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}", ctx=self._ctx)


# --- helpers ------------------------------------------------------------------------------------------------


def apply(system: System, manifest: str) -> None:
    system.cp.kubectl("apply", "-f", "-", input=manifest)


def vnode_watch(system: System) -> NodeWatch:
    return NodeWatch(system.cp, f"{keys.LABEL_VNODE_ENV}={system.env}").start()


def outage(broker: Broker, seconds: float, stop_early: Callable[[], bool] = lambda: False) -> None:
    """The broker is dead for `seconds` (the fault's length, not a wait for anything), then a fresh
    one starts on the same port. `stop_early` is polled to cut the outage short once the test has
    already failed, so it does not sit through the rest."""
    broker.kill()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop_early():
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        broker.start()


def copies(sims: list[Sim], name: str = "biz1") -> dict[str, int]:
    """ACTIVATED copies of module `name` per base, over every simulator."""
    return {b: len(activated(v["modules"], name)) for s in sims for b, v in s.bases().items()}


def node_of(system: System, base_id: str) -> dict[str, Any]:
    return dict(system.kubectl_json("get", "node", keys.vnode_name(base_id)))


def check_all(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


# --- 1. broker killed for 20 s during a scale-up ------------------------------------------------------------


def test_broker_killed_for_20s_during_scale_up(own_broker: Broker, system: System, namespace: str) -> None:
    system.use_broker(own_broker)
    # --install-timeout 10: a command lost with the broker must be retried, not left failed for good.
    system.start_provider("--install-timeout", "10", "--missed-heartbeats", "5")
    sim = system.start_sim(count=3)
    system.wait_nodes_ready(3)
    apply(system, one_per_base(sample_deployment(namespace)))
    wait_live_ready(system, namespace, 1)
    nodes = vnode_watch(system)
    try:
        system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=3")
        outage(own_broker, 20)

        problems = []
        try:
            after = wait_live_ready(system, namespace, 3, timeout=120)
        except AssertionError as exc:
            problems.append(f"not every replica Running+Ready after the broker came back: {exc}")
            after = live(pods(system, namespace))
        bases = sim.bases()
        for p in after:
            b = bases[base_of(p)]
            if b["installs"] != 1 or len(activated(b["modules"])) != 1:
                problems.append(f"base {b['baseID']} (Pod {p['metadata']['name']}): installs={b['installs']}, "
                                f"modules={b['modules']}; want biz1 installed exactly once and ACTIVATED")
        nodes.stop()
        if nodes.not_ready():
            problems.append(f"virtual Nodes went NotReady while only the broker was down: {nodes.not_ready()}")
        check_all(problems)
    finally:
        nodes.stop()


# --- 2. broker down for 60 s, ordinary Nodes Ready ----------------------------------------------------------


def test_broker_down_60s_taints_no_base_and_evicts_nothing(own_broker: Broker, system: System,
                                                           namespace: str) -> None:
    system.use_broker(own_broker)
    # Two bases at most: with 2 Ready ordinary Nodes the zone stays "normal" for the node lifecycle
    # controller even if both bases go NotReady (>2 NotReady of 5 would be a partial disruption,
    # which withholds taints in a small cluster and would hide the bug).
    ordinary = OrdinaryNodes(system.cp, [f"{system.env}-ordinary-{i}" for i in range(2)])
    try:
        system.start_provider("--missed-heartbeats", "5")
        system.start_sim(count=2)
        system.wait_nodes_ready(2)
        apply(system, one_per_base(sample_deployment(namespace)))
        system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
        before = wait_live_ready(system, namespace, 2)
        ordinary.wait_ready()
        watch = system.phase_watch
        assert watch is not None
        nodes = vnode_watch(system)
        try:
            outage(own_broker, 60, stop_early=lambda: bool(watch.removed()))
            problems = []
            try:
                after = wait_live_ready(system, namespace, 2, timeout=90)
                if {p["metadata"]["uid"] for p in after} != {p["metadata"]["uid"] for p in before}:
                    names = [p["metadata"]["name"] for p in before], [p["metadata"]["name"] for p in after]
                    problems.append(f"the module Pods were replaced: {names[0]} -> {names[1]}")
            except AssertionError as exc:
                problems.append(f"module Pods not Running+Ready after the broker came back: {exc}")
            nodes.stop()
            watch.resync()
            if nodes.no_execute_taints(VNODE_TAINTS):
                problems.append(f"NoExecute taints put on bases while only the broker was down: "
                                f"{nodes.no_execute_taints(VNODE_TAINTS)} (Ready seen: {nodes.not_ready()})")
            if watch.removed():
                problems.append("module Pods evicted or deleted: "
                                f"{[(h.name, h.describe()) for h in watch.removed()]}")
            if problems and ordinary.errors:
                problems.append(f"(the test's own ordinary Node renewals failed too: {ordinary.errors[:3]})")
            check_all(problems)
        finally:
            nodes.stop()
    finally:
        ordinary.close()


# --- 3. an install slower than --install-timeout ------------------------------------------------------------


def test_install_slower_than_install_timeout_ends_running(system: System, namespace: str,
                                                         wire_for: WireFactory) -> None:
    system.start_provider("--install-timeout", "3")
    sim = system.start_sim("--install-delay", "8", count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    wire = wire_for(system)
    apply(system, sample_deployment(namespace))
    [pod] = wait_live_ready(system, namespace, 1, timeout=60)
    # and it stays so: nothing flips it to a failure later
    wire.wait_heartbeats(base_id, REACTION_HEARTBEATS)
    [now] = pods(system, namespace)
    assert now["metadata"]["uid"] == pod["metadata"]["uid"] and running_ready(now), pod_summary(system, namespace)
    watch = system.phase_watch
    assert watch is not None
    watch.resync()
    assert watch.not_ready_after_ready(pod["metadata"]["uid"]) == [], "the Pod left Running+Ready after reaching it"
    assert len(activated(sim.modules(base_id))) == 1, sim.modules(base_id)


# --- 4. a Pod deleted while its install is still running ----------------------------------------------------


@pytest.mark.parametrize("grace", [None, 1], ids=["default-grace", "grace-1s"])
def test_pod_deleted_during_slow_install_leaves_nothing_on_the_base(system: System, namespace: str,
                                                                    wire_for: WireFactory, grace: int | None) -> None:
    """With the default grace period (30 s) the install lands while the Pod is still terminating;
    with 1 s the Pod is gone first and the install lands afterwards: either way nothing is left."""
    system.start_provider()
    sim = system.start_sim("--install-delay", "6", count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    wire = wire_for(system)
    apply(system, module_pod(namespace, "biz1-slow", keys.vnode_name(base_id)))
    wait_until(lambda: wire.count(base_id, arklet.CMD_INSTALL_BIZ) >= 1, 60, what="installBiz sent to the base")
    assert wire.replies(base_id) == [], "the install answered before the Pod could be deleted; the test needs it slow"

    args = ["delete", "pod", "biz1-slow", "-n", namespace, "--wait=false"]
    system.cp.kubectl(*args, *([f"--grace-period={grace}"] if grace is not None else []))
    wait_until(lambda: pods(system, namespace) == [], 60,
               what="the Pod's deletion to complete (the provider finishes it)")
    wait_until(lambda: any(r.get("command") == arklet.CMD_INSTALL_BIZ for r in wire.replies(base_id)), 60,
               what="the slow install to land on the base")
    try:
        wait_until(lambda: sim.modules(base_id) == [], 30, what="nothing left on the base once the install landed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: modules {sim.modules(base_id)}") from None
    wire.wait_heartbeats(base_id, REACTION_HEARTBEATS)
    assert sim.modules(base_id) == [], f"a module came back on the base: {sim.modules(base_id)}"
    events = system.kubectl_json("get", "events", "-n", namespace)["items"]
    timeouts = [e.get("message") for e in events if e.get("reason") == "UninstallTimeout"]
    assert not timeouts, f"UninstallTimeout for an uninstall that was never sent: {timeouts}"


# --- 5. a base partitioned past its Pods' eviction, then healed ---------------------------------------------


def test_partitioned_base_past_eviction_then_healed_keeps_copies_equal_to_replicas(
        system: System, namespace: str) -> None:
    system.start_provider()
    # one simulator process per base, so one base alone can be partitioned (SIGSTOP) and healed (SIGCONT)
    sims = [system.start_sim(count=1, id_prefix=f"{system.env[3:]}-part{i}-") for i in range(3)]
    system.wait_nodes_ready(3)
    apply(system, one_per_base(sample_deployment(namespace)))
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
    before = wait_live_ready(system, namespace, 2)
    victim_pod = before[0]
    victim = base_of(victim_pod)
    [victim_sim] = [s for s in sims if victim in s.bases()]
    uid = victim_pod["metadata"]["uid"]

    victim_sim.pause()
    try:
        def evicted() -> bool:
            mine = [p for p in pods(system, namespace) if p["metadata"]["uid"] == uid]
            return not mine or bool(mine[0]["metadata"].get("deletionTimestamp"))

        wait_until(evicted, 120, what=f"the Pod on partitioned base {victim} evicted (taint-based eviction)")

        def replaced() -> list[dict[str, Any]] | None:
            items = live(pods(system, namespace))
            ok = len(items) == 2 and all(running_ready(p) and base_of(p) != victim for p in items)
            return items if ok else None

        wait_until(replaced, 120, what="a replacement Running+Ready on another base")
    finally:
        victim_sim.resume()

    wait_until(lambda: node_ready(node_of(system, victim)) == "True", 60, what=f"healed base {victim} Ready again")
    try:
        wait_until(lambda: sum(copies(sims).values()) == 2, 60, what="ACTIVATED copies of biz1 == 2 replicas")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: copies per base {copies(sims)}\n{pod_summary(system, namespace)}") from None
    after = wait_live_ready(system, namespace, 2, timeout=60)
    assert copies(sims)[victim] == 0 and all(copies(sims)[base_of(p)] == 1 for p in after), copies(sims)

    # offline: the Deployment deleted, no copy anywhere
    system.cp.kubectl("delete", DEPLOY, "-n", namespace)
    wait_until(lambda: sum(copies(sims).values()) == 0, 60, what=f"no copy left after delete: {copies(sims)}")


# --- 6. replayed, repeated and future-dated messages --------------------------------------------------------


def _repeat_biz_reply(model: arklet.BizModel) -> bytes:
    """What arklet answers an installBiz of a name:version it already has."""
    data = arklet_base_payloads.biz_operation_data(arklet.CMD_INSTALL_BIZ, model, arklet.CODE_FAILED,
                                     f"REPEAT_BIZ: biz {model.key} has been installed")
    data["response"]["data"]["code"] = "REPEAT_BIZ"
    return arklet.encode_envelope(data, arklet.now_ms())


@pytest.mark.parametrize("fault", ["replayed-uninstall-reply", "repeat-biz", "future-heartbeat"])
def test_lying_messages_converge_within_a_resync(system: System, namespace: str, wire_for: WireFactory,
                                                fault: str) -> None:
    slow = ("--install-delay", "4") if fault == "repeat-biz" else ()
    system.start_provider()
    sim = system.start_sim(*slow, count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    wire = wire_for(system)
    nodes = vnode_watch(system)
    env = system.env

    def converged() -> bool:
        items = live(pods(system, namespace))
        return (len(items) == 1 and running_ready(items[0]) and len(activated(sim.modules(base_id))) == 1
                and node_ready(node_of(system, base_id)) == "True")

    def settles(what: str) -> None:
        wire.wait_heartbeats(base_id, REACTION_HEARTBEATS)  # the provider has reacted by now
        try:
            wait_until(converged, 20, what=f"state converged after {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: base modules {sim.modules(base_id)}, Node Ready "
                                 f"{node_ready(node_of(system, base_id))}\n{pod_summary(system, namespace)}") from None

    try:
        apply(system, sample_deployment(namespace))
        if fault == "repeat-biz":
            # the provider's installBiz is still running on the base when a REPEAT_BIZ answer for the
            # very name:version it asked for arrives: that means installed, not failed
            wait_until(lambda: wire.count(base_id, arklet.CMD_INSTALL_BIZ) >= 1, 60, what="installBiz sent")
            assert wire.replies(base_id) == [], "the install answered at once; the test needs it in flight"
            wire.publish(arklet.topic(env, base_id, arklet.BIZ_OPERATION), _repeat_biz_reply(BIZ1))
            settles("a REPEAT_BIZ reply to the provider's own install")
            # and the base's own REPEAT_BIZ to a duplicated installBiz for the running module
            replies = len(wire.replies(base_id))
            wire.publish(arklet.topic(env, base_id, arklet.CMD_INSTALL_BIZ), arklet.encode_command(BIZ1))
            wait_until(lambda: len(wire.replies(base_id)) > replies, 30, what="the base's REPEAT_BIZ answer")
            settles("the base answering a duplicated installBiz with REPEAT_BIZ")
        else:
            wait_live_ready(system, namespace, 1)
            if fault == "replayed-uninstall-reply":
                # a stray uninstallBiz SUCCESS for the module the base is running
                data = arklet_base_payloads.biz_operation_data(arklet.CMD_UNINSTALL_BIZ, BIZ1, arklet.CODE_SUCCESS)
                wire.publish(arklet.topic(env, base_id, arklet.BIZ_OPERATION),
                             arklet.encode_envelope(data, arklet.now_ms()))
            else:
                # the base's own heartbeat, dated an hour ahead
                wire.wait_heartbeats(base_id, 1)
                last = arklet.decode_envelope(wire.on(base_id, arklet.HEART)[-1])
                forged = arklet.encode_envelope(last.data, arklet.now_ms() + 3_600_000)
                wire.publish(arklet.topic(env, base_id, arklet.HEART), forged)
            settles(fault)
        nodes.stop()
        assert nodes.not_ready() == {}, f"the base's Node went NotReady: {nodes.not_ready()}"
    finally:
        nodes.stop()


# --- 7. two Pods of one module bound to one base ------------------------------------------------------------


def _failed(system: System, namespace: str, name: str) -> dict[str, Any] | None:
    items = [p for p in pods(system, namespace) if p["metadata"]["name"] == name]
    return items[0] if items and items[0].get("status", {}).get("phase") == "Failed" else None


def _delete_completes(system: System, namespace: str, name: str) -> None:
    """`kubectl delete pod` (no --force) returns once the Pod is gone."""
    proc = system.cp.kubectl("delete", "pod", name, "-n", namespace, "--timeout=60s", check=False, timeout=90)
    assert proc.returncode == 0, f"kubectl delete pod {name} did not complete: {proc.stderr.strip()}"
    gone = system.cp.kubectl("get", "pod", name, "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, f"Pod {name} still there: {gone.stdout}"


def test_second_pod_of_a_module_on_one_base_fails_with_a_reason(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    node = keys.vnode_name(base_id)
    apply(system, module_pod(namespace, "biz1-first", node))
    [first] = wait_live_ready(system, namespace, 1)

    apply(system, module_pod(namespace, "biz1-second", node))
    try:
        second = wait_until(lambda: _failed(system, namespace, "biz1-second"), 60,
                            what="the second Pod of biz1 on the base in phase Failed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pod_summary(system, namespace)}") from None
    status = second["status"]
    assert status.get("reason"), f"phase Failed without a reason: {status}"
    message = status.get("message") or ""
    assert "biz1" in message and ("biz1-first" in message or base_id in message), \
        f"the message should name the module and what holds it (Pod biz1-first / base {base_id}): {message!r}"

    _delete_completes(system, namespace, "biz1-second")
    watch = system.phase_watch
    assert watch is not None
    watch.resync()
    [now] = pods(system, namespace)
    assert now["metadata"]["uid"] == first["metadata"]["uid"] and running_ready(now), pod_summary(system, namespace)
    assert watch.not_ready_after_ready(first["metadata"]["uid"]) == [], "the first Pod left Running+Ready"
    assert len(activated(sim.modules(base_id))) == 1, sim.modules(base_id)


# --- a non-module Pod bound to a base -----------------------------------------------------------------------

PLAIN_POD = """
apiVersion: v1
kind: Pod
metadata:
  name: plain
  namespace: {ns}
spec:
  nodeName: {node}
  containers:
  - name: sleep
    image: busybox
    command: [sleep, "3600"]
  tolerations:
  - operator: Exists
"""


def test_non_module_pod_on_a_base_fails_naming_the_module_label(system: System, namespace: str) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    [base_id] = sim.bases()
    apply(system, PLAIN_POD.format(ns=namespace, node=keys.vnode_name(base_id)))
    try:
        pod = wait_until(lambda: _failed(system, namespace, "plain"), 60, what="the non-module Pod in phase Failed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pod_summary(system, namespace)}") from None
    status = pod["status"]
    assert status.get("reason"), f"phase Failed without a reason: {status}"
    text = f"{status.get('reason')} {status.get('message')}"
    assert keys.LABEL_COMPONENT in text, f"the reason/message should name the label {keys.LABEL_COMPONENT}: {text!r}"
    _delete_completes(system, namespace, "plain")
    assert sim.modules(base_id) == []
