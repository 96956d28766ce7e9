"""Filter and prioritize decisions, over the Nodes and Pods the scheduler would send."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender import policy
from extender.state import ANNOTATION_NODE_MODULES, BaseInfo, ModulePod, Usage
from extender.view import ClusterView
from koupleless import keys
from tests.unit.extender.samples import module_pod, plain_pod, real_node, replica, vnode


def run_filter(pod: dict, nodes: list[dict], bound: list[dict] = ()) -> policy.FilterOutcome:  # type: ignore[assignment]
    usage = Usage()
    for p in bound:
        usage.observe(ModulePod.from_pod(p))
    bases = [(n["metadata"]["name"], BaseInfo.from_node(n)) for n in nodes]
    return policy.filter_pod(ModulePod.from_pod(pod), bases, usage.get)


def test_only_virtual_nodes_that_match_stack_name_and_version_pass() -> None:
    nodes = [
        vnode("virtual-node-a"),
        vnode("virtual-node-b", version="1.0.0"),
        vnode("virtual-node-c", base="other-base"),
        vnode("virtual-node-d", stack="go"),
        real_node("worker-1"),
    ]
    out = run_filter(module_pod("m"), nodes)
    assert out.passing == ["virtual-node-a"]
    assert out.failed == {
        "virtual-node-b": "base version not in [1.1.1]",
        "virtual-node-c": "base name not in [base]",
        "virtual-node-d": "base stack not in [java]",
        "worker-1": "not a virtual node",
    }


def test_reasons_take_values_from_the_pod_so_the_scheduler_folds_them_into_one_line() -> None:
    nodes = [vnode(f"virtual-node-{i}", version=f"1.0.{i}") for i in range(5)]
    out = run_filter(module_pod("m", versions=("2.0.0", "1.9.9")), nodes)
    assert out.passing == []
    assert policy.fit_error_message(5, out.failed) == "0/5 nodes are available: 5 base version not in [1.9.9, 2.0.0]."


def test_a_base_that_is_not_ready_is_out() -> None:
    out = run_filter(module_pod("m"), [vnode("virtual-node-a", ready=False), vnode("virtual-node-b")])
    assert out.passing == ["virtual-node-b"]
    assert out.failed == {"virtual-node-a": "base not Ready"}


def test_capacity_counts_modules_of_pods_bound_to_the_base() -> None:
    nodes = [vnode("virtual-node-a", max_modules=2), vnode("virtual-node-b", max_modules=2)]
    bound = [module_pod("p1", bizs=("x1",), node="virtual-node-a"), module_pod("p2", bizs=("x2",), node="virtual-node-a"),
             module_pod("p3", bizs=("x3",), node="virtual-node-b")]
    out = run_filter(module_pod("m"), nodes, bound)
    assert out.passing == ["virtual-node-b"]
    assert out.failed == {"virtual-node-a": "base at module capacity"}
    # A Pod carrying two modules needs two free slots.
    out = run_filter(module_pod("m2", bizs=("y1", "y2")), nodes, bound)
    assert out.failed == {"virtual-node-a": "base at module capacity", "virtual-node-b": "base at module capacity"}


def test_finished_pods_free_their_slot() -> None:
    bound = [module_pod("p1", bizs=("x1",), node="virtual-node-a", phase="Succeeded"),
             module_pod("p2", bizs=("x2",), node="virtual-node-a", phase="Failed")]
    out = run_filter(module_pod("m"), [vnode("virtual-node-a", max_modules=1)], bound)
    assert out.passing == ["virtual-node-a"]


def test_a_base_already_holding_the_biz_name_is_out() -> None:
    nodes = [vnode("virtual-node-a", max_modules=10), vnode("virtual-node-b", max_modules=10)]
    bound = [module_pod("other-replica", bizs=("biz1",), node="virtual-node-a")]
    out = run_filter(module_pod("m", bizs=("biz0", "biz1")), nodes, bound)
    assert out.passing == ["virtual-node-b"]
    assert out.failed == {"virtual-node-a": "base already has module biz1"}


# --- a workload's next version replaces its own module in place (SOFAArk installs it beside the old one) ---

OLD, NEW = "0.0.1-SNAPSHOT", "0.0.2"


def three_full_bases_running_the_seed(max_modules: int = 1) -> tuple[list[dict], list[dict]]:
    """The seed's sample scaled to 3 on 3 bases, each base full."""
    nodes = [vnode(f"virtual-node-{i}", max_modules=max_modules) for i in range(3)]
    bound = [replica(f"old-{i}", "test-module-deployment", "6798ff7d54", OLD, node=f"virtual-node-{i}",
                     phase="Running") for i in range(3)]
    return nodes, bound


def test_the_next_version_of_the_same_deployment_passes_onto_a_full_base_holding_the_old_one() -> None:
    nodes, bound = three_full_bases_running_the_seed()
    surge = replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW)
    out = run_filter(surge, nodes, bound)
    # Every base holds biz1 for an older ReplicaSet of the same Deployment, and is at capacity:
    # the upgrade takes no slot beyond the old version's.
    assert sorted(out.passing) == ["virtual-node-0", "virtual-node-1", "virtual-node-2"] and out.failed == {}


def test_a_rollback_to_the_older_version_passes_onto_a_base_holding_the_newer_one() -> None:
    nodes = [vnode("virtual-node-0", max_modules=1)]
    bound = [replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW, node="virtual-node-0", phase="Running")]
    back = replica("old-9", "test-module-deployment", "6798ff7d54", OLD)
    assert run_filter(back, nodes, bound).passing == ["virtual-node-0"]


def test_another_workload_holding_the_biz_name_blocks_the_base_whatever_the_version() -> None:
    nodes, bound = three_full_bases_running_the_seed(max_modules=5)
    for intruder in (replica("b", "team-b", "7f7f7f7f7f", NEW, namespace="default"),
                     replica("b", "test-module-deployment", "7f7f7f7f7f", NEW, namespace="team-b"),
                     module_pod("b", biz_version=NEW, owner="StatefulSet/test-module-deployment"),
                     module_pod("bare", biz_version=NEW)):  # no controller: never an upgrade
        out = run_filter(intruder, nodes, bound)
        assert out.passing == [], intruder["metadata"]
        assert set(out.failed.values()) == {"base already has module biz1"}


def test_the_same_version_is_never_put_beside_itself() -> None:
    # Two replicas of one ReplicaSet, and a newer ReplicaSet's Pod where that version already runs
    # (a base mid-upgrade holds both versions; the second surge Pod must go elsewhere).
    nodes, bound = three_full_bases_running_the_seed(max_modules=5)
    bound.append(replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW, node="virtual-node-0"))
    out = run_filter(replica("old-3", "test-module-deployment", "6798ff7d54", OLD), nodes, bound)
    assert out.passing == [] and set(out.failed.values()) == {"base already has module biz1"}
    out = run_filter(replica("new-1", "test-module-deployment", "5d8f7c9b4", NEW), nodes, bound)
    assert sorted(out.passing) == ["virtual-node-1", "virtual-node-2"]
    assert out.failed == {"virtual-node-0": "base already has module biz1"}


def test_a_base_mid_upgrade_takes_one_slot_for_both_versions() -> None:
    nodes = [vnode("virtual-node-0", max_modules=2)]
    bound = [replica("old-0", "d", "aaaaaaaaaa", OLD, node="virtual-node-0", phase="Running"),
             replica("new-0", "d", "bbbbbbbbbb", NEW, node="virtual-node-0")]
    assert run_filter(module_pod("other", bizs=("biz2",)), nodes, bound).passing == ["virtual-node-0"]
    bound.append(module_pod("third", bizs=("biz3",), node="virtual-node-0"))
    out = run_filter(module_pod("other", bizs=("biz2",)), nodes, bound)
    assert out.failed == {"virtual-node-0": "base at module capacity"}


def test_a_pod_bringing_an_upgrade_and_a_new_module_needs_one_free_slot() -> None:
    nodes = [vnode("virtual-node-0", max_modules=2), vnode("virtual-node-1", max_modules=1)]
    bound = [replica(f"old-{i}", "d", "aaaaaaaaaa", OLD, node=f"virtual-node-{i}", phase="Running")
             for i in range(2)]
    pod = replica("new", "d", "bbbbbbbbbb", NEW, bizs=("biz1", "biz2"))
    out = run_filter(pod, nodes, bound)
    assert out.passing == ["virtual-node-0"] and out.failed == {"virtual-node-1": "base at module capacity"}


def test_other_workloads_of_daemonsets_and_statefulsets_upgrade_by_their_controller() -> None:
    nodes = [vnode("virtual-node-0", max_modules=1)]
    for owner in ("DaemonSet/agent", "StatefulSet/db"):
        bound = [module_pod("old", biz_version=OLD, owner=owner, node="virtual-node-0", phase="Running")]
        assert run_filter(module_pod("new", biz_version=NEW, owner=owner), nodes, bound).passing == ["virtual-node-0"]


def test_a_base_holding_the_module_for_its_workload_and_another_is_out() -> None:
    usage = Usage()
    usage.observe(ModulePod.from_pod(replica("old", "d", "aaaaaaaaaa", OLD, node="n")))
    usage.observe(ModulePod.from_pod(module_pod("stray", biz_version="9", node="n")))  # bound by hand
    pod = ModulePod.from_pod(replica("new", "d", "bbbbbbbbbb", NEW))
    assert pod.workload == ("default", "Deployment", "d")
    base = usage.get("n")
    assert base is not None and not base.replaces("biz1", pod.workload, NEW)
    assert usage.upgradable("biz1", pod.workload, NEW) == set()
    usage.forget("default/stray")
    assert usage.upgradable("biz1", pod.workload, NEW) == {"n"}
    assert usage.upgradable("biz1", pod.workload, OLD) == set()


def test_the_annotation_alone_never_allows_an_upgrade() -> None:
    base = BaseInfo.from_node(vnode("a", max_modules=5, annotations={ANNOTATION_NODE_MODULES: "biz1"}))
    usage = policy.annotated_usage(base)
    out = policy.filter_pod(ModulePod.from_pod(replica("new", "d", "bbbbbbbbbb", NEW)), [("a", base)],
                            lambda _name: usage)
    assert out.failed == {"a": "base already has module biz1"}


def test_prioritize_puts_a_base_without_the_module_before_an_in_place_upgrade() -> None:
    # Spare bases: the surge Pod goes where it adds a replica, not where it replaces one.
    nodes, bound = three_full_bases_running_the_seed(max_modules=5)
    nodes.append(vnode("virtual-node-spare", max_modules=5))
    bound += [module_pod(f"busy-{b}", bizs=(b,), node="virtual-node-spare") for b in ("x", "y", "z")]
    surge = replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW)
    for strategy in policy.STRATEGIES:
        got = scores(surge, nodes, bound, strategy)
        assert got["virtual-node-spare"] == policy.MAX_SCORE
        assert max(v for n, v in got.items() if n != "virtual-node-spare") < policy.MAX_SCORE


def test_prioritize_spreads_in_place_upgrades_like_any_placement_when_every_base_holds_the_module() -> None:
    nodes, bound = three_full_bases_running_the_seed(max_modules=5)
    bound.append(module_pod("busy", bizs=("x",), node="virtual-node-0"))
    got = scores(replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW), nodes, bound, "spread")
    assert got["virtual-node-1"] == got["virtual-node-2"] == policy.MAX_SCORE > got["virtual-node-0"]


def test_memory_headroom_where_both_pod_and_base_give_it() -> None:
    nodes = [vnode("virtual-node-a", memory="1Gi"), vnode("virtual-node-b", memory="256Mi"),
             vnode("virtual-node-c", memory=None)]
    bound = [module_pod("p1", bizs=("x",), node="virtual-node-a", memory="768Mi")]
    out = run_filter(module_pod("m", memory="512Mi"), nodes, bound)
    assert out.passing == ["virtual-node-c"]
    assert out.failed == {"virtual-node-a": "base memory below 512Mi requested",
                          "virtual-node-b": "base memory below 512Mi requested"}
    # No memory request: memory is no reason.
    assert run_filter(module_pod("n"), nodes, bound).passing == ["virtual-node-a", "virtual-node-b", "virtual-node-c"]


def test_non_module_pods_pass_through_untouched() -> None:
    nodes = [vnode("virtual-node-a", ready=False), real_node("worker-1")]
    out = run_filter(plain_pod("web"), nodes)
    assert out.passing == ["virtual-node-a", "worker-1"]
    assert out.failed == {}


def test_legacy_module_label_is_a_module_pod() -> None:
    out = run_filter(module_pod("m", legacy_label=True), [real_node("worker-1")])
    assert out.failed == {"worker-1": "not a virtual node"}


def test_other_affinity_terms_are_enforced_with_the_in_tree_wording() -> None:
    pod = module_pod("m", extra_expressions=[{"key": keys.LABEL_HOSTNAME, "operator": "NotIn",
                                              "values": ["virtual-node-a"]}])
    out = run_filter(pod, [vnode("virtual-node-a"), vnode("virtual-node-b")])
    assert out.passing == ["virtual-node-b"]
    assert out.failed == {"virtual-node-a": "node(s) didn't match Pod's node affinity/selector"}


def test_node_selector_is_enforced() -> None:
    pod = module_pod("m")
    pod["spec"]["nodeSelector"] = {keys.LABEL_HOSTNAME: "virtual-node-b"}
    out = run_filter(pod, [vnode("virtual-node-a"), vnode("virtual-node-b")])
    assert out.passing == ["virtual-node-b"]


def test_terms_are_ored_and_the_closest_term_names_the_reason() -> None:
    pod = module_pod("m")
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    terms.append({"matchExpressions": [{"key": keys.LABEL_BASE_NAME, "operator": "In", "values": ["base"]},
                                       {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": ["2.0.0"]}]})
    out = run_filter(pod, [vnode("virtual-node-a", version="2.0.0", stack="go"), vnode("virtual-node-b", version="3")])
    assert out.passing == ["virtual-node-a"]
    assert out.failed == {"virtual-node-b": "base version not in [1.1.1, 2.0.0]"}


def test_the_checks_are_reported_in_a_fixed_order() -> None:
    # Wrong version AND not Ready AND full: the placement mismatch is what the user must fix first.
    bound = [module_pod("p", bizs=("x",), node="virtual-node-a")]
    out = run_filter(module_pod("m"), [vnode("virtual-node-a", version="9", ready=False, max_modules=1)], bound)
    assert out.failed == {"virtual-node-a": "base version not in [1.1.1]"}


def test_worst_case_event_stays_under_one_kib() -> None:
    long_versions = tuple(f"1.{i}.{i}-SNAPSHOT-with-a-very-long-qualifier-{i:03d}" for i in range(40))
    pod = module_pod("m", bizs=("b" * 63, "c" * 63, "d" * 63), versions=long_versions, base="n" * 63,
                     stack="s" * 63, memory="512Mi")
    nodes = [vnode("virtual-node-wrong-stack", stack="go"), vnode("virtual-node-wrong-name", stack="s" * 63),
             vnode("virtual-node-wrong-version", stack="s" * 63, base="n" * 63, version="0"),
             real_node("worker-1")]
    ok = {"stack": "s" * 63, "base": "n" * 63, "version": long_versions[0]}
    nodes += [vnode("virtual-node-not-ready", ready=False, **ok), vnode("virtual-node-full", max_modules=0, **ok),
              vnode("virtual-node-small", memory="1Mi", max_modules=9, **ok)]
    nodes += [vnode(f"virtual-node-dup-{b}", max_modules=9, **ok) for b in "bcd"]
    bound = [module_pod(f"holder-{b}", bizs=(b * 63,), node=f"virtual-node-dup-{b}") for b in "bcd"]
    out = run_filter(pod, nodes, bound)
    assert set(out.kinds) == {"stack", "name", "version", "not_vnode", "not_ready", "capacity", "memory", "duplicate"}
    # Thousands of bases, every reason present, plus an in-tree reason and the preemption suffix.
    failed = {f"n{i}": reason for i, reason in enumerate(list(out.failed.values()) * 1000)}
    message = policy.fit_error_message(50000, failed) + (
        " preemption: 0/50000 nodes are available: 50000 Preemption is not helpful for scheduling.")
    assert len(message.encode()) < 1024, message


def test_values_text_bounds_long_lists() -> None:
    text = policy.values_text([f"v{i:03d}" for i in range(100)])
    assert text.startswith("[v000, v001") and text.endswith("more]") and len(text) < 120


def scores(pod: dict, nodes: list[dict], bound: list[dict], strategy: policy.Strategy) -> dict[str, int]:
    usage = Usage()
    for p in bound:
        usage.observe(ModulePod.from_pod(p))
    bases = {n["metadata"]["name"]: BaseInfo.from_node(n) for n in nodes}
    module = ModulePod.from_pod(pod)
    got = dict(policy.prioritize_pod(module, list(bases), bases.get, usage.get, strategy))
    # The app hands over the indexed holders of the Pod's bizNames: the same scores.
    indexed = policy.prioritize_pod(module, list(bases), bases.get, usage.get, strategy, usage.holding(module.biz_names))
    assert dict(indexed) == got
    return got


def test_spread_prefers_fewest_modules_then_most_free_memory() -> None:
    nodes = [vnode("a", max_modules=9, memory="4Gi"), vnode("b", max_modules=9, memory="8Gi"),
             vnode("c", max_modules=9, memory="8Gi")]
    bound = [module_pod("p1", bizs=("x",), node="a"), module_pod("p2", bizs=("y",), node="c")]
    got = scores(module_pod("m"), nodes, bound, "spread")
    assert got["b"] > got["c"] > got["a"]
    assert got["b"] == policy.MAX_SCORE and got["a"] == 0


def test_binpack_prefers_the_fullest_base() -> None:
    nodes = [vnode("a", max_modules=9), vnode("b", max_modules=9), vnode("c", max_modules=9)]
    bound = [module_pod("p1", bizs=("x",), node="a"), module_pod("p2", bizs=("y",), node="a"),
             module_pod("p3", bizs=("z",), node="c")]
    got = scores(module_pod("m"), nodes, bound, "binpack")
    assert got["a"] > got["c"] > got["b"]


def test_equal_bases_score_equally_and_scores_stay_in_range() -> None:
    nodes = [vnode(f"n{i}") for i in range(30)]
    bound = [module_pod(f"p{i}", bizs=(f"x{i}",), node=f"n{i % 7}") for i in range(20)]
    for strategy in policy.STRATEGIES:
        got = scores(module_pod("m"), nodes, bound, strategy)
        assert set(got.values()) <= set(range(policy.MAX_SCORE + 1))
        assert got["n10"] == got["n20"]  # both empty


def test_prioritize_gives_zero_to_unknown_nodes_and_non_module_pods() -> None:
    bases = {"a": BaseInfo.from_node(vnode("a"))}
    assert policy.prioritize_pod(ModulePod.from_pod(module_pod("m")), ["a", "x"], bases.get) == [("a", 10), ("x", 0)]
    assert policy.prioritize_pod(ModulePod.from_pod(plain_pod("w")), ["a"], bases.get) == [("a", 0)]


def test_provider_annotation_gives_counts_without_a_pod_watch() -> None:
    node = vnode("a", max_modules=2, annotations={ANNOTATION_NODE_MODULES: "biz7, biz8"})
    base = BaseInfo.from_node(node)
    usage = policy.annotated_usage(base)
    assert usage is not None and usage.modules == 2 and usage.biz_names == Counter({"biz7": 1, "biz8": 1})
    out = policy.filter_pod(ModulePod.from_pod(module_pod("m")), [("a", base)], lambda _name: usage)
    assert out.failed == {"a": "base at module capacity"}


@pytest.mark.parametrize("quantity", ["2", "2000m", "2e0"])
def test_module_capacity_reads_any_quantity_spelling(quantity: str) -> None:
    node = vnode("a")
    node["status"]["allocatable"][keys.RESOURCE_MODULE] = quantity
    assert BaseInfo.from_node(node).max_modules == 2


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterView, dict, list[str]]:
    view = ClusterView()
    n = draw(st.integers(0, 12))
    for i in range(n):
        view.upsert_node(vnode(f"v{i}", version=draw(st.sampled_from(["1.1.1", "2"])),
                               base=draw(st.sampled_from(["base", "other"])), ready=draw(st.booleans()),
                               max_modules=draw(st.none() | st.integers(0, 3)),
                               memory=draw(st.none() | st.sampled_from(["512Mi", "2Gi"]))))
    # Mostly one Deployment, mostly at another version than the Pod's: in-place upgrades are common.
    owners = st.sampled_from([None, "ReplicaSet/d", "ReplicaSet/d", "ReplicaSet/d", "ReplicaSet/e", "DaemonSet/d"])
    for j in range(draw(st.integers(0, 15))):
        view.observe_pod(module_pod(f"p{j}", bizs=tuple(draw(st.lists(st.sampled_from(["b1", "b2", "b3"]),
                                                                      min_size=1, max_size=2, unique=True))),
                                    node=f"v{draw(st.integers(0, max(n - 1, 0)))}",
                                    memory=draw(st.none() | st.just("256Mi")), phase="Running",
                                    owner=draw(owners), template_hash=draw(st.sampled_from(["h1", "h2"])),
                                    biz_version=draw(st.sampled_from(["1", "1", "2"]))))
    pod = module_pod("m", bizs=tuple(draw(st.lists(st.sampled_from(["b1", "b2", "b4"]), min_size=1, max_size=3,
                                                   unique=True))),
                     versions=tuple(draw(st.lists(st.sampled_from(["1.1.1", "2", "3"]), min_size=1, max_size=2))),
                     memory=draw(st.none() | st.sampled_from(["256Mi", "1Gi"])),
                     owner=draw(owners), template_hash=draw(st.sampled_from(["h1", "h2"])),
                     biz_version=draw(st.sampled_from(["1", "2", "2"])))
    names = draw(st.lists(st.sampled_from([f"v{i}" for i in range(n + 2)] + ["worker"]), unique=True))
    return view, pod, names


def assert_indexed_answers_like_per_node(pod: ModulePod, names: list[str], view: ClusterView) -> None:
    fast = policy.filter_indexed(pod, names, view)
    assert fast is not None
    slow = policy.filter_pod(pod, [(n, view.bases.get(n)) for n in names], view.usage_of)
    assert sorted(fast.passing) == sorted(slow.passing)
    assert fast.failed == slow.failed
    assert fast.kinds == slow.kinds


@settings(max_examples=400, deadline=None)
@given(case=clusters())
def test_the_indexed_filter_answers_exactly_like_the_per_node_filter(case: tuple[ClusterView, dict, list[str]]) -> None:
    view, raw_pod, names = case
    pod = ModulePod.from_pod(raw_pod)
    assert_indexed_answers_like_per_node(pod, names, view)


@st.composite
def rollouts(draw: st.DrawFn) -> tuple[ClusterView, dict, list[str]]:
    """Bases that all match, mid-rollout: Pods of a few workloads at a few versions, some bases
    holding two versions of one workload, capacities from over-full to roomy."""
    view = ClusterView()
    n = draw(st.integers(1, 6))
    for i in range(n):
        view.upsert_node(vnode(f"v{i}", max_modules=draw(st.none() | st.integers(0, 3))))
    # Mostly one Deployment: most bases hold its module, at the Pod's version or another.
    workloads = st.sampled_from([None, "ReplicaSet/d", "ReplicaSet/d", "ReplicaSet/d", "ReplicaSet/e", "StatefulSet/d"])
    for j in range(draw(st.integers(0, 12))):
        view.observe_pod(module_pod(f"p{j}", bizs=tuple(draw(st.lists(st.sampled_from(["biz1", "biz2"]), min_size=1,
                                                                      max_size=2, unique=True))),
                                    node=f"v{draw(st.integers(0, n - 1))}", phase="Running", owner=draw(workloads),
                                    template_hash=draw(st.sampled_from(["h1", "h2"])),
                                    biz_version=draw(st.sampled_from(["1", "1", "2"]))))
    pod = module_pod("m", bizs=tuple(draw(st.lists(st.sampled_from(["biz1", "biz2", "biz3"]), min_size=1, max_size=3,
                                                   unique=True))),
                     owner=draw(workloads), template_hash=draw(st.sampled_from(["h1", "h2"])),
                     biz_version=draw(st.sampled_from(["1", "2", "2"])))
    names = draw(st.lists(st.sampled_from([f"v{i}" for i in range(n)]), unique=True, min_size=1))
    return view, pod, names


@settings(max_examples=400, deadline=None)
@given(case=rollouts())
def test_in_place_upgrades_get_the_same_answer_from_the_indexed_and_the_per_node_filter(
    case: tuple[ClusterView, dict, list[str]]
) -> None:
    view, raw_pod, names = case
    assert_indexed_answers_like_per_node(ModulePod.from_pod(raw_pod), names, view)


def assert_best_is_what_prioritize_scores_highest(pod: ModulePod, names: list[str], view: ClusterView) -> None:
    passing = policy.filter_pod(pod, [(n, view.bases.get(n)) for n in names], view.usage_of).passing
    for strategy in policy.STRATEGIES:
        best = policy.best_bases(pod, passing, view.bases.get, view.usage_of, strategy)
        indexed = policy.best_bases(pod, passing, view.bases.get, view.usage_of, strategy,
                                    view.usage.holding(pod.biz_names))
        assert best == indexed
        assert set(best) <= set(passing) and bool(best) == bool(passing)
        if len(passing) > 1:
            scores = dict(policy.prioritize_pod(pod, passing, view.bases.get, view.usage_of, strategy))
            top = max(scores.values())
            assert sorted(best) == sorted(n for n, s in scores.items() if s == top), strategy


@settings(max_examples=400, deadline=None)
@given(case=clusters())
def test_the_filter_passes_exactly_the_bases_prioritize_scores_highest(case: tuple[ClusterView, dict, list[str]]) -> None:
    view, raw_pod, names = case
    assert_best_is_what_prioritize_scores_highest(ModulePod.from_pod(raw_pod), names, view)


@settings(max_examples=300, deadline=None)
@given(case=rollouts())
def test_mid_rollout_the_filter_passes_exactly_the_bases_prioritize_scores_highest(
    case: tuple[ClusterView, dict, list[str]]
) -> None:
    view, raw_pod, names = case
    assert_best_is_what_prioritize_scores_highest(ModulePod.from_pod(raw_pod), names, view)


def test_best_bases_keeps_ties_and_puts_in_place_upgrades_last() -> None:
    nodes, bound = three_full_bases_running_the_seed(max_modules=5)
    nodes += [vnode("virtual-node-spare", max_modules=5), vnode("virtual-node-spare-2", max_modules=5)]
    view = ClusterView()
    for node in nodes:
        view.upsert_node(node)
    for raw in bound:
        view.observe_pod(raw)
    surge = ModulePod.from_pod(replica("new-0", "test-module-deployment", "5d8f7c9b4", NEW))
    passing = [n["metadata"]["name"] for n in nodes]
    for strategy in policy.STRATEGIES:
        assert sorted(policy.best_bases(surge, passing, view.bases.get, view.usage_of, strategy)) == [
            "virtual-node-spare", "virtual-node-spare-2"]
    # Only in-place bases left: they are all there is, ranked among themselves.
    assert sorted(policy.best_bases(surge, passing[:3], view.bases.get, view.usage_of)) == sorted(passing[:3])


def test_placement_on_other_labels_takes_the_per_node_path() -> None:
    view = ClusterView()
    pod = ModulePod.from_pod(module_pod("m", extra_expressions=[
        {"key": keys.LABEL_HOSTNAME, "operator": "In", "values": ["a"]}]))
    assert policy.filter_indexed(pod, ["a"], view) is None


@settings(max_examples=300, deadline=None)
@given(case=clusters(), moves=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["1.1.1", "2", "3"]),
                                                 st.booleans()), max_size=4), data=st.data())
def test_a_request_naming_every_base_gets_the_per_node_answer_across_node_changes(
    case: tuple[ClusterView, dict, list[str]], moves: list[tuple[int, str, bool]], data: st.DataObject
) -> None:
    """The scheduler usually names every base, which takes the whole-group path and its reused
    answers; Nodes that change version, come or go in between must never leave a stale answer."""
    view, raw_pod, _ = case
    pod = ModulePod.from_pod(raw_pod)
    for index, version, remove in [(0, "1.1.1", False), *moves]:
        name = f"v{index}"
        if remove:
            view.remove_node(vnode(name))
        else:
            view.upsert_node(vnode(name, version=version))
        names = data.draw(st.permutations(sorted(view.bases)))
        assert_indexed_answers_like_per_node(pod, names, view)
