"""Counting modules per base from the watch and from our own bindings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extender.quantity import format_bytes, parse_quantity, quantity_bytes
from extender.state import ModulePod, Usage
from tests.unit.extender.samples import module_pod


def mp(name: str, node: str | None = None, bizs: tuple[str, ...] = ("biz1",), phase: str = "Pending") -> ModulePod:
    return ModulePod.from_pod(module_pod(name, node=node, bizs=bizs, phase=phase))


def test_observe_counts_bound_pods_once_and_follows_moves() -> None:
    usage = Usage()
    usage.observe(mp("p", "a", ("x", "y")))
    usage.observe(mp("p", "a", ("x", "y")))
    a = usage.get("a")
    assert a is not None and a.modules == 2 and a.biz_names["x"] == 1
    usage.observe(mp("p", phase="Succeeded", node="a"))
    assert usage.get("a") is None


def test_assumed_binding_counts_until_the_watch_confirms_or_it_expires() -> None:
    usage = Usage(assume_ttl=30)
    usage.assume(mp("p"), "a", now=100.0)
    assert usage.get("a") is not None and usage.get("a").modules == 1  # type: ignore[union-attr]
    # A stale event from before the binding (no nodeName yet) must not drop the assumption.
    usage.observe(mp("p"))
    assert usage.get("a").modules == 1  # type: ignore[union-attr]
    assert usage.expire(now=120.0) == 0
    assert usage.expire(now=131.0) == 1
    assert usage.get("a") is None


def test_confirmed_binding_never_expires_and_unassume_keeps_it() -> None:
    usage = Usage(assume_ttl=1)
    usage.assume(mp("p"), "a", now=0.0)
    usage.observe(mp("p", "a"))
    usage.unassume("default/p")
    assert usage.expire(now=100.0) == 0
    assert usage.get("a").modules == 1  # type: ignore[union-attr]
    usage.forget("default/p")
    assert usage.get("a") is None


def test_quantities() -> None:
    assert quantity_bytes("512Mi") == 512 * 2**20
    assert quantity_bytes("1G") == 10**9
    assert quantity_bytes("1.5Gi") == 3 * 2**29
    assert quantity_bytes("100m") == 1
    assert quantity_bytes("2e3") == 2000
    assert quantity_bytes("junk") is None
    assert parse_quantity(7) == 7
    assert format_bytes(512 * 2**20) == "512Mi"
    assert format_bytes(3 * 2**30) == "3Gi"
    assert format_bytes(5 * 10**8) == "500M"
    assert format_bytes(1234) == "1234"


@settings(max_examples=300, deadline=None)
@given(moves=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["a", "b", "c", ""]),
                                st.sampled_from([None, "ReplicaSet/d", "ReplicaSet/e", "StatefulSet/d"]),
                                st.sampled_from(["h1", "h2"]), st.sampled_from(["1", "2"])), max_size=25))
def test_the_upgrade_index_agrees_with_the_holders_of_every_base(
    moves: list[tuple[int, str, str | None, str, str]]
) -> None:
    """`Usage.upgradable` (set operations, for the indexed filter) answers as `BaseUsage.replaces`
    (the per-node filter) after any sequence of Pods bound, moved, upgraded and gone."""
    usage = Usage()
    for pod_no, node, owner, template_hash, version in moves:
        pod = ModulePod.from_pod(module_pod(f"p{pod_no}", node=node or None, owner=owner, template_hash=template_hash,
                                            biz_version=version, phase="Running"))
        usage.observe(pod)
    nodes = {"a", "b", "c"}
    for owner in (None, "ReplicaSet/d", "ReplicaSet/e", "StatefulSet/d"):
        for template_hash in ("h1", "h2"):
            incoming = ModulePod.from_pod(module_pod("x", owner=owner, template_hash=template_hash))
            for version in ("1", "2"):
                expected = {n for n in nodes
                            if (u := usage.get(n)) is not None and u.replaces("biz1", incoming.workload, version)}
                assert usage.upgradable("biz1", incoming.workload, version) == expected
    for pod_no in range(6):
        usage.forget(f"default/p{pod_no}")
    assert len(usage) == 0 and usage.biz_nodes == {}
    assert usage._sole == {} and usage._version_nodes == {}
