"""Forged heartbeats against a real provider (README: Provider-side base admission): odd base IDs are
refused once each and make no Node, a flood of new IDs makes at most --new-bases-per-minute Nodes,
and a forged goodbye does not make a real base's Node NotReady; real bases get their Nodes all along."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from koupleless import arklet, keys
from tests.e2e.provider.conftest import System, http_status, node_ready
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

ODD_IDS = [
    "evil.base",
    "$(reboot)",
    "base\u202eesab",  # a right-to-left override
    "x" * 253,
    "UPPER-CASE",
    "with spaces",
    "a..b",  # would be an invalid Node name
    "x.-y",  # would be an invalid Node name
    "-lead",
    "x_y",
    "\u00fcnic\u00f6de",
    "10.1.0.45.6",
]


def publish(system: System, messages: list[tuple[str, bytes]]) -> None:
    """Publish as a forger who got past the broker's ACLs would (the test-only fleet account may
    publish as any base): what the provider's own admission is for. The only place these tests
    touch the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{system.env}-forger-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    system.broker.login_as_fleet(client)
    client.connect(system.broker.host, system.broker.port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(60)
    finally:
        client.loop_stop()
        client.disconnect()


def forged_heartbeat(system: System, base_id: str, state: str = "activated", ts: int | None = None) -> tuple[str, bytes]:
    """A heartbeat as a real base sends it, with the real bases' name and version."""
    data = {"baseMetadata": {"identity": base_id, "name": "base", "version": "1.1.1", "clusterName": "base"},
            "localIP": "10.66.0.1", "localHostName": "forged", "port": 0, "state": state}
    return arklet.topic(system.env, base_id, arklet.HEART), arklet.encode_envelope(data, ts)


def metrics(system: System) -> dict[str, float]:
    """The provider's counters, summed by name and labels as written (`name{label="x"}`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{system.provider_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def refusal_events(system: System) -> list[dict[str, Any]]:
    items = json.loads(system.cp.kubectl("get", "events", "-A", "--field-selector", "reason=BaseRefused",
                                         "-o", "json").stdout)["items"]
    return [e for e in items if f"koupleless_{system.env}/" in e["message"]]


def provider_log(system: System) -> str:
    return (system.workdir / "provider.log").read_text(errors="replace")


def test_odd_base_ids_are_refused_once_each_and_make_no_node(system: System) -> None:
    system.start_provider()
    # three rounds, as forged bases would keep heartbeating
    publish(system, [forged_heartbeat(system, base_id) for _ in range(3) for base_id in ODD_IDS])
    sim = system.start_sim(count=1)  # a real base still gets its Node
    system.wait_nodes_ready(1)

    def all_refused() -> dict[str, float] | None:
        m = metrics(system)
        return m if m.get('koupleless_provider_mqtt_rejected_total{reason="base_refused"}') == 3 * len(ODD_IDS) else None

    m = wait_until(all_refused, 60, what="every forged heartbeat refused")
    refused = {k: v for k, v in m.items() if k.startswith("koupleless_provider_bases_refused_total{")}
    assert sum(refused.values()) == len(ODD_IDS), refused
    [node] = system.nodes()
    assert node["metadata"]["name"] == keys.vnode_name(next(iter(sim.bases()))) and node_ready(node) == "True"

    text = provider_log(system)
    lines = [line for line in text.splitlines() if "refused base " in line]
    assert len(lines) == len(ODD_IDS), "one line per refused ID, not one per heartbeat"
    assert all(line.isascii() for line in lines), "nothing from MQTT reaches the log unescaped"
    assert any("'base\\u202eesab'" in line for line in lines) and "\u202e" not in text
    assert "Traceback" not in text
    events = wait_until(lambda: (e := refusal_events(system)) and len(e) == len(ODD_IDS) and e, 30,
                        what="one BaseRefused Event per refused ID")
    assert all(e["type"] == "Warning" for e in events)
    assert http_status(system.provider_port, "/readyz") == 200


def test_a_burst_of_new_base_ids_makes_at_most_the_allowed_nodes(system: System) -> None:
    system.start_provider("--new-bases-per-minute", "20")
    sim = system.start_sim(count=1)  # a real base, admitted before the burst
    [real] = system.wait_nodes_ready(1)
    flood = [f"{system.env[3:]}-flood-{i}" for i in range(1000)]
    publish(system, [forged_heartbeat(system, base_id) for base_id in flood])

    def processed() -> dict[str, float] | None:
        m = metrics(system)
        admitted = m.get("koupleless_provider_bases_admitted_total", 0)
        throttled = m.get("koupleless_provider_bases_throttled_total", 0)
        return m if admitted + throttled == 1 + len(flood) else None

    m = wait_until(processed, 60, what="every heartbeat of the burst admitted or held back")
    admitted_from_flood = int(m["koupleless_provider_bases_admitted_total"]) - 1
    # 20 in any minute: 19 next to the real base, or 20 if its minute ended before the burst came
    assert 19 <= admitted_from_flood <= 20

    def flood_nodes() -> list[str] | None:
        names = [n["metadata"]["name"] for n in system.nodes() if "-flood-" in n["metadata"]["name"]]
        return names if len(names) == admitted_from_flood else None

    wait_until(flood_nodes, 60, what=f"{admitted_from_flood} Nodes of the burst")
    assert len(system.nodes()) == admitted_from_flood + 1
    text = provider_log(system)
    assert text.count("more than 20 new bases in a minute") == 1, "one line for the burst, not one per heartbeat"
    assert "Traceback" not in text
    # the provider and the real base carry on
    assert http_status(system.provider_port, "/readyz") == 200
    heard = metrics(system)['koupleless_provider_mqtt_handled_total{kind="base/heart"}']
    wait_until(lambda: metrics(system)['koupleless_provider_mqtt_handled_total{kind="base/heart"}'] >= heard + 3, 30,
               what="the real base's later heartbeats")
    node = system.kubectl_json("get", "node", real["metadata"]["name"])
    assert node_ready(node) == "True"
    assert node["metadata"]["annotations"][keys.ANNOTATION_BASE_ID] == next(iter(sim.bases()))


def test_a_forged_goodbye_leaves_a_live_base_ready(system: System) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    [node] = system.wait_nodes_ready(1)
    [base_id] = sim.bases()

    def ready_condition() -> dict[str, Any]:
        n = system.kubectl_json("get", "node", node["metadata"]["name"])
        return next(c for c in n["status"]["conditions"] if c["type"] == "Ready")

    before = ready_condition()
    # dated 5 s ahead, so it would also make the real heartbeats look stale if it entered their order
    publish(system, [forged_heartbeat(system, base_id, state="deactivated", ts=arklet.now_ms() + 5_000)])
    key = 'koupleless_provider_mqtt_handled_total{kind="base/heart"}'
    heard = metrics(system)[key]
    # heartbeats every second, a goodbye confirmed by two seconds of silence: six later ones outlast it
    wait_until(lambda: metrics(system)[key] >= heard + 6, 30, what="six more heartbeats handled")
    after = ready_condition()
    assert after["status"] == "True" and after["lastTransitionTime"] == before["lastTransitionTime"]
    assert "reported state 'DEACTIVATED'" in provider_log(system)  # it was received, and judged by what followed


def test_approve_new_bases_taints_a_new_node_until_an_operator_removes_the_taint(system: System) -> None:
    system.start_provider("--approve-new-bases")
    sim = system.start_sim(count=1)
    [node] = system.wait_nodes_ready(1)
    name = node["metadata"]["name"]
    assert {"key": keys.TAINT_UNAPPROVED, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    system.cp.kubectl("taint", "node", name, f"{keys.TAINT_UNAPPROVED}-")  # the operator approves it

    def renew_time() -> str:
        lease = system.kubectl_json("get", "lease", "-n", "kube-node-lease", name)
        return str(lease["spec"]["renewTime"])

    # two Lease renewals later the provider has synced the Node again (each renewal is a Node sync)
    first = renew_time()
    second = wait_until(lambda: (t := renew_time()) != first and t, 60, what="a Lease renewal")
    wait_until(lambda: renew_time() != second, 60, what="another Lease renewal")
    taints = system.kubectl_json("get", "node", name)["spec"]["taints"]
    assert keys.TAINT_UNAPPROVED not in {t["key"] for t in taints}, "the approval sticks"
    assert keys.TAINT_VIRTUAL_NODE in {t["key"] for t in taints}
    assert next(iter(sim.bases())) == system.kubectl_json("get", "node", name)["metadata"]["annotations"][
        keys.ANNOTATION_BASE_ID]
