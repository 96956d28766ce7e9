"""Per-base identity end to end: the provider and base-sim on the shipped broker security, each
simulated base on its own connection and account. A base that forges another base's heartbeat
makes no Node; the same heartbeat from that base's own account does."""

from __future__ import annotations

import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from koupleless import arklet, keys
from tests.e2e.provider.conftest import System
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane


def heartbeat_of(base_id: str) -> bytes:
    hb = arklet.Heartbeat(arklet.BaseMetadata(base_id, "base", "1.1.1", "base"), "10.9.9.9", base_id, 0,
                          arklet.ACTIVATED)
    return arklet.encode_envelope(hb.to_wire())


def publish_as(system: System, user: str, topic: str, payload: bytes) -> str:
    """Log in as `user` (a base account), publish QoS 1, and return the broker's PUBACK verdict."""
    verdict: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"koupleless@@@{user}-{uuid.uuid4().hex[:4]}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(user, system.broker.password(user))
    client.on_publish = lambda _c, _u, _m, reason, _p: verdict.append("Accepted" if not reason.is_failure
                                                                      else str(reason))
    client.connect(system.broker.host, system.broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1)
        return wait_until(lambda: verdict[0] if verdict else None, 15, what=f"PUBACK for {topic}")
    finally:
        client.loop_stop()
        client.disconnect()


def node_names(system: System) -> set[str]:
    return {n["metadata"]["name"] for n in system.nodes()}


def test_each_base_on_its_own_account_becomes_a_node(system: System) -> None:
    system.start_provider()
    sim = system.start_sim(count=2)
    system.wait_nodes_ready(2)
    assert node_names(system) == {keys.vnode_name(b) for b in sim.bases()}


def test_a_forged_heartbeat_for_another_base_makes_no_node(system: System) -> None:
    system.start_provider()
    sim = system.start_sim(count=1)
    system.wait_nodes_ready(1)
    [real] = sim.bases()
    victim = f"{system.env[3:]}-victim"
    system.broker.add_bases([victim])  # B has an account, but B is not running
    topic = arklet.topic(system.env, victim, arklet.HEART)

    # A (a real, logged-in base) reports in B's name: the broker refuses it
    assert publish_as(system, real, topic, heartbeat_of(victim)) == "Not authorized"

    # Later, legitimate events reach the provider: a new base's Node becomes Ready...
    later = system.start_sim(count=1, name="later")
    system.wait_nodes_ready(2)
    # ...and no Node for B was ever made
    assert node_names(system) == {keys.vnode_name(real), *(keys.vnode_name(b) for b in later.bases())}

    # The same heartbeat from B's own account is a Node: the forged one was refused for who sent it
    assert publish_as(system, victim, topic, heartbeat_of(victim)) == "Accepted"
    wait_until(lambda: keys.vnode_name(victim) in node_names(system), 60, what="Node of the base that reported itself")
