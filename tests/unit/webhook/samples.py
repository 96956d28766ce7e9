"""Module Pods as users write them: the seed's sample Deployment and Pods derived from it."""

from __future__ import annotations

import copy
from typing import Any

SEED_JAR = (
    "https://serverless-opensource.oss-cn-shanghai.aliyuncs.com/module-packages/stable/"
    "biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar"
)

#: seeds/module-release.md, "samples/module-deployment.yaml", as kubectl sends it. Its selector
#: (`app: test-module-deployment`) does not match its template's label
#: (`app: test-module-deployment-non-peer`); the webhook aligns it (webhook.workloads).
SEED_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "test-module-deployment", "namespace": "default"},
    "spec": {
        "replicas": 1,
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": {"app": "test-module-deployment"}},
        "strategy": {
            "rollingUpdate": {"maxSurge": "30%", "maxUnavailable": "30%"},
            "type": "RollingUpdate",
        },
        "template": {
            "metadata": {
                "labels": {
                    "module-controller.koupleless.io/component": "module",
                    "app": "test-module-deployment-non-peer",
                }
            },
            "spec": {
                "containers": [
                    {
                        "name": "biz1",
                        "image": SEED_JAR,
                        "env": [{"name": "BIZ_VERSION", "value": "0.0.1-SNAPSHOT"}],
                    }
                ],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "base.koupleless.io/stack",
                                            "operator": "In",
                                            "values": ["java"],
                                        },
                                        {
                                            "key": "base.koupleless.io/version",
                                            "operator": "In",
                                            "values": ["1.1.1"],
                                        },
                                        {
                                            "key": "base.koupleless.io/name",
                                            "operator": "In",
                                            "values": ["base"],
                                        },
                                    ]
                                }
                            ]
                        }
                    }
                },
                "tolerations": [
                    {
                        "key": "schedule.koupleless.io/virtual-node",
                        "operator": "Equal",
                        "value": "True",
                        "effect": "NoExecute",
                    }
                ],
            },
        },
    },
}


def seed_pod(name: str = "module-pod") -> dict[str, Any]:
    """A bare Pod with the seed template's metadata and spec."""
    template = copy.deepcopy(SEED_DEPLOYMENT["spec"]["template"])
    template["metadata"]["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", **template}


def stripped(pod: dict[str, Any]) -> dict[str, Any]:
    """The seed Pod with what the webhook can restore taken out: tolerations, the stack term and
    BIZ_VERSION (the jar name carries it)."""
    pod = copy.deepcopy(pod)
    spec = pod["spec"]
    del spec["tolerations"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    term["matchExpressions"] = [e for e in term["matchExpressions"] if e["key"] != "base.koupleless.io/stack"]
    del spec["containers"][0]["env"]
    return pod


def review(
    obj: Any,
    *,
    operation: str = "CREATE",
    old: Any = None,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    kind: str = "Pod",
    resource: str = "pods",
    group: str = "",
) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview shaped like kube-apiserver's."""
    metadata = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": resource},
            "name": metadata.get("name", "") if isinstance(metadata, dict) else "",
            "namespace": "default",
            "operation": operation,
            "userInfo": {
                "username": "kubernetes-admin",
                "groups": ["system:masters", "system:authenticated"],
            },
            "object": obj,
            "oldObject": old,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


#: The seed's Deployment template as a DaemonSet (selector matching its template).
SEED_DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "test-module-daemonset", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "test-module-deployment-non-peer"}},
        "template": copy.deepcopy(SEED_DEPLOYMENT["spec"]["template"]),
    },
}

#: What k8s.io/kubernetes/pkg/controller/daemon/util.AddOrUpdateDaemonPodTolerations adds.
DAEMONSET_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]


def daemonset_pod(node: str = "virtual-node-base-1-1-1-0", template: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Pod as kube-controller-manager's DaemonSet controller creates it for `node` (and as the
    apiserver's defaulting leaves it before admission): the template with its required node
    affinity replaced by one `matchFields metadata.name In [node]` term
    (ReplaceDaemonSetPodNodeNameNodeAffinity), the DaemonSet's tolerations, and a controller
    ownerReference to the DaemonSet."""
    template = copy.deepcopy(template if template is not None else SEED_DAEMONSET["spec"]["template"])
    spec = template["spec"]
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = {
        "nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
        ]
    }
    tolerations = spec.setdefault("tolerations", [])
    for toleration in DAEMONSET_TOLERATIONS:
        same = [t for t in tolerations if (t.get("key"), t.get("effect")) == (toleration["key"], toleration["effect"])]
        for t in same:
            tolerations.remove(t)
        tolerations.append(dict(toleration))
    for container in spec["containers"]:
        container.setdefault("resources", {})
        container.update(
            terminationMessagePath="/dev/termination-log",
            terminationMessagePolicy="File",
            imagePullPolicy="IfNotPresent",
        )
    spec.update(
        restartPolicy="Always",
        terminationGracePeriodSeconds=30,
        dnsPolicy="ClusterFirst",
        securityContext={},
        schedulerName="default-scheduler",
        enableServiceLinks=True,
        preemptionPolicy="PreemptLowerPriority",
        priority=0,
    )
    labels = dict(template["metadata"]["labels"])
    labels.update({"controller-revision-hash": "6c9b4d7f8", "pod-template-generation": "1"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "test-module-daemonset-",
            "namespace": "default",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": "test-module-daemonset",
                    "uid": "3f1c7a2e-5b7d-4e0a-9a51-0d6f2b8c4e11",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }
