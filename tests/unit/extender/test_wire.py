"""Reading ExtenderArgs the way kube-scheduler writes them, and answering in the field it reads."""

from __future__ import annotations

import orjson
import pytest

from extender import wire
from tests.unit.extender.samples import module_pod, vnode


def body(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_pascal_case_names_request() -> None:
    args = wire.parse_extender_args(body({"Pod": module_pod("m"), "Nodes": None, "NodeNames": ["a", "b"]}))
    assert args.node_names == ["a", "b"] and args.nodes is None and args.names == ["a", "b"]


def test_full_node_request_and_lower_case_keys() -> None:
    args = wire.parse_extender_args(body({"pod": module_pod("m"), "nodes": {"items": [vnode("a")]}, "nodenames": None}))
    assert args.node_names is None and args.names == ["a"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"", "body"),
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (body({"NodeNames": ["a"]}), "Pod"),
        (body({"Pod": "x", "NodeNames": ["a"]}), "Pod"),
        (body({"Pod": {"spec": {}}, "NodeNames": ["a"]}), "Pod.metadata"),
        (body({"Pod": {"metadata": {}, "spec": []}, "NodeNames": ["a"]}), "Pod.spec"),
        (body({"Pod": {"metadata": {}}}), "NodeNames"),
        (body({"Pod": {"metadata": {}}, "NodeNames": "a"}), "NodeNames"),
        (body({"Pod": {"metadata": {}}, "NodeNames": ["a", 3]}), "NodeNames[1]"),
        (body({"Pod": {"metadata": {}}, "Nodes": []}), "Nodes"),
        (body({"Pod": {"metadata": {}}, "Nodes": {"items": {}}}), "Nodes.items"),
        (body({"Pod": {"metadata": {}}, "Nodes": {"items": [{"metadata": {}}]}}), "Nodes.items[0].metadata.name"),
    ],
)
def test_malformed_args_name_the_field_and_the_fix(payload: bytes, field: str) -> None:
    with pytest.raises(wire.BadRequest) as err:
        wire.parse_extender_args(payload)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and " — " in str(err.value)


def test_filter_result_uses_the_field_of_the_request_mode() -> None:
    names = wire.ExtenderArgs(pod={}, nodes=None, node_names=["a", "b"])
    result = wire.filter_result(names, ["a"], {"b": "base not Ready"})
    assert result == {"Nodes": None, "NodeNames": ["a"], "FailedNodes": {},
                      "FailedAndUnresolvableNodes": {"b": "base not Ready"}, "Error": ""}
    full = wire.ExtenderArgs(pod={}, nodes=[vnode("a"), vnode("b")], node_names=None)
    result = wire.filter_result(full, ["a"], {"b": "base not Ready"})
    assert result["NodeNames"] is None
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["a"]
    # An empty pass list is still a list: null would mean "drop every node silently".
    assert wire.filter_result(names, [], {})["NodeNames"] == []


def test_binding_args() -> None:
    args = wire.parse_binding_args(body({"PodName": "p", "PodNamespace": "ns", "PodUID": "u", "Node": "n"}))
    assert (args.pod_name, args.pod_namespace, args.pod_uid, args.node) == ("p", "ns", "u", "n")
    with pytest.raises(wire.BadRequest) as err:
        wire.parse_binding_args(body({"PodName": "p", "PodNamespace": "ns", "PodUID": "u"}))
    assert err.value.field == "Node"
