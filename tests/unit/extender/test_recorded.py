"""Requests recorded from the real kube-scheduler (v1.36, tests/unit/extender/data), answered as the
scheduler needs: three bases, one with the wrong version, for a Pod asking base version 1.1.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from extender import wire
from extender.app import Extender
from extender.view import ClusterView
from tests.unit.extender.samples import module_pod

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> bytes:
    return (DATA / name).read_bytes()


def cluster() -> ClusterView:
    view = ClusterView()
    for node in json.loads(recorded("nodes.json"))["items"]:
        view.upsert_node(node)
    view.synced = True
    return view


async def test_names_mode_filter_from_the_scheduler() -> None:
    result = await Extender(cluster()).filter(wire.parse_extender_args(recorded("names_filter.json")))
    assert result["Nodes"] is None
    assert sorted(result["NodeNames"]) == ["virtual-node-base-a", "virtual-node-base-b"]  # equal: both go
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-base-old": "base version not in [1.1.1]"}
    assert result["Error"] == ""


async def test_names_mode_filter_passes_only_the_emptier_base() -> None:
    view = cluster()
    view.observe_pod(module_pod("other", bizs=("biz9",), node="virtual-node-base-b", phase="Running"))
    result = await Extender(view).filter(wire.parse_extender_args(recorded("names_filter.json")))
    assert result["NodeNames"] == ["virtual-node-base-a"]


async def test_names_mode_filter_explains_every_base_when_none_fits() -> None:
    view = cluster()
    for node in ("virtual-node-base-a", "virtual-node-base-b"):
        view.observe_pod(module_pod(f"other-{node}", bizs=("biz1",), node=node, phase="Running"))
    result = await Extender(view).filter(wire.parse_extender_args(recorded("names_filter.json")))
    assert result["NodeNames"] == []
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-base-old": "base version not in [1.1.1]",
                                                    "virtual-node-base-a": "base already has module biz1",
                                                    "virtual-node-base-b": "base already has module biz1"}


async def test_full_node_mode_filter_from_the_scheduler_needs_no_cache() -> None:
    result = await Extender(None).filter(wire.parse_extender_args(recorded("full_filter.json")))
    assert result["NodeNames"] is None
    assert sorted(n["metadata"]["name"] for n in result["Nodes"]["items"]) == ["virtual-node-base-a",
                                                                            "virtual-node-base-b"]
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-base-old": "base version not in [1.1.1]"}


def test_prioritize_from_the_scheduler_prefers_the_emptier_base() -> None:
    view = cluster()
    occupant: dict[str, Any] = module_pod("other", bizs=("biz9",), node="virtual-node-base-b", phase="Running")
    view.observe_pod(occupant)
    scores = Extender(view).prioritize(wire.parse_extender_args(recorded("names_prioritize.json")))
    assert {s["Host"]: s["Score"] for s in scores} == {"virtual-node-base-a": 10, "virtual-node-base-b": 0}


def test_binding_args_from_the_scheduler() -> None:
    args = wire.parse_binding_args(recorded("names_bind.json"))
    assert (args.pod_namespace, args.pod_name, args.node) == ("rec", "biz1-7d9f", "virtual-node-base-a")
    assert args.pod_uid
