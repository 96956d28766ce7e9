"""Decisions, and the verdicts of new module Pods: judged from their spec, and kept for the spec.

All replicas of a release share their spec in what the webhook reads of it, so a new Pod's verdict
is kept per spec (KeptVerdicts) and the release's later replicas reuse it. A new release changes
its containers (the jar, BIZ_VERSION) and rarely anything else: what the spec outside the
containers gives (its problems and operations, SpecVerdict) is kept too, per such part, so a new
version's first Pod has only its containers judged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from koupleless import model, model_rules
from webhook import wire
from webhook.defaults import Defaults, default_ops, ops_in_containers, ops_outside_containers, scheduler_ops
from webhook.patch import Op, encode

#: Separates problems in a rejection: the message becomes one line of a ReplicaSet event, where a
#: newline would break `kubectl describe`'s table.
PROBLEM_SEPARATOR = "; "
#: New Pods whose spec (what the webhook reads of it) is up to this size have their verdict kept,
#: for this many distinct specs; a bigger one is judged each time, so the cache stays small (a few
#: MB at most) whatever users write.
CACHED_SPEC_BYTES = 16 * 1024
CACHED_SPECS = 512
_JSON = msgspec.json.Encoder()

Result = Literal["allowed", "patched", "denied", "error"]


class Decision:
    """Shared between requests (the verdicts of new Pods are kept): never changed once made
    (Final to mypy). A plain class: a frozen dataclass's __init__, which sets each field through
    object.__setattr__, cost a tenth of judging a new Pod."""

    __slots__ = ("code", "message", "ops", "patch", "result", "warnings")

    def __init__(
        self,
        result: Result,
        ops: list[Op] | None = None,
        warnings: list[str] | None = None,
        message: str = "",
        code: int = 200,
    ) -> None:
        self.result: Final = result
        self.ops: Final[list[Op]] = ops if ops is not None else []
        self.warnings: Final[list[str]] = warnings if warnings is not None else []
        self.message: Final = message
        self.code: Final = code
        #: `ops` as the response's `patch`, base64 of their JSON, encoded once
        self.patch: Final = encode(ops) if ops else b""

    def _fields(self) -> tuple[Result, list[Op], list[str], str, int]:
        return (self.result, self.ops, self.warnings, self.message, self.code)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # its lists are not hashable either

    def __repr__(self) -> str:
        result, ops, warnings, message, code = self._fields()
        return f"Decision({result!r}, ops={ops!r}, warnings={warnings!r}, message={message!r}, code={code!r})"


class SpecVerdict:
    """What a new Pod's spec outside its containers adds to its verdict: its problems after the
    containers' (model_rules.problems_outside_containers), its operations after theirs
    (defaults.ops_outside_containers), and the scheduler operations that follow when a container
    requests the module resource. Shared between requests: never changed once made."""

    __slots__ = ("ops", "problems", "scheduler_ops")

    def __init__(self, spec: Mapping[str, Any], defaults: Defaults, daemonset_owned: bool) -> None:
        self.problems: Final = model_rules.problems_outside_containers(spec, daemonset_owned=daemonset_owned)
        self.ops: Final = ops_outside_containers(spec, defaults, daemonset_owned=daemonset_owned)
        self.scheduler_ops: Final = scheduler_ops(spec, defaults)

    def judge(self, containers: Any) -> Decision:
        """The verdict of the Pod with these `spec.containers`: judge_new_pod's, in parts."""
        problems = model_rules.problems_in_containers(containers)
        if not problems and not self.problems:  # the usual case, without two list scans
            return Decision("patched" if (ops := self._ops(containers)) else "allowed", ops=ops)
        problems += self.problems
        errors = model_rules.errors(problems)
        if errors:
            return deny(errors)
        return allow(self._ops(containers), model_rules.warnings(problems))

    def _ops(self, containers: Any) -> list[Op]:
        ops, requests_module = ops_in_containers(containers)
        ops += self.ops
        if requests_module:
            ops += self.scheduler_ops
        return ops


class KeptVerdicts:
    """Verdicts of new Pods by spec (and DaemonSet ownership), and SpecVerdicts by the spec outside
    its containers (and ownership), for one Defaults at a time: a process has one, and keys of bytes
    alone are hashed once (bytes keep their hash), where a Defaults in every key was hashed by Python
    code at each look-up."""

    __slots__ = ("defaults", "kept", "parts", "parts_seen_once", "seen_once")

    def __init__(self) -> None:
        self.defaults: Defaults | None = None
        #: By spec: the JSON of its containers, and the key of `parts`.
        self.kept: dict[tuple[bytes, bytes], Decision] = {}
        #: Hashes of the keys of specs judged once and not yet kept: a verdict is kept from its
        #: spec's second sighting on. Not the keys themselves: a stream of new specs (a new
        #: version in every Pod) held CACHED_SPECS of them, a kilobyte each, in memory read for
        #: nothing but this, which measurably slowed every admission. A key whose hash another
        #: one seen once shares (1 in 2**64) has its verdict, the same, kept a sighting early.
        self.seen_once: set[int] = set()
        self.parts: dict[bytes, SpecVerdict] = {}
        self.parts_seen_once: set[int] = set()

    def use(self, defaults: Defaults) -> None:
        """Verdicts made under other defaults do not apply: forget them."""
        if defaults != self.defaults:
            self.kept.clear()
            self.seen_once.clear()
            self.parts.clear()
            self.parts_seen_once.clear()
            self.defaults = defaults


_VERDICTS = KeptVerdicts()


@dataclass(slots=True)
class VerdictCounts:
    """New module Pods whose kept verdict was reused, and those judged afresh (for /metrics)."""

    reused: int = 0
    judged: int = 0


VERDICT_COUNTS = VerdictCounts()


def decide_create(pod: Mapping[str, Any], defaults: Defaults) -> Decision:
    """A new module Pod's verdict depends on its spec and on whether a DaemonSet owns it (its
    metadata.ownerReferences, model.owned_by_daemonset), and all replicas of a release share that
    spec byte for byte in what the webhook reads of it (webhook.wire declares no volumes, mounts or
    names): one verdict per distinct spec and ownership is kept, from the spec's second Pod on, and
    one SpecVerdict per distinct spec outside the containers. Raises wire.DecodeError when a part
    left undecoded does not decode."""
    spec = pod.get("spec")
    daemonset_owned = model.owned_by_daemonset(pod)
    if not isinstance(spec, dict):
        return judge_new_pod(pod, defaults, daemonset_owned)
    cache = _VERDICTS
    if defaults is not cache.defaults:
        cache.use(defaults)
    outside = dict(spec)
    # The rules treat an absent `containers` as null, so the key may too.
    containers = outside.pop("containers", None)
    outside_key = _JSON.encode((daemonset_owned, outside))  # Raw parts are copied as they arrived
    # A pair, not one string of bytes: the look-up of `parts` below then reuses the hash of
    # `outside_key` (bytes keep their hash) instead of hashing it again inside a longer key.
    key = (_JSON.encode(containers), outside_key)
    verdict = cache.kept.get(key)
    if verdict is not None:
        VERDICT_COUNTS.reused += 1
        return verdict
    VERDICT_COUNTS.judged += 1
    part = cache.parts.get(outside_key)
    if part is None:
        for name in wire.RAW_SPEC_FIELDS:
            value = outside.get(name)
            if isinstance(value, wire.Raw):
                outside[name] = wire.decode(value)
        part = SpecVerdict(outside, defaults, daemonset_owned)
        if len(outside_key) <= CACHED_SPEC_BYTES:
            _keep_from_second_sighting(cache.parts, cache.parts_seen_once, outside_key, part)
    verdict = part.judge(containers)
    if len(key[0]) + len(outside_key) <= CACHED_SPEC_BYTES:
        _keep_from_second_sighting(cache.kept, cache.seen_once, key, verdict)
    return verdict


def _keep_from_second_sighting(kept: dict[Any, Any], seen_once: set[int], key: Hashable, value: Any) -> None:
    """Kept once the key comes back: every replica after a release's second reuses it, and a stream
    of one-off specs does not churn the cache (and the collector) with verdicts nobody asks for
    again. At most CACHED_SPECS of each."""
    seen = hash(key)  # of bytes kept from the look-up that missed
    if seen in seen_once:
        seen_once.discard(seen)
        if len(kept) >= CACHED_SPECS:
            kept.clear()  # simpler than LRU order, and as good: releases come in bursts
        kept[key] = value
    else:
        if len(seen_once) >= CACHED_SPECS:
            seen_once.clear()
        seen_once.add(seen)


def judge_new_pod(pod: Mapping[str, Any], defaults: Defaults, daemonset_owned: bool = False) -> Decision:
    problems = model_rules.validate_pod(pod, stack_defaulted=True, daemonset_owned=daemonset_owned)
    if not problems:  # the usual case, without two list scans
        ops = default_ops(pod, defaults, daemonset_owned=daemonset_owned)
        return Decision("patched" if ops else "allowed", ops=ops)
    errors = model_rules.errors(problems)
    if errors:
        return deny(errors)
    return allow(default_ops(pod, defaults, daemonset_owned=daemonset_owned), model_rules.warnings(problems))


def allow(ops: list[Op], warnings: list[model_rules.Problem]) -> Decision:
    return Decision("patched" if ops else "allowed", ops=ops, warnings=[str(w) for w in warnings])


def deny(errors: list[model_rules.Problem]) -> Decision:
    return Decision("denied", message=PROBLEM_SEPARATOR.join(str(e) for e in errors), code=403)
