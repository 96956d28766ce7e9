"""Every label, taint, annotation, env-var and MQTT name a user or a base relies on, defined once.

Renaming any of these breaks manifests that are already applied; add a new name beside an old one
instead (see DESIGN.md §2).
"""

from __future__ import annotations

from typing import Final

# --- module Pods -------------------------------------------------------------------------------

#: Label that marks a Pod as a module (the seed's key).
LABEL_COMPONENT: Final = "module-controller.koupleless.io/component"
#: The Go reference's key; accepted so existing manifests keep working.
LABEL_COMPONENT_LEGACY: Final = "virtual-kubelet.koupleless.io/component"
COMPONENT_MODULE: Final = "module"
#: Both keys, seed's first; a Pod carrying either with value `module` is a module Pod.
MODULE_LABEL_KEYS: Final = (LABEL_COMPONENT, LABEL_COMPONENT_LEGACY)

#: Container env var carrying the module version (bizVersion).
ENV_BIZ_VERSION: Final = "BIZ_VERSION"

# --- base (virtual Node) labels, also the node-affinity keys module Pods select on ---------------

LABEL_BASE_STACK: Final = "base.koupleless.io/stack"
LABEL_BASE_NAME: Final = "base.koupleless.io/name"
LABEL_BASE_VERSION: Final = "base.koupleless.io/version"
LABEL_BASE_CLUSTER_NAME: Final = "base.koupleless.io/cluster-name"
DEFAULT_BASE_STACK: Final = "java"

LABEL_VNODE_ENV: Final = "virtual-kubelet.koupleless.io/env"
COMPONENT_VNODE: Final = "vnode"
COMPONENT_VNODE_LEASE: Final = "vnode-lease"
LABEL_HOSTNAME: Final = "kubernetes.io/hostname"
LABEL_TYPE: Final = "type"
TYPE_VIRTUAL_KUBELET: Final = "virtual-kubelet"

#: Prefix of every virtual Node's name: `virtual-node-<baseID>` (the seed's naming).
VNODE_NAME_PREFIX: Final = "virtual-node-"

# --- taints and tolerations ---------------------------------------------------------------------

TAINT_VIRTUAL_NODE: Final = "schedule.koupleless.io/virtual-node"
TAINT_VIRTUAL_NODE_VALUE: Final = "True"
#: Only set when the provider is told to (clusters shared by several envs).
TAINT_NODE_ENV: Final = "schedule.koupleless.io/node-env"
EFFECT_NO_EXECUTE: Final = "NoExecute"
EFFECT_NO_SCHEDULE: Final = "NoSchedule"

#: With --approve-new-bases: on a new base's Node until an operator removes it (the approval).
TAINT_UNAPPROVED: Final = "schedule.koupleless.io/unapproved"

#: Taints the node lifecycle controller puts on a Node that stops answering.
TAINT_NOT_READY: Final = "node.kubernetes.io/not-ready"
TAINT_UNREACHABLE: Final = "node.kubernetes.io/unreachable"

# --- annotations written by this project --------------------------------------------------------

ANNOTATION_PREFIX: Final = "module-controller.koupleless.io/"
#: On a Pod: the module versions the provider last asked the base to install, JSON.
ANNOTATION_INSTALLED: Final = ANNOTATION_PREFIX + "installed"
#: On a virtual Node: the base's own ID (the Node name is a sanitised form of it).
ANNOTATION_BASE_ID: Final = ANNOTATION_PREFIX + "base-id"
#: On a base's Lease: the holder replica's HTTP tunnel address (HOST:PORT), where the other replicas
#: forward the heartbeats of that base they receive (provider/http_tunnel.py).
ANNOTATION_HTTP_TUNNEL_ADDRESS: Final = ANNOTATION_PREFIX + "http-tunnel-address"

# --- MQTT (arklet protocol, reference §2) --------------------------------------------------------

MQTT_TOPIC_ROOT: Final = "koupleless_{env}"
DEFAULT_ENV: Final = "dev"

# --- environment variables read by our processes --------------------------------------------------

ENV_KUBECONFIG: Final = "KUBECONFIG"
ENV_KUBEBUILDER_ASSETS: Final = "KUBEBUILDER_ASSETS"
#: Directory that caches the built control-plane binaries (default ~/.cache/koupleless/devcluster).
ENV_DEVCLUSTER_CACHE: Final = "KOUPLELESS_DEVCLUSTER_CACHE"


def is_module_pod_labels(labels: dict[str, str] | None) -> bool:
    """True when the labels mark a module Pod under either the seed's key or the reference's."""
    if not labels:
        return False
    for key in MODULE_LABEL_KEYS:  # not any(<generator>): every admission and Pod event asks
        if labels.get(key) == COMPONENT_MODULE:
            return True
    return False


def vnode_toleration() -> dict[str, str]:
    return {
        "key": TAINT_VIRTUAL_NODE,
        "operator": "Equal",
        "value": TAINT_VIRTUAL_NODE_VALUE,
        "effect": EFFECT_NO_EXECUTE,
    }


def env_toleration(env: str) -> dict[str, str]:
    return {"key": TAINT_NODE_ENV, "operator": "Equal", "value": env, "effect": EFFECT_NO_EXECUTE}


def vnode_name(base_id: str) -> str:
    """`virtual-node-<baseID>`, made a valid DNS-1123 subdomain (lower case; anything but
    [a-z0-9.-] becomes '-'; at most 253 characters; ends with a letter or digit)."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in base_id.lower())
    name = (VNODE_NAME_PREFIX + cleaned)[:253]
    return name.rstrip(".-") or VNODE_NAME_PREFIX.rstrip("-")


# --- resources -------------------------------------------------------------------------------------

#: Extended resource: one unit per module (container). Vnodes advertise the base's module capacity in
#: it; the webhook requests 1 per container on CREATE; the scheduler config lists it as a managed
#: resource with ignoredByScheduler, so only module Pods reach the extender, which enforces it with a
#: readable reason ("base at module capacity"). A cluster without the extender still gets a correct
#: count from the in-tree resource fit.
RESOURCE_MODULE: Final = "koupleless.io/module"

# --- extender replicas ----------------------------------------------------------------------------

#: On an extender Pod: set to `leader` on the replica holding the leader-election Lease. The extender's
#: Service selects it, so kube-scheduler's calls reach the leader only while every replica is Ready.
LABEL_EXTENDER_ROLE: Final = "module-controller.koupleless.io/extender-role"
EXTENDER_ROLE_LEADER: Final = "leader"
#: Downward-API env vars naming the Pod a process runs in (the leader labels its own Pod).
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
