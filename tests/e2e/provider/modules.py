"""Helpers for module e2e tests: the seed's sample Deployment and kubectl-level reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from koupleless import keys
from tests.e2e.provider.conftest import System
from tests.helpers import wait_until

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "module-deployment.yaml"
URL_V1 = ("https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
          "biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar")
URL_V2 = "https://example.com/modules/biz1-web-single-host-0.0.2-SNAPSHOT-ark-biz.jar"


def sample_deployment(namespace: str) -> str:
    """The seed's sample in `namespace`. As written in the seed its template label
    (`app: test-module-deployment-non-peer`) does not match its selector, which the API server
    rejects; the template label is aligned with the selector here."""
    text = SAMPLE.read_text().replace("namespace: default", f"namespace: {namespace}")
    return text.replace("app: test-module-deployment-non-peer", "app: test-module-deployment")


def pods(system: System, namespace: str, *selectors: str) -> list[dict[str, Any]]:
    return list(system.kubectl_json("get", "pods", "-n", namespace, *selectors)["items"])


def condition(pod: dict[str, Any], ctype: str) -> str:
    for c in pod.get("status", {}).get("conditions", []):
        if c["type"] == ctype:
            return str(c["status"])
    return "Unknown"


def running_ready(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") == "Running" and condition(pod, "Ready") == "True"


def base_of(pod: dict[str, Any], prefix: str = "virtual-node-") -> str:
    return str(pod["spec"]["nodeName"])[len(prefix):]


def describe(system: System, namespace: str, kind: str, name: str) -> str:
    return system.cp.kubectl("describe", kind, name, "-n", namespace).stdout


def one_per_base(manifest: str) -> str:
    """The Deployment with a required pod anti-affinity on `kubernetes.io/hostname`: without the
    extender, kube-scheduler alone then never puts two replicas on one base, whatever it scores."""
    doc = yaml.safe_load(manifest)
    labels = doc["spec"]["selector"]["matchLabels"]
    doc["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"] = {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": labels}, "topologyKey": keys.LABEL_HOSTNAME}
        ]
    }
    return str(yaml.safe_dump(doc))


def module_pod(namespace: str, name: str, node_name: str) -> str:
    """A bare module Pod bound to `node_name` by hand (no scheduler), with the sample's container."""
    sample = yaml.safe_load(sample_deployment(namespace))
    spec = sample["spec"]["template"]["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE, "app": name}},
        "spec": {"nodeName": node_name, "containers": spec["containers"], "tolerations": spec["tolerations"]},
    }
    return str(yaml.safe_dump(pod))


def live(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pods not being deleted."""
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def activated(modules: list[dict[str, Any]], name: str = "biz1") -> list[dict[str, Any]]:
    """A base's modules (base-sim snapshot) named `name` and ACTIVATED."""
    return [m for m in modules if m["name"] == name and m["state"] == "ACTIVATED"]


def pod_summary(system: System, namespace: str) -> str:
    """One line per Pod: where it is, its phase, Ready, and why its containers wait, for failure messages."""
    lines = []
    for p in pods(system, namespace):
        status = p.get("status") or {}
        why = []
        for cs in status.get("containerStatuses") or []:
            for state, detail in (cs.get("state") or {}).items():
                if state != "running":
                    why.append(f"{cs.get('name')} {state} {detail.get('reason', '')}: {detail.get('message', '')}")
        deleting = " (deleting)" if p["metadata"].get("deletionTimestamp") else ""
        lines.append(f"  {p['metadata']['name']}{deleting} on {p['spec'].get('nodeName') or '-'}: "
                     f"{status.get('phase')} Ready={condition(p, 'Ready')} {status.get('reason', '')} "
                     f"{status.get('message', '')} {'; '.join(why)}".rstrip())
    return "Pods now:\n" + ("\n".join(lines) or "  (none)")


def wait_live_ready(system: System, namespace: str, count: int, image: str | None = None,
                    timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until exactly `count` Pods not being deleted exist, all Running+Ready (and all of `image`
    when given); the failure says where every Pod is and why it is not."""
    def check() -> list[dict[str, Any]] | None:
        items = live(pods(system, namespace))
        if len(items) != count or not all(running_ready(p) for p in items):
            return None
        if image and any(p["spec"]["containers"][0]["image"] != image for p in items):
            return None
        return items

    try:
        return wait_until(check, timeout, what=f"{count} Running+Ready module Pods" + (f" of {image}" if image else ""))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{pod_summary(system, namespace)}") from None
