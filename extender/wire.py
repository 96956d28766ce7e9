"""The scheduler-extender wire format (k8s.io/kube-scheduler/extender/v1), read and written as dicts.

kube-scheduler marshals structs without JSON tags, so keys arrive PascalCase (`Pod`, `NodeNames`)
with nil as `null`; Go decodes responses case-insensitively. We read keys case-insensitively and
write PascalCase. A request that does not parse gets an error that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

JsonDict = dict[str, Any]


class BadRequest(ValueError):
    """Input that is not the ExtenderArgs (or binding args) the scheduler sends."""

    def __init__(self, field: str, what: str, fix: str) -> None:
        self.field, self.what, self.fix = field, what, fix
        super().__init__(f"{field}: {what} — {fix}")


@dataclass(frozen=True, slots=True)
class ExtenderArgs:
    pod: JsonDict
    #: Full Node objects (nodeCacheCapable: false); None when the scheduler sent names.
    nodes: list[JsonDict] | None
    #: Node names (nodeCacheCapable: true); None when the scheduler sent Node objects.
    node_names: list[str] | None

    @property
    def names(self) -> list[str]:
        if self.node_names is not None:
            return self.node_names
        return [node_name(n) for n in self.nodes or []]


@dataclass(frozen=True, slots=True)
class BindingArgs:
    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


_ARGS_SHAPE = '{"Pod": {...}, "NodeNames": ["node", ...]} (nodeCacheCapable) or {"Pod": {...}, "Nodes": {"items": [...]}}'


def _decode_object(body: bytes, what: str, shape: str) -> JsonDict:
    if not body:
        raise BadRequest("body", "is empty", f"POST {what} as JSON: {shape}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("body", f"is not JSON ({exc})", f"POST {what} as JSON: {shape}") from None
    if not isinstance(data, dict):
        raise BadRequest("body", f"is a JSON {type(data).__name__}, not an object", f"POST {what}: {shape}")
    return data


def _folded(data: JsonDict) -> JsonDict:
    # Go matches field names case-insensitively; do the same (exact key wins when both exist).
    out: JsonDict = {}
    for key, value in data.items():
        folded = key.lower()
        if folded not in out or key[:1].isupper():
            out[folded] = value
    return out


def node_name(node: JsonDict) -> str:
    meta = node.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def parse_extender_args(body: bytes) -> ExtenderArgs:
    data = _folded(_decode_object(body, "ExtenderArgs", _ARGS_SHAPE))
    pod = data.get("pod")
    if pod is None:
        raise BadRequest("Pod", "is missing", f"send the Pod being scheduled: {_ARGS_SHAPE}")
    if not isinstance(pod, dict):
        raise BadRequest("Pod", f"is a {type(pod).__name__}, not a Pod object", "send the full v1 Pod JSON")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise BadRequest("Pod.metadata", "is missing or not an object", "send the full v1 Pod JSON, with metadata")
    for key in ("spec",):
        if key in pod and pod[key] is not None and not isinstance(pod[key], dict):
            raise BadRequest(f"Pod.{key}", "is not an object", "send the full v1 Pod JSON")

    raw_names = data.get("nodenames")
    raw_nodes = data.get("nodes")
    names: list[str] | None = None
    nodes: list[JsonDict] | None = None
    if raw_names is not None:
        if not isinstance(raw_names, list):
            raise BadRequest("NodeNames", f"is a {type(raw_names).__name__}, not a list", "send a list of Node names")
        try:
            # C-speed check of thousands of names: join raises on a non-string, `in` finds an empty one.
            "".join(raw_names)
            valid = "" not in raw_names
        except TypeError:
            valid = False
        if not valid:
            i, name = next((i, n) for i, n in enumerate(raw_names) if not isinstance(n, str) or not n)
            raise BadRequest(f"NodeNames[{i}]", f"{name!r} is not a Node name", "send non-empty strings")
        names = raw_names
    elif raw_nodes is not None:
        if not isinstance(raw_nodes, dict):
            raise BadRequest("Nodes", f"is a {type(raw_nodes).__name__}, not a NodeList", 'send {"items": [...]}')
        items = raw_nodes.get("items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadRequest("Nodes.items", f"is a {type(items).__name__}, not a list", "send a list of v1 Nodes")
        for i, node in enumerate(items):
            if not isinstance(node, dict) or not node_name(node):
                raise BadRequest(
                    f"Nodes.items[{i}].metadata.name", "is missing", "send full v1 Node objects, each with its name"
                )
        nodes = items
    else:
        raise BadRequest(
            "NodeNames",
            "neither NodeNames nor Nodes is set",
            "send NodeNames (extender registered with nodeCacheCapable: true) or Nodes (nodeCacheCapable: false)",
        )
    return ExtenderArgs(pod=pod, nodes=nodes, node_names=names)


def parse_binding_args(body: bytes) -> BindingArgs:
    shape = '{"PodName": "...", "PodNamespace": "...", "PodUID": "...", "Node": "..."}'
    data = _folded(_decode_object(body, "ExtenderBindingArgs", shape))
    values: dict[str, str] = {}
    for field, key in (("PodName", "podname"), ("PodNamespace", "podnamespace"), ("PodUID", "poduid"),
                       ("Node", "node")):
        value = data.get(key)
        if not isinstance(value, str) or (not value and key != "poduid"):
            raise BadRequest(field, f"{value!r} is not a non-empty string", f"send {shape}")
        values[key] = value
    return BindingArgs(values["podname"], values["podnamespace"], values["poduid"], values["node"])


def filter_result(
    args: ExtenderArgs, passing: list[str], failed: dict[str, str], nodes_by_name: dict[str, JsonDict] | None = None
) -> JsonDict:
    """ExtenderFilterResult in the field that matches the request's mode: the other one null, or the
    scheduler would drop every Node."""
    if args.node_names is not None:
        return {"Nodes": None, "NodeNames": passing, "FailedNodes": {}, "FailedAndUnresolvableNodes": failed,
                "Error": ""}
    by_name = nodes_by_name if nodes_by_name is not None else {node_name(n): n for n in args.nodes or []}
    return {
        "Nodes": {"metadata": {}, "items": [by_name[n] for n in passing]},
        "NodeNames": None,
        "FailedNodes": {},
        "FailedAndUnresolvableNodes": failed,
        "Error": "",
    }


def filter_error(message: str) -> JsonDict:
    return {"Nodes": None, "NodeNames": None, "FailedNodes": None, "FailedAndUnresolvableNodes": None,
            "Error": message}


def priority_list(scores: list[tuple[str, int]]) -> list[JsonDict]:
    return [{"Host": host, "Score": score} for host, score in scores]


def binding_result(error: str = "") -> JsonDict:
    return {"Error": error}
