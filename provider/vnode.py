"""The virtual Node of a base: its object, its status and its Lease (DESIGN.md §2, reference §4.1)."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any

from koupleless import keys
from koupleless.kube import lease
from provider.state import BaseState

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class NodeOptions:
    env: str = keys.DEFAULT_ENV
    max_pods: int = 110
    max_modules: int = 10
    env_taint: bool = False
    stack: str = keys.DEFAULT_BASE_STACK
    default_memory: str = "4Gi"
    default_cpu: str = "4"
    #: Lease duration: a standby replica takes a base over this long after its holder's last renewal.
    lease_duration_s: int = LEASE_DURATION_S
    #: The provider's kubelet API (provider/kubelet_api.py) as kube-apiserver should dial it for
    #: every virtual Node; "" / 0 when it serves none (the Node then names the base's own host).
    kubelet_address: str = ""
    kubelet_port: int = 0
    #: New Nodes start tainted `keys.TAINT_UNAPPROVED` until an operator removes the taint.
    approve_new_bases: bool = False
    #: This replica's HTTP tunnel as the other replicas reach it (HOST:PORT), written on the Leases
    #: it holds: they forward there the heartbeats of its bases that reach them ("" when off).
    http_tunnel_address: str = ""


def node_labels(base: BaseState, opts: NodeOptions) -> dict[str, str]:
    hb = base.heartbeat
    meta = hb.metadata if hb else None
    labels = {
        keys.LABEL_BASE_STACK: opts.stack,
        keys.LABEL_BASE_NAME: meta.name if meta else "",
        keys.LABEL_BASE_VERSION: meta.version if meta else "",
        keys.LABEL_BASE_CLUSTER_NAME: meta.cluster_name if meta else "",
        keys.LABEL_COMPONENT_LEGACY: keys.COMPONENT_VNODE,
        keys.LABEL_VNODE_ENV: opts.env,
        keys.LABEL_HOSTNAME: base.node_name,
        keys.LABEL_TYPE: keys.TYPE_VIRTUAL_KUBELET,
    }
    return {k: _label_value(v) for k, v in labels.items()}


def _label_value(value: str) -> str:
    """A base's own text (name, version, cluster name) as a label value: characters other than
    [A-Za-z0-9-_.] become '-', at most 63 characters, starting and ending with a letter or digit.
    Always valid, so no heartbeat can make a Node write fail."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in value)[:63]
    return cleaned.strip("-_.")


def node_taints(opts: NodeOptions) -> list[dict[str, str]]:
    taints = [{"key": keys.TAINT_VIRTUAL_NODE, "value": keys.TAINT_VIRTUAL_NODE_VALUE, "effect": keys.EFFECT_NO_EXECUTE}]
    if opts.env_taint:
        taints.append({"key": keys.TAINT_NODE_ENV, "value": opts.env, "effect": keys.EFFECT_NO_EXECUTE})
    return taints


def unapproved_taint() -> dict[str, str]:
    """Only on a Node as it is created (never put back once an operator removed it: that removal is
    the approval, and the Node keeps it until it is deleted)."""
    return {"key": keys.TAINT_UNAPPROVED, "value": "true", "effect": keys.EFFECT_NO_SCHEDULE}


def node_capacity(base: BaseState, opts: NodeOptions) -> dict[str, str]:
    health = base.health
    memory = binary_quantity(health.memory_bytes) if health and health.memory_bytes else opts.default_memory
    cpu = str(health.cpu_count) if health and health.cpu_count else opts.default_cpu
    return {
        "pods": str(opts.max_pods),
        keys.RESOURCE_MODULE: str(opts.max_modules),
        "memory": memory,
        "cpu": cpu,
    }


def binary_quantity(n: int) -> str:
    """Bytes in the canonical form the API server stores (4096Mi comes back as 4Gi), so comparing
    what we want with what is stored does not see a change that is not one."""
    for suffix, power in (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if n % (1 << power) == 0:
            return f"{n >> power}{suffix}"
    return str(n)


def node_conditions(base: BaseState, old: dict[str, Any] | None, now: str) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in ((old or {}).get("conditions") or []) if isinstance(c, dict)}
    if base.ready:
        ready = ("True", "BaseReady", f"base {base.base_id} is sending heartbeats")
    else:
        ready = ("False", base.not_ready_reason, base.not_ready_message)
    wanted = [
        ("Ready", *ready),
        ("MemoryPressure", "False", "BaseHasSufficientMemory", "base has sufficient memory available"),
        ("DiskPressure", "False", "BaseHasNoDiskPressure", "base has no disk pressure"),
        ("PIDPressure", "False", "BaseHasSufficientPID", "base has sufficient PID available"),
    ]
    out = []
    for ctype, status, reason, message in wanted:
        prev = before.get(ctype) or {}
        changed = prev.get("status") != status
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now if changed or prev.get("reason") != reason else prev.get("lastHeartbeatTime", now),
                "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
            }
        )
    return out


def node_status(base: BaseState, opts: NodeOptions, old: dict[str, Any] | None, now: str) -> dict[str, Any]:
    capacity = node_capacity(base, opts)
    hb = base.heartbeat
    # InternalIP stays the base's IP: module Pods' podIP/hostIP, `--field-selector status.podIP=<baseIP>`.
    addresses = [{"type": "InternalIP", "address": base.ip or "127.0.0.1"}]
    # kube-apiserver dials a Node (kubectl logs / exec) at the first address of the types in its
    # --kubelet-preferred-address-types, default Hostname,InternalDNS,InternalIP,ExternalDNS,ExternalIP:
    # with the provider's kubelet API on, the Hostname address is that API's (--kubelet-address), so
    # the default order reaches the provider and never the base's IP, where no kubelet listens. It
    # is Hostname rather than an InternalDNS address because the default tries Hostname first (the
    # base's host name would have to go either way), and because the status patch merges addresses
    # by type: a Node written before gets its Hostname value replaced, where dropping the entry would
    # need a `$patch: delete`. An apiserver told to prefer InternalIP cannot reach the provider.
    own_host = hb.local_hostname.lower() if hb else ""
    if len(own_host) > 253 or not _DNS_SUBDOMAIN.fullmatch(own_host):
        own_host = base.node_name  # the base's localHostName is its own text: only a DNS name is used
    hostname = opts.kubelet_address or own_host
    addresses.append({"type": "Hostname", "address": hostname})
    return {
        "phase": "Running",
        "capacity": capacity,
        "allocatable": dict(capacity),
        "conditions": node_conditions(base, old, now),
        "addresses": addresses,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": opts.kubelet_port if opts.kubelet_address else 0}},
        "nodeInfo": {
            "architecture": _arch(),
            "operatingSystem": "linux",
            "kubeletVersion": f"koupleless-{_label_value(hb.metadata.version) if hb else ''}",
            "kernelVersion": "",
            "osImage": f"koupleless base {_label_value(hb.metadata.name) if hb else ''}",
            "containerRuntimeVersion": "arklet://",
            "kubeProxyVersion": "",
            "machineID": base.base_id,
            "systemUUID": base.base_id,
            "bootID": "",
        },
    }


def node_status_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    for key in ("capacity", "allocatable", "addresses", "daemonEndpoints"):
        if old.get(key) != new.get(key):
            return True
    def view(s: dict[str, Any]) -> list[tuple[Any, ...]]:
        return sorted((c.get("type"), c.get("status"), c.get("reason")) for c in s.get("conditions") or [])
    return view(old) != view(new)


def build_node(base: BaseState, opts: NodeOptions, now: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": base.node_name,
            "labels": node_labels(base, opts),
            "annotations": {keys.ANNOTATION_BASE_ID: base.base_id},
        },
        "spec": {"taints": node_taints(opts) + ([unapproved_taint()] if opts.approve_new_bases else [])},
        "status": node_status(base, opts, None, now),
    }


def build_lease(base: BaseState, holder: str, opts: NodeOptions, transitions: int = 0,
                acquire_time: str | None = None) -> dict[str, Any]:
    owner = {"apiVersion": "v1", "kind": "Node", "name": base.node_name, "uid": base.node_uid} if base.node_uid else None
    body = lease.lease_body(
        base.node_name, LEASE_NAMESPACE, holder, opts.lease_duration_s, transitions,
        labels={keys.LABEL_COMPONENT_LEGACY: keys.COMPONENT_VNODE_LEASE, keys.LABEL_VNODE_ENV: opts.env},
        owner=owner, acquire_time=acquire_time,
    )
    if opts.http_tunnel_address:
        body["metadata"]["annotations"] = {keys.ANNOTATION_HTTP_TUNNEL_ADDRESS: opts.http_tunnel_address}
    return body


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
