"""The leader's Pod label, which the extender's Service selects: on the leader's Pod only, moved by
a new leader, taken off on shutdown, and retried through API errors. Pods are kept in memory with
the API server's merge-patch and resourceVersion rules; tests/e2e/extender/test_failover.py runs
the same code against the real API server."""

from __future__ import annotations

import copy
from typing import Any

from koupleless import keys
from koupleless.kube import ApiError
from koupleless.kube.client import pod_path
from koupleless.kube.leaderelection import LeaderPodLabel
from tests.helpers import async_wait_until

NS = "module-controller"
ROLE = keys.LABEL_EXTENDER_ROLE


class PodStore:
    def __init__(self, *names: str) -> None:
        self.version = 0
        self.pods: dict[str, dict[str, Any]] = {}
        for name in names:
            self.pods[name] = {"metadata": {"name": name, "namespace": NS, "labels": {}}}
            self._bump(name)

    def _bump(self, name: str) -> None:
        self.version += 1
        self.pods[name]["metadata"]["resourceVersion"] = str(self.version)

    def set_label(self, name: str, value: str | None) -> None:
        labels = self.pods[name]["metadata"]["labels"]
        if value is None:
            labels.pop(ROLE, None)
        else:
            labels[ROLE] = value
        self._bump(name)

    def leaders(self) -> set[str]:
        return {n for n, p in self.pods.items() if p["metadata"]["labels"].get(ROLE) == keys.EXTENDER_ROLE_LEADER}


class Connection:
    """One replica's client; `failing` makes every call fail as an unreachable API server does."""

    def __init__(self, store: PodStore) -> None:
        self.store = store
        self.failing = False
        self.refused = 0
        self.calls: list[tuple[str, str]] = []

    def _check(self) -> None:
        if self.failing:
            self.refused += 1
            raise ApiError(0, "ConnectionError", "connection refused")

    async def list(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        self._check()
        assert path == pod_path(NS)
        key, value = params["labelSelector"].split("=")
        items = [copy.deepcopy(p) for p in self.store.pods.values() if p["metadata"]["labels"].get(key) == value]
        self.calls.append(("list", params["labelSelector"]))
        return {"items": items}

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        name = path.rsplit("/", 1)[1]
        assert path == pod_path(NS, name)
        self.calls.append(("patch", name))
        if name not in self.store.pods:
            raise ApiError(404, "NotFound", f"pods {name!r} not found")
        metadata = body["metadata"]
        pod = self.store.pods[name]
        if "resourceVersion" in metadata and metadata["resourceVersion"] != pod["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        for key, value in metadata["labels"].items():
            assert key == ROLE
            self.store.set_label(name, value)
        return copy.deepcopy(pod)


def label_for(link: Connection, pod: str) -> LeaderPodLabel:
    return LeaderPodLabel(link, NS, pod, ROLE, keys.EXTENDER_ROLE_LEADER,  # type: ignore[arg-type]
                          resync=0.2, retry_delay=0.02, max_retry_delay=0.1)


async def _leaders_are(store: PodStore, expected: set[str]) -> bool:
    return store.leaders() == expected


async def test_a_new_leader_labels_its_pod_and_takes_the_label_off_a_killed_leader() -> None:
    store = PodStore("extender-a", "extender-b", "unrelated")
    store.set_label("extender-a", keys.EXTENDER_ROLE_LEADER)  # a leader that was killed with its label on
    label = label_for(Connection(store), "extender-b")
    label.start()
    try:
        # Not leading: nothing of ours is labelled, and the dead leader's label is not ours to remove.
        await async_wait_until(lambda: _true(label.labelled is False), timeout=5, what="the first round")
        assert store.leaders() == {"extender-a"}
        label.set_leading(True)
        await async_wait_until(lambda: _leaders_are(store, {"extender-b"}), timeout=5, what="the label to move")
        assert store.pods["unrelated"]["metadata"]["labels"] == {}
    finally:
        await label.stop()
    assert store.leaders() == set()


async def test_a_restarted_container_takes_the_label_off_its_own_pod_before_it_leads() -> None:
    store = PodStore("extender-a")
    store.set_label("extender-a", keys.EXTENDER_ROLE_LEADER)
    label = label_for(Connection(store), "extender-a")
    label.start()
    try:
        await async_wait_until(lambda: _leaders_are(store, set()), timeout=5, what="the stale label to go")
    finally:
        await label.stop()


async def test_the_latest_wish_wins_after_api_errors() -> None:
    store = PodStore("extender-a", "extender-b")
    link = Connection(store)
    label = label_for(link, "extender-a")
    label.start()
    try:
        await async_wait_until(lambda: _true(label.labelled is False), timeout=5, what="the first round")
        link.failing = True
        label.set_leading(True)
        label.set_leading(False)
        label.set_leading(True)
        await async_wait_until(lambda: _true(link.refused >= 2), timeout=5, what="a failed try and its retry")
        assert store.leaders() == set()
        link.failing = False
        await async_wait_until(lambda: _leaders_are(store, {"extender-a"}), timeout=5, what="the retried label")
        label.set_leading(False)
        await async_wait_until(lambda: _leaders_are(store, set()), timeout=5, what="the label to come off")
    finally:
        await label.stop()


async def test_while_leading_a_label_a_former_leader_wrote_late_is_removed() -> None:
    store = PodStore("extender-a", "extender-b")
    label = label_for(Connection(store), "extender-a")
    label.start()
    label.set_leading(True)
    try:
        await async_wait_until(lambda: _leaders_are(store, {"extender-a"}), timeout=5, what="the label")
        store.set_label("extender-b", keys.EXTENDER_ROLE_LEADER)
        await async_wait_until(lambda: _leaders_are(store, {"extender-a"}), timeout=5, what="the next look")
    finally:
        await label.stop()
    assert store.leaders() == set()


async def test_stopping_when_the_pod_is_already_gone_is_quick_and_quiet() -> None:
    store = PodStore("extender-a")
    link = Connection(store)
    label = label_for(link, "extender-a")
    label.start()
    label.set_leading(True)
    await async_wait_until(lambda: _leaders_are(store, {"extender-a"}), timeout=5, what="the label")
    del store.pods["extender-a"]
    await label.stop(timeout=5)
    assert label.labelled is False
    assert link.calls[-1] == ("patch", "extender-a")


async def _true(value: bool) -> bool:
    return value
