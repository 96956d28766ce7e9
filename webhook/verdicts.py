"""Decisions, and the verdicts of new module Pods: judged from their spec, and kept for the spec.

All replicas of a release share their spec in what the webhook reads of it, so a new Pod's verdict
is kept per spec (KeptVerdicts) and the release's later replicas reuse it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from koupleless import model
from webhook import wire
from webhook.defaults import Defaults, default_ops
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


class KeptVerdicts:
    """Verdicts of new Pods by spec (and DaemonSet ownership), for one Defaults at a time: a
    process has one, and a key of bytes alone is hashed once (bytes keep their hash), where a
    Defaults in every key was hashed by Python code at each look-up."""

    __slots__ = ("defaults", "kept", "seen_once")

    def __init__(self) -> None:
        self.defaults: Defaults | None = None
        self.kept: dict[bytes, Decision] = {}
        #: Keys of specs judged once and not yet kept: a verdict is kept from its spec's second
        #: sighting on. Bytes, nothing the garbage collector walks, unlike a kept verdict's ops.
        self.seen_once: set[bytes] = set()

    def use(self, defaults: Defaults) -> None:
        """Verdicts made under other defaults do not apply: forget them."""
        if defaults != self.defaults:
            self.kept.clear()
            self.seen_once.clear()
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
    names): one verdict per distinct spec and ownership is kept, from the spec's second Pod on.
    Raises wire.DecodeError when a part left undecoded does not decode."""
    spec = pod.get("spec")
    daemonset_owned = model.owned_by_daemonset(pod)
    if not isinstance(spec, dict):
        return judge_new_pod(pod, defaults, daemonset_owned)
    cache = _VERDICTS
    if defaults is not cache.defaults:
        cache.use(defaults)
    key = _JSON.encode((daemonset_owned, spec))  # Raw parts are copied as they arrived
    verdict = cache.kept.get(key)
    if verdict is not None:
        VERDICT_COUNTS.reused += 1
    else:
        VERDICT_COUNTS.judged += 1
        decoded = dict(spec)
        for name in wire.RAW_SPEC_FIELDS:
            value = decoded.get(name)
            if isinstance(value, wire.Raw):
                decoded[name] = wire.decode(value)
        verdict = judge_new_pod({"spec": decoded}, defaults, daemonset_owned)
        if len(key) <= CACHED_SPEC_BYTES:
            # Kept once the spec comes back: every replica after a release's second reuses it, and
            # a stream of one-off specs does not churn the cache (and the collector) with verdicts
            # nobody asks for again.
            seen_once = cache.seen_once
            if key in seen_once:
                seen_once.discard(key)
                if len(cache.kept) >= CACHED_SPECS:
                    cache.kept.clear()  # simpler than LRU order, and as good: releases come in bursts
                cache.kept[key] = verdict
            else:
                if len(seen_once) >= CACHED_SPECS:
                    seen_once.clear()
                seen_once.add(key)
    return verdict


def judge_new_pod(pod: Mapping[str, Any], defaults: Defaults, daemonset_owned: bool = False) -> Decision:
    problems = model.validate_pod(pod, stack_defaulted=True, daemonset_owned=daemonset_owned)
    if not problems:  # the usual case, without two list scans
        ops = default_ops(pod, defaults, daemonset_owned=daemonset_owned)
        return Decision("patched" if ops else "allowed", ops=ops)
    errors = model.errors(problems)
    if errors:
        return deny(errors)
    return allow(default_ops(pod, defaults, daemonset_owned=daemonset_owned), model.warnings(problems))


def allow(ops: list[Op], warnings: list[model.Problem]) -> Decision:
    return Decision("patched" if ops else "allowed", ops=ops, warnings=[str(w) for w in warnings])


def deny(errors: list[model.Problem]) -> Decision:
    return Decision("denied", message=PROBLEM_SEPARATOR.join(str(e) for e in errors), code=403)
