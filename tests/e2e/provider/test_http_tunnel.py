"""Bases on arklet's HTTP tunnel beside bases on MQTT, in one cluster and one provider: the seed's
flows work the same on both, seen on the bases themselves and in the Pods' status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devcluster.processes import free_port
from koupleless import keys
from tests.e2e.provider.conftest import Sim, System
from tests.e2e.provider.modules import (
    URL_V1,
    URL_V2,
    base_of,
    one_per_base,
    pods,
    running_ready,
    sample_deployment,
    wait_live_ready,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

DEPLOY = "deployment/test-module-deployment"


def start_both(system: System, http_bases: int = 2) -> tuple[Sim, Sim]:
    """A provider serving both tunnels, one MQTT base and `http_bases` HTTP-tunnel bases."""
    port = free_port()
    system.start_provider("--http-tunnel-port", str(port), "--http-heartbeat-interval", "1")
    short = system.env[3:]
    mqtt = system.start_sim(count=1, id_prefix=f"{short}-mqtt-")
    http = system.start_sim("--tunnel", "http", "--http-heartbeat-endpoint", f"http://127.0.0.1:{port}",
                            count=http_bases, id_prefix=f"{short}-http-")
    system.wait_nodes_ready(1 + http_bases)
    return mqtt, http


def modules(*sims: Sim) -> dict[str, list[tuple[str, str, str]]]:
    """(name, version, state) of every module, per base, across the simulators."""
    out = {}
    for sim in sims:
        for base_id, base in sim.bases().items():
            out[base_id] = [(m["name"], m["version"], m["state"]) for m in base["modules"]]
    return out


def only(version: str, *sims: Sim) -> bool:
    """Every base holds biz1 at `version`, ACTIVATED, and nothing else."""
    return all(mods == [("biz1", version, "ACTIVATED")] for mods in modules(*sims).values())


def test_release_scale_replace_rollback_offline_on_http_and_mqtt_bases(system: System, namespace: str) -> None:
    mqtt, http = start_both(system)
    assert all(b["tunnel"] == "http" for b in http.bases().values())
    # No anti-affinity: a rolling update needs room for its surge Pod (the new version goes onto a base
    # that holds the old one, upgraded in place).
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_live_ready(system, namespace, 1, URL_V1)

    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=3")
    scaled = wait_live_ready(system, namespace, 3, URL_V1)
    assert sorted(base_of(p) for p in scaled) == sorted([*mqtt.bases(), *http.bases()]), "one module per base"
    wait_until(lambda: only("0.0.1-SNAPSHOT", mqtt, http), 30, what="biz1 0.0.1 on every base")
    for p in scaled:
        if base_of(p) in http.bases():
            # the HTTP base's own address, as its heartbeat says, like an MQTT base's
            assert p["status"]["podIP"] == http.bases()[base_of(p)]["ip"]
            cs = p["status"]["containerStatuses"][0]
            assert cs["ready"] and cs["containerID"] == "arklet://biz1:0.0.1-SNAPSHOT"

    container = {"name": "biz1", "image": URL_V2, "env": [{"name": "BIZ_VERSION", "value": "0.0.2-SNAPSHOT"}]}
    system.cp.kubectl("patch", DEPLOY, "-n", namespace,
                      "-p", json.dumps({"spec": {"template": {"spec": {"containers": [container]}}}}))
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=150s", timeout=160)
    wait_live_ready(system, namespace, 3, URL_V2)
    wait_until(lambda: only("0.0.2-SNAPSHOT", mqtt, http), 30, what="biz1 0.0.2 alone on every base")

    system.cp.kubectl("rollout", "undo", DEPLOY, "-n", namespace)
    system.cp.kubectl("rollout", "status", DEPLOY, "-n", namespace, "--timeout=150s", timeout=160)
    wait_live_ready(system, namespace, 3, URL_V1)
    wait_until(lambda: only("0.0.1-SNAPSHOT", mqtt, http), 30, what="biz1 0.0.1 alone on every base again")

    system.cp.kubectl("delete", DEPLOY, "-n", namespace)
    wait_until(lambda: pods(system, namespace) == [], 90, what="module Pods gone")
    wait_until(lambda: all(m == [] for m in modules(mqtt, http).values()), 30, what="modules uninstalled everywhere")
    assert all(b["uninstalls"] >= 1 for b in http.bases().values())


def test_a_lost_http_base_is_replaced_on_another_base(system: System, namespace: str) -> None:
    mqtt, http = start_both(system)
    system.cp.kubectl("apply", "-f", "-", input=one_per_base(sample_deployment(namespace)))
    system.cp.kubectl("scale", DEPLOY, "-n", namespace, "--replicas=2")
    before = wait_live_ready(system, namespace, 2)
    # Two Pods on three bases, two of them HTTP: at least one Pod is on an HTTP base.
    victim = next(base_of(p) for p in before if base_of(p) in http.bases())
    http.kill(victim)
    wait_until(
        lambda: any(t["key"] == keys.TAINT_NOT_READY for t in
                    system.kubectl_json("get", "node", keys.vnode_name(victim))["spec"].get("taints", [])),
        60, what="the killed HTTP base's Node tainted not-ready",
    )

    def moved() -> list[dict[str, Any]] | None:
        items = pods(system, namespace)
        ok = len(items) == 2 and all(running_ready(p) and base_of(p) != victim for p in items)
        return items if ok else None

    after = wait_until(moved, 150, what="the module Pod re-created on a surviving base")
    held = modules(mqtt, http)
    for p in after:
        assert held[base_of(p)] == [("biz1", "0.0.1-SNAPSHOT", "ACTIVATED")]
