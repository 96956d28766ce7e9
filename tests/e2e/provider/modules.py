"""Helpers for module e2e tests: the seed's sample Deployment and kubectl-level reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.provider.conftest import System

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
