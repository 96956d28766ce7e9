"""`module-controller status`: the bases (virtual Nodes) and the modules on each, from the API server."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from koupleless import keys
from koupleless.kube import nodes as node_reader
from koupleless.kube.client import KubeClient, node_path, pod_path
from koupleless.kube.config import KubeConfigError
from koupleless.model import is_module_pod, module_from_container


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--env", default=None, help="only bases of this env (default: all)")
    parser.add_argument("-n", "--namespace", default=None, help="only modules in this namespace (default: all)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _ready(node: dict[str, Any]) -> str:
    return node_reader.condition_status(node, "Ready") or "Unknown"


def _ip(node: dict[str, Any]) -> str:
    return node_reader.address(node, "InternalIP")


def _module_rows(pod: dict[str, Any]) -> list[dict[str, Any]]:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    by_name = {c.get("name"): c for c in status.get("containerStatuses") or []}
    rows = []
    for c in (pod.get("spec") or {}).get("containers") or []:
        module = module_from_container(c)
        cs = by_name.get(c.get("name")) or {}
        state = next(iter(cs.get("state") or {}), "pending")
        detail = ((cs.get("state") or {}).get(state) or {}).get("reason", "")
        rows.append(
            {
                "pod": f"{meta.get('namespace')}/{meta.get('name')}",
                "module": module.biz_key,
                "state": state + (f" ({detail})" if detail else ""),
                "ready": bool(cs.get("ready")),
                "restarts": int(cs.get("restartCount") or 0),
                "terminating": bool(meta.get("deletionTimestamp")),
            }
        )
    return rows


async def collect(client: KubeClient, env: str | None, namespace: str | None) -> list[dict[str, Any]]:
    selector = f"{keys.LABEL_COMPONENT_LEGACY}={keys.COMPONENT_VNODE}"
    if env:
        selector += f",{keys.LABEL_VNODE_ENV}={env}"
    nodes, pods = await asyncio.gather(
        client.list(node_path(), {"labelSelector": selector}),
        client.list(pod_path(namespace), {"fieldSelector": "spec.nodeName!="}),
    )
    by_node: dict[str, list[dict[str, Any]]] = {}
    for pod in pods["items"]:
        if is_module_pod(pod):
            by_node.setdefault((pod.get("spec") or {}).get("nodeName", ""), []).append(pod)
    out = []
    for node in sorted(nodes["items"], key=lambda n: n["metadata"]["name"]):
        meta = node["metadata"]
        labels = meta.get("labels") or {}
        alloc = (node.get("status") or {}).get("allocatable") or {}
        modules = [row for pod in by_node.get(meta["name"], []) for row in _module_rows(pod)]
        out.append(
            {
                "node": meta["name"],
                "baseID": (meta.get("annotations") or {}).get(keys.ANNOTATION_BASE_ID, ""),
                "name": labels.get(keys.LABEL_BASE_NAME, ""),
                "version": labels.get(keys.LABEL_BASE_VERSION, ""),
                "env": labels.get(keys.LABEL_VNODE_ENV, ""),
                "ip": _ip(node),
                "ready": _ready(node),
                "modulesUsed": sum(1 for m in modules if not m["terminating"]),
                "modulesMax": alloc.get(keys.RESOURCE_MODULE, ""),
                "memory": alloc.get("memory", ""),
                "modules": modules,
            }
        )
    return out


def render(bases: list[dict[str, Any]]) -> str:
    if not bases:
        return "no bases (no virtual Nodes found)\n"
    header = ("NODE", "BASE", "VERSION", "IP", "READY", "MODULES", "MEMORY")
    rows = [
        (b["node"], b["name"], b["version"], b["ip"], b["ready"], f"{b['modulesUsed']}/{b['modulesMax']}", b["memory"])
        for b in bases
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines: list[str] = []
    for b, row in zip(bases, rows, strict=True):
        if not lines:
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for m in b["modules"]:
            flag = "Ready" if m["ready"] else "NotReady"
            extra = f"  restarts={m['restarts']}" if m["restarts"] else ""
            extra += "  Terminating" if m["terminating"] else ""
            lines.append(f"    {m['module']:<32} {m['state']:<28} {flag:<9} {m['pod']}{extra}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    async def main() -> int:
        try:
            client = KubeClient.from_kubeconfig(args.kubeconfig, args.context)
        except KubeConfigError as exc:
            print(f"module-controller status: {exc}", file=sys.stderr)
            return 2
        try:
            bases = await collect(client, args.env, args.namespace)
        finally:
            await client.close()
        if args.output == "json":
            sys.stdout.write(orjson.dumps(bases, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            sys.stdout.write(render(bases))
        return 0

    try:
        return asyncio.run(main())
    except Exception as exc:  # the API server unreachable, RBAC refusing: say so, no traceback
        print(f"module-controller status: {exc}", file=sys.stderr)
        return 1
