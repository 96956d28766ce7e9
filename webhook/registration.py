"""The MutatingWebhookConfiguration that sends module Pods to the webhook.

One function builds it for every audience: the manifests in `manifests/webhook/`, the dev flow and
the e2e tests (which point it at `https://127.0.0.1:<port>/mutate`).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from koupleless import keys

DEFAULT_NAME = "module-controller-webhook"
#: Both appear in every rejection: `admission webhook "<name>" denied the request: ...`.
WEBHOOK_NAME = "pods.module-controller.koupleless.io"
LEGACY_WEBHOOK_NAME = "legacy-pods.module-controller.koupleless.io"
WORKLOAD_WEBHOOK_NAME = "workloads.module-controller.koupleless.io"
WORKLOAD_RESOURCES = ("deployments", "replicasets", "statefulsets", "daemonsets")
DEFAULT_NAMESPACE = "module-controller"
#: Namespaces never sent to the webhook: the control plane's own, so a dead webhook cannot stop
#: the cluster from healing itself (k8s-protocols.md §6, pitfalls 9 and 10).
SYSTEM_NAMESPACES = ("kube-system", "kube-node-lease")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


_TEMPLATE_LABELS = "object.spec.template.metadata.labels"
_MODULE_TEMPLATE_CEL = (
    f"has({_TEMPLATE_LABELS}) && ("
    + " || ".join(
        f"('{key}' in {_TEMPLATE_LABELS} && {_TEMPLATE_LABELS}['{key}'] == '{keys.COMPONENT_MODULE}')"
        for key in keys.MODULE_LABEL_KEYS
    )
    + ")"
)


@dataclass(frozen=True, slots=True)
class ServiceRef:
    namespace: str = DEFAULT_NAMESPACE
    name: str = DEFAULT_NAME
    path: str = "/mutate"
    port: int = 443

    def client_config(self) -> dict[str, Any]:
        return {
            "service": {"namespace": self.namespace, "name": self.name, "path": self.path, "port": self.port}
        }


def webhook_configuration(
    url_or_service: str | ServiceRef,
    ca_bundle_pem: bytes | str | None,
    *,
    name: str = DEFAULT_NAME,
    namespace_exclusions: Iterable[str] = (*SYSTEM_NAMESPACES, DEFAULT_NAMESPACE),
    timeout_seconds: int = 5,
    failure_policy: str = "Fail",
) -> dict[str, Any]:
    """A MutatingWebhookConfiguration for module Pods, and for workloads whose template is one, on
    CREATE and UPDATE.

    An objectSelector cannot OR two label keys, so the seed's key and the reference's legacy key get
    one webhook each; the legacy one skips Pods that also carry the seed's key, so no Pod is admitted
    twice. `ca_bundle_pem` None leaves caBundle out (for cert-manager's cainjector to fill).
    """
    if isinstance(url_or_service, str):
        if not url_or_service.startswith("https://"):
            raise ValueError(
                f"webhook URL {url_or_service!r} must start with https:// (the apiserver requires TLS)"
            )
        client_config: dict[str, Any] = {"url": url_or_service}
    else:
        client_config = url_or_service.client_config()
    if ca_bundle_pem:
        pem = ca_bundle_pem.encode() if isinstance(ca_bundle_pem, str) else ca_bundle_pem
        client_config["caBundle"] = base64.b64encode(pem).decode("ascii")
    excluded = sorted(set(namespace_exclusions))
    module = {"key": keys.LABEL_COMPONENT, "operator": "In", "values": [keys.COMPONENT_MODULE]}
    legacy = {"key": keys.LABEL_COMPONENT_LEGACY, "operator": "In", "values": [keys.COMPONENT_MODULE]}
    not_module = {"key": keys.LABEL_COMPONENT, "operator": "NotIn", "values": [keys.COMPONENT_MODULE]}

    def entry(
        webhook_name: str,
        selector: list[dict[str, Any]],
        group: str = "",
        resources: Iterable[str] = ("pods",),
    ) -> dict[str, Any]:
        return {
            "name": webhook_name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": copy.deepcopy(client_config),
            "rules": [
                {
                    "operations": ["CREATE", "UPDATE"],
                    "apiGroups": [group],
                    "apiVersions": ["v1"],
                    "resources": list(resources),
                    "scope": "Namespaced",
                }
            ],
            "objectSelector": {"matchExpressions": selector},
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": list(excluded)}
                ]
            },
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": timeout_seconds,
            # Another mutating webhook may change the Pod after us; our patch is idempotent.
            "reinvocationPolicy": "IfNeeded",
        }

    # A workload's own labels say nothing about its Pods, so no objectSelector can pick module
    # workloads; a CEL match condition on the template's labels does, and keeps every other
    # Deployment in the cluster away from this webhook.
    workloads = entry(WORKLOAD_WEBHOOK_NAME, [], group="apps", resources=WORKLOAD_RESOURCES)
    del workloads["objectSelector"]
    workloads["matchConditions"] = [{"name": "module-pod-template", "expression": _MODULE_TEMPLATE_CEL}]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "module-controller-webhook"}},
        "webhooks": [
            entry(WEBHOOK_NAME, [module]),
            entry(LEGACY_WEBHOOK_NAME, [legacy, not_module]),
            workloads,
        ],
    }
