"""Which bases can take a module Pod, why the others cannot, and which of the fitting ones is best.

Pure functions over summaries (`BaseInfo`, `BaseUsage`, `ModulePod`): the HTTP layer and the watch
cache feed them, the unit tests call them directly.

Reasons are what `kubectl describe pod` shows after the scheduler counts them
(`0/5 nodes are available: 3 base version not in [1.1.1], 2 base at module capacity.`), so each
is a fixed phrase filled only with values from the Pod — never from the Node, or every Node would
get its own line — and short enough that the whole event stays under the 1 KiB the event keeps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Literal

from extender.quantity import format_bytes
from extender.state import BaseInfo, BaseUsage, ModulePod
from extender.view import SLOT_INDEX, ClusterView
from koupleless import keys
from koupleless.model import BaseRequirement

Strategy = Literal["spread", "binpack"]
STRATEGIES: tuple[Strategy, ...] = ("spread", "binpack")
MAX_SCORE = 10

REASON_NOT_VNODE = "not a virtual node"
REASON_NOT_READY = "base not Ready"
REASON_CAPACITY = "base at module capacity"
#: Same words as the in-tree NodeAffinity plugin, for constraints on labels other than the base's.
REASON_AFFINITY = "node(s) didn't match Pod's node affinity/selector"

#: Stable kinds, the `reason` label of the rejection metric.
KIND_NOT_VNODE = "not_vnode"
KIND_NOT_READY = "not_ready"
KIND_AFFINITY = "affinity"
KIND_DUPLICATE = "duplicate"
KIND_CAPACITY = "capacity"
KIND_MEMORY = "memory"
_LABEL_KINDS = {keys.LABEL_BASE_STACK: "stack", keys.LABEL_BASE_NAME: "name", keys.LABEL_BASE_VERSION: "version"}
#: Order in which a failing base label is named: the coarsest first.
_LABEL_ORDER = (keys.LABEL_BASE_STACK, keys.LABEL_BASE_NAME, keys.LABEL_BASE_VERSION)

_VALUES_BUDGET = 80
_VALUE_MAX = 40


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def values_text(values: Iterable[str]) -> str:
    """`[1.1.1, 1.1.2]`, cut to a bounded length with `+N more` so the event stays small."""
    ordered = sorted(values)
    shown: list[str] = []
    used = 0
    for value in ordered:
        value = _shorten(value, _VALUE_MAX)
        if shown and used + len(value) + 2 > _VALUES_BUDGET:
            break
        shown.append(value)
        used += len(value) + 2
    rest = len(ordered) - len(shown)
    return "[" + ", ".join(shown) + (f", +{rest} more" if rest else "") + "]"


def reason_label(key: str, values: Iterable[str]) -> str:
    return f"base {_LABEL_KINDS[key]} not in {values_text(values)}"


def reason_duplicate(biz_name: str) -> str:
    return f"base already has module {_shorten(biz_name, 63)}"


def reason_memory(requested: int) -> str:
    return f"base memory below {format_bytes(requested)} requested"


@dataclass(slots=True)
class FilterOutcome:
    passing: list[str] = field(default_factory=list)
    #: node name -> reason; every rejected node is here (an unlisted one would vanish from the event).
    failed: dict[str, str] = field(default_factory=dict)
    #: rejection kind -> nodes, for metrics and logs.
    kinds: Counter[str] = field(default_factory=Counter)


UsageOf = Callable[[str], "BaseUsage | None"]


def _no_usage(_: str) -> BaseUsage | None:
    return None


def _affinity_reason(pod: ModulePod, base: BaseInfo) -> tuple[str, str]:
    # Only terms that can match anything: an empty nodeSelectorTerm matches no Node, so it is no
    # "closest" term (the module model reads it as "any base", which is right for validation only).
    placement_terms = pod.placement.terms or ()
    terms = [t for t, p in zip(pod.base.terms, placement_terms, strict=False) if p.labels or p.names]
    missing = set(BaseRequirement(tuple(terms)).mismatches(base.labels))
    for key in _LABEL_ORDER:
        if key in missing:
            # The values are the Pod's, across every term, so all bases failing on this key share a line.
            allowed = frozenset().union(*(t.get(key, frozenset()) for t in terms))
            return reason_label(key, allowed), _LABEL_KINDS[key]
    return REASON_AFFINITY, KIND_AFFINITY


def filter_pod(
    pod: ModulePod,
    candidates: Iterable[tuple[str, BaseInfo | None]],
    usage_of: UsageOf = _no_usage,
) -> FilterOutcome:
    """Split `candidates` (name, what is known of the Node, None = not a known base) into passing
    and failed-with-reason. Non-module Pods pass everywhere.

    A base already holding one of the Pod's bizNames is out, unless every Pod holding it there is
    of the Pod's own workload at another version (`BaseUsage.replaces`): a rolling update or
    rollback, which SOFAArk does in place (the new version installed beside the old and activated;
    the provider admits exactly that). Such a module needs no free slot: it shares the old one's
    until the old Pod goes. Memory is counted for both, as kube-scheduler's own resource fit does
    (and the base holds both meanwhile)."""
    out = FilterOutcome()
    if not pod.is_module:
        out.passing = [name for name, _ in candidates]
        return out
    passing, failed, kinds = out.passing, out.failed, out.kinds
    placement = pod.placement
    unconstrained = placement.unconstrained
    need = pod.modules
    wanted = tuple(pod.versioned())
    of = pod.workload
    mem_request = pod.memory
    # Reasons for label mismatches depend only on the labels the Pod names: remember them.
    affinity_memo: dict[tuple[str | None, ...], tuple[str, str]] = {}
    memo_keys = tuple(sorted({k for t in pod.base.terms for k in t}))

    for name, base in candidates:
        if base is None or not base.is_vnode:
            failed[name] = REASON_NOT_VNODE
            kinds[KIND_NOT_VNODE] += 1
            continue
        if not unconstrained and not placement.matches(name, base.labels):
            memo_key = tuple(base.labels.get(k) for k in memo_keys)
            hit = affinity_memo.get(memo_key)
            if hit is None:
                hit = affinity_memo[memo_key] = _affinity_reason(pod, base)
            failed[name] = hit[0]
            kinds[hit[1]] += 1
            continue
        if not base.ready:
            failed[name] = REASON_NOT_READY
            kinds[KIND_NOT_READY] += 1
            continue
        usage = usage_of(name)
        #: the Pod's modules that replace their own previous version here (no new slot needed)
        upgrades = 0
        if usage is not None:
            held = usage.biz_names
            dup = None
            for biz, version in wanted:
                if held.get(biz, 0) > 0:
                    if not usage.replaces(biz, of, version):
                        dup = biz
                        break
                    upgrades += 1
            if dup is not None:
                failed[name] = reason_duplicate(dup)
                kinds[KIND_DUPLICATE] += 1
                continue
        used = usage.slots if usage is not None else 0
        if base.max_modules is not None and used + need - upgrades > base.max_modules:
            failed[name] = REASON_CAPACITY
            kinds[KIND_CAPACITY] += 1
            continue
        if mem_request is not None and base.memory is not None:
            free = base.memory - (usage.memory if usage is not None else 0)
            if free < mem_request:
                failed[name] = reason_memory(mem_request)
                kinds[KIND_MEMORY] += 1
                continue
        passing.append(name)
    return out


def _group_decidable(pod: ModulePod) -> bool:
    """Whether the Pod's node selection reads only the base labels, so one answer per (stack,
    name, version) group holds for every base in it."""
    placement = pod.placement
    if any(key not in _LABEL_KINDS for key, _ in placement.node_selector):
        return False
    for term in placement.terms or ():
        if term.names or any(req.key not in _LABEL_KINDS for req in term.labels):
            return False
    return True


def filter_indexed(pod: ModulePod, names: list[str], view: ClusterView,
                   candidates: set[str] | None = None, unknown: set[str] | None = None) -> FilterOutcome | None:
    """`filter_pod` for names mode, a set at a time over the view's indexes instead of a Python step
    per Node (5,000 candidates in about a millisecond). Same answers; None when the Pod's
    placement needs a per-Node look (other labels, Node names, many modules at once).
    `unknown`, when the caller has it, is `candidates` minus the known bases."""
    need = pod.modules
    if not pod.is_module or need >= SLOT_INDEX or not _group_decidable(pod):
        return None
    out = FilterOutcome()
    failed, kinds = out.failed, out.kinds
    if candidates is None:
        candidates = set(names)
    # A dict argument takes set.difference's fast path (membership by the strings' cached hashes).
    rejected = candidates.difference(view.bases) if unknown is None else set(unknown)
    if view.not_vnodes:
        rejected |= candidates & view.not_vnodes
    if rejected:
        failed.update(dict.fromkeys(rejected, REASON_NOT_VNODE))
        kinds[KIND_NOT_VNODE] += len(rejected)
    # The usual request names every base (the scheduler asks about all it may use): then each group
    # is taken whole, with no intersection and with its cached answer.
    every_base = not rejected and len(candidates) == len(view.bases)

    fit: set[str] = set()
    unconstrained = pod.placement.unconstrained
    for group, members in view.groups.items():
        if every_base:
            part = members
        else:
            part = candidates & members
            part -= rejected
        if not part:
            continue
        some = next(iter(part))
        base = view.bases[some]
        if unconstrained or pod.placement.matches(some, base.labels):
            fit |= part
            continue
        reason, kind = _affinity_reason(pod, base)
        failed.update(view.group_failures(group, reason) if every_base else dict.fromkeys(part, reason))
        kinds[kind] += len(part)

    def reject(nodes: set[str], reason: str, kind: str) -> None:
        if nodes:
            fit.difference_update(nodes)
            failed.update(dict.fromkeys(nodes, reason))
            kinds[kind] += len(nodes)

    reject(fit & view.not_ready, REASON_NOT_READY, KIND_NOT_READY)
    usage = view.usage
    #: base -> how many of the Pod's modules replace their own previous version there
    upgrades: Counter[str] = Counter()
    for biz, version in pod.versioned():
        holders = usage.biz_nodes.get(biz)
        if holders:
            held = fit & holders
            if held:
                in_place = held & usage.upgradable(biz, pod.workload, version)
                reject(held - in_place if in_place else held, reason_duplicate(biz), KIND_DUPLICATE)
                upgrades.update(in_place)
    for free in range(-1, need):
        too_full = view.slots.get(free)
        if too_full:
            full = fit & too_full
            if upgrades:
                # An in-place upgrade takes no slot beyond the old version's: such a base is too
                # full only if fewer than (need - upgrades) slots are free.
                full.difference_update(n for n, k in upgrades.items() if need - k <= free)
            reject(full, REASON_CAPACITY, KIND_CAPACITY)
    if pod.memory is not None:
        reject(fit.intersection(view.short_of_memory(pod.memory)), reason_memory(pod.memory), KIND_MEMORY)
    out.passing = list(fit)
    return out


#: Added to the module-count key of an in-place upgrade base: beyond any count, so it ranks last.
_IN_PLACE = 1 << 40


def _rank_scores(keyed: list[tuple[tuple[int, int, int], str]]) -> dict[str, int]:
    """Dense rank (best = lowest key) spread over 0..MAX_SCORE; equal keys get equal scores."""
    distinct = sorted({k for k, _ in keyed})
    if len(distinct) <= 1:
        return {name: MAX_SCORE for _, name in keyed}
    last = len(distinct) - 1
    score_of = {k: round(MAX_SCORE * (last - i) / last) for i, k in enumerate(distinct)}
    return {name: score_of[k] for k, name in keyed}


def _holding(pod: ModulePod, names: Iterable[str], usage_of: UsageOf) -> set[str]:
    """Bases among `names` holding any of the Pod's bizNames (a bizName is a key of `biz_names`
    only while held), for callers without the view's index."""
    wanted = frozenset(pod.biz_names)
    return {name for name in names if (usage := usage_of(name)) is not None and not wanted.isdisjoint(usage.biz_names)}


def prioritize_pod(
    pod: ModulePod,
    names: Iterable[str],
    base_of: Callable[[str], BaseInfo | None],
    usage_of: UsageOf = _no_usage,
    strategy: Strategy = "spread",
    holding: AbstractSet[str] | None = None,
) -> list[tuple[str, int]]:
    """Scores 0..10 per candidate. First every base where the Pod installs afresh, then those where
    it replaces its own workload's previous version in place; within each, spread: fewest modules
    first, then most free memory; binpack: most modules first, then least free memory. Unknown
    bases and non-module Pods score 0. `holding`: the bases holding any of the Pod's bizNames, when
    the caller has them indexed (else each base's usage is asked).

    The filter passes only the bases this ranks highest (`best_bases`), so a scheduler that still
    calls prioritize sees them all score 10."""
    names = list(names)
    if not pod.is_module:
        return [(name, 0) for name in names]
    spread = strategy == "spread"
    # A base that passed the filter and already holds one of the Pod's bizNames is an in-place
    # upgrade (or rollback) of the Pod's own workload there. It is the last resort, in both
    # strategies: SOFAArk deactivates the old version the moment the new one is active, so the old
    # replica stops serving at once, and the rollout's surge (a new replica serving *before* an old
    # one goes, what maxSurge asks for) happens only on a base without the module. At replicas =
    # bases there is no such base and every base upgrades in place, one per surge Pod; with spare
    # bases the rollout runs as on any cluster, and no base holds two versions of one module (nor
    # two copies' memory) meanwhile. Within each of the two groups the strategy decides.
    if holding is None:
        holding = _holding(pod, names, usage_of)
    # Integer keys: quantities are exact and can be huge; a float would round or overflow.
    keyed: list[tuple[tuple[int, int, int], str]] = []
    for name in names:
        base = base_of(name)
        if base is None:
            continue
        usage = usage_of(name)
        if usage is None:
            count_key = used_memory = 0
        else:
            count_key = usage.modules if spread else -usage.modules
            if name in holding:
                count_key += _IN_PLACE
            used_memory = usage.memory
        if base.memory is None:
            keyed.append(((count_key, 1, 0), name))
        else:
            free = base.memory - used_memory
            keyed.append(((count_key, 0, -free if spread else free), name))
    scores = _rank_scores(keyed)
    return [(name, scores.get(name, 0)) for name in names]


def best_bases(
    pod: ModulePod,
    passing: list[str],
    base_of: Callable[[str], BaseInfo | None],
    usage_of: UsageOf = _no_usage,
    strategy: Strategy = "spread",
    holding: AbstractSet[str] | None = None,
) -> list[str]:
    """The bases of `passing` (all known bases that fit) that `prioritize_pod` scores highest, every
    one of a tie: what the filter passes, so kube-scheduler needs no prioritize call and its own
    scores only choose among equals. The same order as prioritize's keys, a tier at a time (one
    pass over the bases rather than a sort): a fresh install before an in-place upgrade, then the
    module count, then a base stating its memory before one that does not, then its free memory."""
    if not pod.is_module or len(passing) <= 1:
        return passing
    if holding is None:
        holding = _holding(pod, passing, usage_of)
    pool = passing
    if holding:
        fresh = [name for name in passing if name not in holding]
        if fresh:
            pool = fresh
    usages = list(map(usage_of, pool))
    counts = [usage.modules if usage is not None else 0 for usage in usages]
    spread = strategy == "spread"
    target = min(counts) if spread else max(counts)
    stated: list[str] = []
    frees: list[int] = []
    unstated: list[str] = []
    for name, usage, count in zip(pool, usages, counts, strict=True):
        if count != target:
            continue
        base = base_of(name)
        if base is None or base.memory is None:
            unstated.append(name)
        else:
            stated.append(name)
            frees.append(base.memory - (usage.memory if usage is not None else 0))
    if not stated:
        return unstated
    top = max(frees) if spread else min(frees)
    return [name for name, free in zip(stated, frees, strict=True) if free == top]


def annotated_usage(base: BaseInfo) -> BaseUsage | None:
    """Usage a provider reports on the Node itself (full-Node mode without a Pod watch)."""
    if base.annotated_modules is None:
        return None
    return BaseUsage(modules=len(base.annotated_modules), biz_names=Counter(base.annotated_modules))


def fit_error_message(total_nodes: int, failed: Mapping[str, str]) -> str:
    """The text kube-scheduler builds from the reasons (pkg/scheduler/framework/types.go FitError):
    used by tests and docs to check what a user will read."""
    histogram = Counter(failed.values())
    parts = sorted(f"{count} {reason}" for reason, count in histogram.items())
    return f"0/{total_nodes} nodes are available: " + ", ".join(parts) + "."
