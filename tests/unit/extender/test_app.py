"""The extender over HTTP: both modes, binding, bursts, and bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extender.app import Extender, Settings, make_app
from extender.view import ClusterView
from tests.unit.extender.samples import module_pod, plain_pod, real_node, replica, vnode


class FakeBinder:
    """Records bindings; the API server's side is what the e2e tests exercise."""

    def __init__(self, view: ClusterView | None = None, fail: bool = False) -> None:
        self.bound: list[tuple[str, str]] = []
        self.fail = fail
        self.pods: dict[str, dict[str, Any]] = {}

    async def bind(self, namespace: str, name: str, uid: str, node: str) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("409 Conflict: pod is already assigned")
        self.bound.append((f"{namespace}/{name}", node))

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.pods[f"{namespace}/{name}"]


def synced_view(*nodes: dict[str, Any]) -> ClusterView:
    view = ClusterView()
    for node in nodes:
        view.upsert_node(node)
    view.synced = True
    return view


@pytest.fixture
async def make_client() -> AsyncIterator[Any]:
    clients: list[TestClient[Any, Any]] = []

    async def make(extender: Extender) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(extender)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def post(client: TestClient[Any, Any], path: str, payload: Any) -> tuple[int, Any]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    return resp.status, orjson.loads(await resp.read())


async def test_names_mode_filters_from_the_watch_cache(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a"), vnode("virtual-node-b", version="2"))
    client = await make_client(Extender(view, binder=FakeBinder()))
    status, result = await post(client, "/filter", {"Pod": module_pod("m"), "Nodes": None,
                                                    "NodeNames": ["virtual-node-a", "virtual-node-b", "worker"]})
    assert status == 200
    assert result == {"Nodes": None, "NodeNames": ["virtual-node-a"], "FailedNodes": {},
                      "FailedAndUnresolvableNodes": {"virtual-node-b": "base version not in [1.1.1]",
                                                     "worker": "not a virtual node"}, "Error": ""}


async def test_full_node_mode_needs_no_kubeconfig(make_client: Any) -> None:
    client = await make_client(Extender(None))
    nodes = [vnode("virtual-node-a"), vnode("virtual-node-b", ready=False), real_node("worker")]
    status, result = await post(client, "/filter", {"Pod": module_pod("m"), "Nodes": {"metadata": {}, "items": nodes},
                                                    "NodeNames": None})
    assert status == 200 and result["Error"] == "" and result["NodeNames"] is None
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["virtual-node-a"]
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-b": "base not Ready", "worker": "not a virtual node"}
    status, scores = await post(client, "/prioritize", {"Pod": module_pod("m"), "Nodes": {"items": nodes[:1]}})
    assert status == 200 and scores == [{"Host": "virtual-node-a", "Score": 10}]


async def test_names_mode_without_a_cache_says_how_to_fix_it(make_client: Any) -> None:
    client = await make_client(Extender(None))
    status, result = await post(client, "/filter", {"Pod": module_pod("m"), "NodeNames": ["a"]})
    assert status == 200 and "--kubeconfig" in result["Error"] and "nodeCacheCapable: false" in result["Error"]


async def test_non_module_pods_pass_through(make_client: Any) -> None:
    client = await make_client(Extender(synced_view()))
    _, result = await post(client, "/filter", {"Pod": plain_pod("web"), "NodeNames": ["worker", "x"]})
    assert result["NodeNames"] == ["worker", "x"] and result["FailedAndUnresolvableNodes"] == {}


async def test_malformed_requests_get_a_clear_error_and_the_server_keeps_serving(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a"))
    client = await make_client(Extender(view))
    status, result = await post(client, "/filter", b'{"Pod": 1')
    assert status == 200 and result["Error"].startswith("malformed filter request: body: is not JSON")
    status, result = await post(client, "/filter", {"Pod": {"metadata": {}}, "NodeNames": [1]})
    assert result["Error"].startswith("malformed filter request: NodeNames[0]: 1 is not a Node name")
    status, result = await post(client, "/prioritize", {"NodeNames": []})
    assert status == 400 and "Pod: is missing" in result["Error"]
    status, result = await post(client, "/bind", {"PodName": "p"})
    assert status == 200 and "PodNamespace" in result["Error"]
    status, result = await post(client, "/filter", {"Pod": module_pod("m"), "NodeNames": ["virtual-node-a"]})
    assert result["NodeNames"] == ["virtual-node-a"]
    metrics = await (await client.get("/metrics")).text()
    assert 'koupleless_extender_requests_total{outcome="bad_request",verb="filter"}' in metrics


async def test_bind_refuses_to_overbook_and_counts_what_it_bound(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=1))
    binder = FakeBinder()
    client = await make_client(Extender(view, binder=binder))
    pods = [module_pod("m1", bizs=("b1",)), module_pod("m2", bizs=("b2",))]
    for pod in pods:
        _, result = await post(client, "/filter", {"Pod": pod, "NodeNames": ["virtual-node-a"]})
        assert result["NodeNames"] == ["virtual-node-a"]  # the scheduler races: both filtered before any bind
    _, first = await post(client, "/bind", {"PodName": "m1", "PodNamespace": "default", "PodUID": "u1",
                                            "Node": "virtual-node-a"})
    _, second = await post(client, "/bind", {"PodName": "m2", "PodNamespace": "default", "PodUID": "u2",
                                             "Node": "virtual-node-a"})
    assert first == {"Error": ""}
    assert "base at module capacity" in second["Error"] and "retry" in second["Error"]
    assert binder.bound == [("default/m1", "virtual-node-a")]
    _, result = await post(client, "/filter", {"Pod": pods[1], "NodeNames": ["virtual-node-a"]})
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-a": "base at module capacity"}


async def test_failed_binding_releases_the_slot(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=1))
    client = await make_client(Extender(view, binder=FakeBinder(fail=True)))
    await post(client, "/filter", {"Pod": module_pod("m1"), "NodeNames": ["virtual-node-a"]})
    _, result = await post(client, "/bind", {"PodName": "m1", "PodNamespace": "default", "PodUID": "u",
                                             "Node": "virtual-node-a"})
    assert "already assigned" in result["Error"]
    _, result = await post(client, "/filter", {"Pod": module_pod("m2", bizs=("b2",)), "NodeNames": ["virtual-node-a"]})
    assert result["NodeNames"] == ["virtual-node-a"]


async def test_burst_filter_waits_for_the_in_flight_binding(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=1), vnode("virtual-node-b", max_modules=1))
    binder = FakeBinder()
    client = await make_client(Extender(view, binder=binder, settings=Settings(burst_wait=10)))
    _, first = await post(client, "/filter", {"Pod": module_pod("m1", bizs=("b1",)),
                                              "NodeNames": ["virtual-node-a", "virtual-node-b"]})
    assert sorted(first["NodeNames"]) == ["virtual-node-a", "virtual-node-b"]
    # m2's filter arrives before m1's bind: it must not answer until m1 has landed.
    second = asyncio.ensure_future(post(client, "/filter", {"Pod": module_pod("m2", bizs=("b2",)),
                                                            "NodeNames": ["virtual-node-a", "virtual-node-b"]}))
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done
    _, bound = await post(client, "/bind", {"PodName": "m1", "PodNamespace": "default", "PodUID": "u",
                                            "Node": "virtual-node-b"})
    assert bound == {"Error": ""}
    _, result = await second
    assert result["NodeNames"] == ["virtual-node-a"]
    assert result["FailedAndUnresolvableNodes"] == {"virtual-node-b": "base at module capacity"}


async def test_burst_spreads_because_the_ranking_sees_the_in_flight_binding(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=10), vnode("virtual-node-b", max_modules=10))
    client = await make_client(Extender(view, binder=FakeBinder(), settings=Settings(burst_wait=10)))
    both = ["virtual-node-a", "virtual-node-b"]
    _, first = await post(client, "/filter", {"Pod": module_pod("m1", bizs=("b1",)), "NodeNames": both})
    assert sorted(first["NodeNames"]) == both  # equal bases: kube-scheduler's own scores choose
    second = asyncio.ensure_future(post(client, "/filter", {"Pod": module_pod("m2", bizs=("b2",)), "NodeNames": both}))
    await asyncio.wait({second}, timeout=0.2)
    await post(client, "/bind", {"PodName": "m1", "PodNamespace": "default", "PodUID": "u", "Node": "virtual-node-a"})
    _, passed = await second
    assert passed["NodeNames"] == ["virtual-node-b"]
    # A configuration that still registers prioritize gets scores that agree.
    _, scores = await post(client, "/prioritize", {"Pod": module_pod("m2", bizs=("b2",)), "NodeNames": both})
    assert scores == [{"Host": "virtual-node-a", "Score": 0}, {"Host": "virtual-node-b", "Score": 10}]


async def test_no_wait_when_the_in_flight_pod_cannot_land_on_these_bases(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a"), vnode("virtual-node-b"))
    client = await make_client(Extender(view, binder=FakeBinder(), settings=Settings(burst_wait=30)))
    await post(client, "/filter", {"Pod": module_pod("m1", bizs=("b1",)), "NodeNames": ["virtual-node-a"]})
    _, result = await asyncio.wait_for(
        post(client, "/filter", {"Pod": module_pod("m2", bizs=("b2",)), "NodeNames": ["virtual-node-b"]}), 5)
    assert result["NodeNames"] == ["virtual-node-b"]


async def test_a_vnode_the_watch_has_not_delivered_yet_is_waited_for(make_client: Any) -> None:
    view = synced_view()
    client = await make_client(Extender(view, settings=Settings(node_wait=10)))
    pending = asyncio.ensure_future(post(client, "/filter", {"Pod": module_pod("m"), "NodeNames": ["virtual-node-new"]}))
    done, _ = await asyncio.wait({pending}, timeout=0.2)
    assert not done
    view.upsert_node(vnode("virtual-node-new"))
    _, result = await pending
    assert result["NodeNames"] == ["virtual-node-new"]


async def test_a_peer_rolling_update_places_each_surge_pod_on_a_base_holding_the_old_version(
    make_client: Any
) -> None:
    """The seed's sample at 3 replicas on 3 full bases, then replaced: maxSurge 1, maxUnavailable 0.
    Each new-version Pod lands where the old version runs (SOFAArk upgrades in place), never beside
    its own version, never over another workload's module; rolling back goes the same way."""
    names = [f"virtual-node-{i}" for i in range(3)]
    view = synced_view(*(vnode(n, max_modules=1) for n in names))
    for i, node in enumerate(names):
        view.observe_pod(replica(f"old-{i}", "sample", "6798ff7d54", "0.0.1", node=node, phase="Running"))
    binder = FakeBinder()
    client = await make_client(Extender(view, binder=binder))

    async def schedule(pod: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        _, result = await post(client, "/filter", {"Pod": pod, "NodeNames": names})
        passing = result["NodeNames"]
        if passing:
            # Whichever the scheduler's own scores pick: every base passed is one the extender ranks first.
            meta = pod["metadata"]
            _, bound = await post(client, "/bind", {"PodName": meta["name"], "PodNamespace": meta["namespace"],
                                                    "PodUID": meta["uid"], "Node": sorted(passing)[-1]})
            assert bound == {"Error": ""}
        return passing, result["FailedAndUnresolvableNodes"]

    passing, failed = await schedule(replica("new-0", "sample", "5d8f7c9b4", "0.0.2"))
    assert sorted(passing) == names and failed == {}
    (first,) = [node for _, node in binder.bound]
    # The next surge Pod (after the first old replica went): not beside its own version.
    view.forget_pod(replica("old-" + first[-1], "sample", "6798ff7d54", "0.0.1"))
    passing, failed = await schedule(replica("new-1", "sample", "5d8f7c9b4", "0.0.2"))
    assert sorted(passing) == sorted(set(names) - {first}) and failed == {first: "base already has module biz1"}

    # Another workload's biz1 (another namespace, same Deployment name) gets no base at all.
    intruder = replica("b-0", "sample", "5d8f7c9b4", "0.0.3", namespace="team-b")
    _, failed = await schedule(intruder)
    assert failed == dict.fromkeys(names, "base already has module biz1")

    # `rollout undo`: the old ReplicaSet's Pods come back onto bases running the new version.
    second = binder.bound[1][1]
    view.forget_pod(replica("old-" + second[-1], "sample", "6798ff7d54", "0.0.1"))
    passing, failed = await schedule(replica("old-9", "sample", "6798ff7d54", "0.0.1"))
    assert sorted(passing) == sorted({first, second}) and set(failed) == set(names) - {first, second}


async def test_bind_refuses_another_workloads_pod_onto_a_base_holding_the_module(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=5))
    binder = FakeBinder()
    client = await make_client(Extender(view, binder=binder))
    ours = replica("new", "sample", "5d8f7c9b4", "0.0.2")
    theirs = replica("b", "other", "5d8f7c9b4", "0.0.2")
    for pod in (ours, theirs):  # both filtered before either is bound: the scheduler races
        _, result = await post(client, "/filter", {"Pod": pod, "NodeNames": ["virtual-node-a"]})
        assert result["NodeNames"] == ["virtual-node-a"]
    _, first = await post(client, "/bind", {"PodName": "new", "PodNamespace": "default", "PodUID": "u1",
                                            "Node": "virtual-node-a"})
    _, second = await post(client, "/bind", {"PodName": "b", "PodNamespace": "default", "PodUID": "u2",
                                             "Node": "virtual-node-a"})
    assert first == {"Error": ""} and "base already has module biz1" in second["Error"]
    assert binder.bound == [("default/new", "virtual-node-a")]


async def test_health_endpoints(make_client: Any) -> None:
    view = ClusterView()
    client = await make_client(Extender(view))
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    view.synced = True
    assert (await client.get("/readyz")).status == 200


# --- the leader: one base passed, counted at once (the shipped registration has no bindVerb) -----

def leading(view: ClusterView, **kwargs: Any) -> Extender:
    return Extender(view, reserves=lambda: True, **kwargs)


async def test_a_burst_at_the_leader_never_overbooks_and_never_waits(make_client: Any) -> None:
    """kube-scheduler filters Pod N+1 before Pod N's binding is visible anywhere: the leader has
    already counted N on the one base it passed, so N+1 goes elsewhere at once."""
    both = ["virtual-node-a", "virtual-node-b"]
    view = synced_view(*(vnode(n, max_modules=1) for n in both))
    client = await make_client(leading(view, settings=Settings(burst_wait=30)))
    passed: list[str] = []
    for i in range(2):
        _, result = await asyncio.wait_for(
            post(client, "/filter", {"Pod": module_pod(f"m{i}", bizs=(f"b{i}",)), "NodeNames": both}), 5)
        (one,) = result["NodeNames"]
        passed.append(one)
    assert sorted(passed) == both
    _, third = await asyncio.wait_for(
        post(client, "/filter", {"Pod": module_pod("m2", bizs=("b2",)), "NodeNames": both}), 5)
    assert third["NodeNames"] == []
    assert third["FailedAndUnresolvableNodes"] == dict.fromkeys(both, "base at module capacity")


async def test_the_leader_spreads_replicas_over_equal_bases(make_client: Any) -> None:
    names = [f"virtual-node-{i}" for i in range(3)]
    view = synced_view(*(vnode(n, max_modules=10) for n in names))
    client = await make_client(leading(view))
    placed = []
    for i in range(6):
        _, result = await post(client, "/filter", {"Pod": module_pod(f"m{i}", bizs=(f"b{i}",)), "NodeNames": names})
        placed.extend(result["NodeNames"])
    assert len(placed) == 6 and all(placed.count(n) == 2 for n in names)


async def test_a_pod_filtered_again_is_not_in_its_own_way(make_client: Any) -> None:
    """Its binding failed (or it was deleted and recreated under the same name): the retry must not
    see its earlier count as a full base or as its own module already there."""
    view = synced_view(vnode("virtual-node-a", max_modules=1))
    client = await make_client(leading(view))
    for _ in range(3):
        _, result = await post(client, "/filter", {"Pod": module_pod("m1"), "NodeNames": ["virtual-node-a"]})
        assert result["NodeNames"] == ["virtual-node-a"] and result["FailedAndUnresolvableNodes"] == {}
    usage = view.usage.get("virtual-node-a")
    assert usage is not None and usage.modules == 1


async def test_the_watch_confirms_the_leaders_count_without_doubling_it(make_client: Any) -> None:
    view = synced_view(vnode("virtual-node-a", max_modules=2))
    client = await make_client(leading(view))
    await post(client, "/filter", {"Pod": module_pod("m1"), "NodeNames": ["virtual-node-a"]})
    view.observe_pod(module_pod("m1", node="virtual-node-a", phase="Pending"))
    usage = view.usage.get("virtual-node-a")
    assert usage is not None and usage.modules == 1
    placed = view.usage.placed("default/m1")
    assert placed is not None and placed.assumed_at is None  # confirmed: no longer subject to the TTL
    view.forget_pod(module_pod("m1", node="virtual-node-a"))
    assert view.usage.get("virtual-node-a") is None


async def test_a_leader_that_is_also_given_bind_checks_and_binds(make_client: Any) -> None:
    """A configuration that keeps bindVerb: the bind finds the Pod counted where it was passed."""
    view = synced_view(vnode("virtual-node-a", max_modules=1))
    binder = FakeBinder()
    binder.pods["default/m1"] = module_pod("m1")
    client = await make_client(leading(view, binder=binder))
    await post(client, "/filter", {"Pod": module_pod("m1"), "NodeNames": ["virtual-node-a"]})
    _, bound = await post(client, "/bind", {"PodName": "m1", "PodNamespace": "default", "PodUID": "u",
                                            "Node": "virtual-node-a"})
    assert bound == {"Error": ""} and binder.bound == [("default/m1", "virtual-node-a")]
