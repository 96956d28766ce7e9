"""Workloads whose Pod template is a module: make the selector match the template.

The seed's own sample Deployment selects `app: test-module-deployment` while its template is labelled
`app: test-module-deployment-non-peer`; kube-apiserver rejects that ("`selector` does not match
template `labels`") before any Pod exists. Users copy that sample, and DESIGN.md requires it to run
unchanged, so for module workloads (only) the selector is aligned with the template at admission,
with a warning that says exactly what changed. The template is left alone: it is what the Pods will
be, and what users select them by.

Pod-level validation is not done here: a bad module template is reported where Kubernetes reports
Pod problems, as a FailedCreate event of the ReplicaSet, carrying the Pod webhook's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from koupleless import keys
from webhook.patch import Op, add, pointer, replace

#: kind -> where its Pod template lives (all apps/v1 workloads keep it at spec.template).
WORKLOAD_KINDS = ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet")


def module_template_labels(workload: Mapping[str, Any]) -> dict[str, str] | None:
    """The template's labels when the workload's Pods are modules, else None."""
    spec = workload.get("spec")
    template = spec.get("template") if isinstance(spec, dict) else None
    metadata = template.get("metadata") if isinstance(template, dict) else None
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    if not isinstance(labels, dict) or not keys.is_module_pod_labels(labels):
        return None
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}


def align_selector(workload: Mapping[str, Any]) -> tuple[list[Op], list[str]]:
    """JSON-patch ops and warnings that make `spec.selector.matchLabels` select the template's Pods.

    Applied on UPDATE too: a selector is immutable, and `kubectl replace` of the same manifest sends
    the selector as written, which this rule turns into the stored one again.
    Selectors with matchExpressions are left as they are: their intent cannot be read safely.
    """
    labels = module_template_labels(workload)
    spec = workload.get("spec")
    if labels is None or not isinstance(spec, dict):
        return [], []
    selector = spec.get("selector")
    if not isinstance(selector, dict) or selector.get("matchExpressions"):
        return [], []
    match_labels = selector.get("matchLabels")
    if not isinstance(match_labels, dict):
        return [], []
    ops: list[Op] = []
    warnings: list[str] = []
    for key, wanted in match_labels.items():
        if not isinstance(key, str) or not key or not isinstance(wanted, str):
            continue  # not a label the apiserver would accept; its validation says so
        actual = labels.get(key)
        if actual is None:
            ops.append(add(pointer("spec", "template", "metadata", "labels", key), wanted))
            warnings.append(
                f"spec.template.metadata.labels: added {key}={wanted} so the Pod template matches "
                "spec.selector (kube-apiserver rejects a selector that does not match the template)"
            )
        elif actual != wanted:
            ops.append(replace(pointer("spec", "selector", "matchLabels", key), actual))
            warnings.append(
                f"spec.selector.matchLabels.{key}: {wanted!r} does not match the Pod template's "
                f"{key}={actual!r}; the selector now uses {actual!r} (kube-apiserver rejects a selector "
                "that does not match the template) — write the same value in both"
            )
    return ops, warnings
