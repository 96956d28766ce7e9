"""The seed's flows through the whole system at once (webhook, extender, provider, bases), each component
running with its manifest ServiceAccount's own token: nothing it needs is Forbidden."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devcluster.stack import DevStack, StackOptions
from tests.helpers import forbidden_lines, wait_until

pytestmark = pytest.mark.controlplane

NEW_JAR = "https://repo.example/modules/biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    system = DevStack(StackOptions(bases=3, workdir=tmp_path_factory.mktemp("system")), progress=lambda _: None)
    system.start()
    try:
        yield system
    finally:
        system.stop()


def bases(stack: DevStack) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.base_sim_port}/bases", timeout=5) as resp:
        return dict(orjson.loads(resp.read())["bases"])


def installed(stack: DevStack) -> list[tuple[str, str, str]]:
    """(base, bizName, bizVersion) of every ACTIVATED module on every simulated base."""
    return sorted(
        (base_id, m["name"], m["version"])
        for base_id, base in bases(stack).items()
        for m in base["modules"]
        if m["state"].upper() == "ACTIVATED"
    )


def ready_pods(stack: DevStack) -> list[dict[str, Any]]:
    return [
        p for p in stack.sample_pods()
        if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def diagnosis(stack: DevStack) -> str:
    kubectl = stack.plane.kubectl
    return "\n".join([
        kubectl("get", "pods", "-o", "wide", "-n", "default").stdout,
        kubectl("get", "events", "-n", "default", "--sort-by=.lastTimestamp").stdout[-4000:],
        *(kubectl("describe", "pod", "-n", "default", p["metadata"]["name"]).stdout[-1500:]
          for p in stack.sample_pods() if not p["spec"].get("nodeName")),
        orjson.dumps(bases(stack)).decode(),
    ])


def test_release_scale_replace_rollback_offline_with_least_privilege(stack: DevStack) -> None:
    try:
        flows(stack)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnosis(stack)}") from exc


def flows(stack: DevStack) -> None:
    kubectl = stack.plane.kubectl
    # release (dev applied the seed's sample unchanged)
    pod = stack.wait_sample_running()
    assert pod["status"]["podIP"] == pod["status"]["hostIP"]
    assert [(m[1], m[2]) for m in installed(stack)] == [("biz1", "0.0.1-SNAPSHOT")]

    # scale: one copy per base (the extender never puts one bizName twice on a base)
    kubectl("scale", "deployments/test-module-deployment", "--namespace=default", "--replicas=3")
    wait_until(lambda: len(ready_pods(stack)) == 3, 90, what="3 module Pods Ready")
    spots = installed(stack)
    assert len({base for base, _, _ in spots}) == 3 and {m[2] for m in spots} == {"0.0.1-SNAPSHOT"}

    # scale down, leaving a base free: a base holds one copy of a bizName, so the rolling update's
    # surge Pod needs a free base (with the seed's 30% and as many replicas as bases, maxUnavailable
    # rounds to 0 and the surge could never be placed; README says so)
    kubectl("scale", "deployments/test-module-deployment", "--namespace=default", "--replicas=2")
    wait_until(lambda: len(installed(stack)) == 2 and len(stack.sample_pods()) == 2, 90,
               what="one module uninstalled on scale-down")

    # replace: a rolling update to the new jar, with the version inferred from its name by the webhook
    kubectl("patch", "deployment/test-module-deployment", "-n", "default", "--type=json", "-p", orjson.dumps([
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": NEW_JAR},
        {"op": "remove", "path": "/spec/template/spec/containers/0/env"},
    ]).decode())
    wait_until(lambda: [m[2] for m in installed(stack)] == ["0.0.2-SNAPSHOT"] * 2
               and len(ready_pods(stack)) == 2 and len(stack.sample_pods()) == 2, 120,
               what="both copies replaced by 0.0.2-SNAPSHOT")

    # roll back
    history = kubectl("rollout", "history", "deployment", "test-module-deployment", "-n", "default").stdout
    assert "REVISION" in history
    kubectl("rollout", "undo", "deployment", "test-module-deployment", "-n", "default", "--to-revision=1")
    wait_until(lambda: [m[2] for m in installed(stack)] == ["0.0.1-SNAPSHOT"] * 2
               and len(ready_pods(stack)) == 2 and len(stack.sample_pods()) == 2, 120,
               what="both copies back on 0.0.1-SNAPSHOT")

    # offline
    kubectl("delete", "deployment", "test-module-deployment", "--namespace", "default")
    wait_until(lambda: not stack.sample_pods() and not installed(stack), 90,
               what="Pods gone and modules uninstalled from every base")

    for name in ("provider", "extender", "webhook"):
        log = Path(stack.components[name].log_path).read_text(errors="replace")
        assert not forbidden_lines(log), f"{name} needed more than its manifest RBAC: {forbidden_lines(log)}"
