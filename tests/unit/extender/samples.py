"""Nodes and Pods shaped like the ones kube-scheduler sends the extender (camelCase API JSON)."""

from __future__ import annotations

from typing import Any

from koupleless import keys

SEED_JAR = (
    "https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
    "biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar"
)


def vnode(
    name: str,
    *,
    version: str = "1.1.1",
    base: str = "base",
    stack: str = "java",
    ready: bool = True,
    max_modules: int | None = 2,
    memory: str | None = "4Gi",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    allocatable: dict[str, str] = {"pods": "110"}
    if max_modules is not None:
        allocatable[keys.RESOURCE_MODULE] = str(max_modules)
    if memory is not None:
        allocatable["memory"] = memory
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                keys.LABEL_COMPONENT_LEGACY: keys.COMPONENT_VNODE,
                keys.LABEL_BASE_STACK: stack,
                keys.LABEL_BASE_NAME: base,
                keys.LABEL_BASE_VERSION: version,
                keys.LABEL_HOSTNAME: name,
                keys.LABEL_TYPE: keys.TYPE_VIRTUAL_KUBELET,
            },
            **({"annotations": annotations} if annotations else {}),
        },
        "spec": {
            "taints": [{"key": keys.TAINT_VIRTUAL_NODE, "value": keys.TAINT_VIRTUAL_NODE_VALUE,
                        "effect": keys.EFFECT_NO_EXECUTE}]
        },
        "status": {
            "capacity": dict(allocatable),
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "BaseHealthy"}],
        },
    }


def real_node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {keys.LABEL_HOSTNAME: name}},
        "status": {"allocatable": {"pods": "110", "cpu": "8", "memory": "32Gi"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def module_pod(
    name: str,
    *,
    bizs: tuple[str, ...] = ("biz1",),
    versions: tuple[str, ...] = ("1.1.1",),
    base: str = "base",
    stack: str = "java",
    namespace: str = "default",
    memory: str | None = None,
    node: str | None = None,
    phase: str = "Pending",
    legacy_label: bool = False,
    extra_expressions: list[dict[str, Any]] | None = None,
    biz_version: str = "0.0.1-SNAPSHOT",
    owner: str | None = None,
    template_hash: str = "",
) -> dict[str, Any]:
    """`owner`: the Pod's controlling owner as `Kind/name`; with `template_hash`, a ReplicaSet
    `Kind/<deployment>` is named `<deployment>-<hash>` and the Pod labelled `pod-template-hash`,
    as the Deployment controller does."""
    containers = []
    for biz in bizs:
        resources: dict[str, Any] = {"requests": {keys.RESOURCE_MODULE: "1"}, "limits": {keys.RESOURCE_MODULE: "1"}}
        if memory is not None:
            resources["requests"]["memory"] = memory
        containers.append({
            "name": biz,
            "image": SEED_JAR,
            "env": [{"name": keys.ENV_BIZ_VERSION, "value": biz_version}],
            "resources": resources,
        })
    label = keys.LABEL_COMPONENT_LEGACY if legacy_label else keys.LABEL_COMPONENT
    spec: dict[str, Any] = {
        "containers": containers,
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [
                {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": [stack]},
                {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": list(versions)},
                {"key": keys.LABEL_BASE_NAME, "operator": "In", "values": [base]},
                *(extra_expressions or []),
            ]}
        ]}}},
        "tolerations": [keys.vnode_toleration()],
    }
    if node:
        spec["nodeName"] = node
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                            "labels": {label: keys.COMPONENT_MODULE, "app": name}}
    if owner is not None:
        kind, owner_name = owner.split("/", 1)
        if template_hash:
            owner_name = f"{owner_name}-{template_hash}"
            meta["labels"]["pod-template-hash"] = template_hash
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": owner_name,
                                    "uid": f"uid-{owner_name}", "controller": True, "blockOwnerDeletion": True}]
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": {"phase": phase}}


def replica(name: str, deployment: str, template_hash: str, biz_version: str, **kwargs: Any) -> dict[str, Any]:
    """A Pod of Deployment `deployment`'s ReplicaSet `<deployment>-<template_hash>`."""
    return module_pod(name, owner=f"ReplicaSet/{deployment}", template_hash=template_hash,
                      biz_version=biz_version, **kwargs)


def plain_pod(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "uid": "u-" + name},
            "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}, "status": {"phase": "Pending"}}
