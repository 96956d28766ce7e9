"""coordination.k8s.io/v1 Leases: building them, reading them, and judging when one has expired.

Expiry is judged the way client-go's leaderelection does: by *observed* time. A candidate notes,
on its own monotonic clock, when it last saw the Lease change (its resourceVersion or its record:
holder, renewTime, ...), and the Lease has expired once it has seen no change for
`leaseDurationSeconds`. The holder's renewTime is the holder's clock and is never compared with
ours, so clock skew between replicas cannot cause a takeover. The price: a candidate that has just
started waits one lease duration of silence before it takes over, however old renewTime looks
(unless it is given a `max_clock_skew` it may trust).

Used by leader election (koupleless/kube/leaderelection.py) and by the provider's per-base Node
Leases.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "LEASE_API_VERSION",
    "LeaseObserver",
    "LeaseRecord",
    "lease_body",
    "micro_time",
    "parse_micro_time",
]

LEASE_API_VERSION = "coordination.k8s.io/v1"


def micro_time(t: dt.datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC): `t`, or now."""
    t = t or dt.datetime.now(dt.UTC)
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: Any) -> dt.datetime | None:
    """A MicroTime (or any RFC 3339 time) as an aware datetime; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _duration_seconds(value: float) -> int:
    """leaseDurationSeconds is an integer on the wire; rounding up never lets a standby take over early."""
    return max(1, math.ceil(value))


@dataclass(frozen=True)
class LeaseRecord:
    """A Lease's spec, as client-go's LeaderElectionRecord."""

    holder: str = ""
    #: leaseDurationSeconds; 0 when the Lease does not say (or says something unusable).
    duration: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> LeaseRecord:
        spec = spec or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=int(duration) if isinstance(duration, int | float) and duration > 0 else 0,
            acquire_time=str(spec["acquireTime"]) if spec.get("acquireTime") else None,
            renew_time=str(spec["renewTime"]) if spec.get("renewTime") else None,
            transitions=int(transitions) if isinstance(transitions, int | float) and transitions > 0 else 0,
        )

    @classmethod
    def from_lease(cls, lease: dict[str, Any] | None) -> LeaseRecord:
        return cls.from_spec((lease or {}).get("spec"))

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time is not None:
            spec["renewTime"] = self.renew_time
        return spec

    def renewed_by(self, holder: str, duration: float, now: str | None = None) -> LeaseRecord:
        """The record `holder` writes to renew this Lease, or to take it over: a holder that already
        holds it keeps its acquireTime; a new holder gets a fresh one and one more transition."""
        now = now or micro_time()
        if holder == self.holder and self.acquire_time:
            return replace(self, duration=_duration_seconds(duration), renew_time=now)
        return LeaseRecord(holder=holder, duration=_duration_seconds(duration), acquire_time=now, renew_time=now,
                           transitions=self.transitions + 1)

    def released(self, now: str | None = None) -> LeaseRecord:
        """The record a holder writes to give the Lease up: no holder, so a candidate need not wait."""
        now = now or micro_time()
        return replace(self, holder="", duration=1, acquire_time=now, renew_time=now)


def lease_body(
    name: str,
    namespace: str,
    holder: str,
    duration: float,
    transitions: int = 0,
    labels: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
    acquire_time: str | None = None,
    *,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease held by `holder`, renewed now.

    `owner` is an ownerReference (apiVersion, kind, name, uid); `acquire_time` defaults to now (pass
    the old one when renewing a Lease this holder already holds); `resource_version` makes a PUT
    conditional on nobody having written since that version.
    """
    now = micro_time()
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    if resource_version:
        meta["resourceVersion"] = resource_version
    record = LeaseRecord(holder=holder, duration=_duration_seconds(duration), acquire_time=acquire_time or now,
                         renew_time=now, transitions=transitions)
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": meta, "spec": record.to_spec()}


@dataclass
class _Observation:
    version: tuple[Any, ...]
    at: float


@dataclass
class LeaseObserver:
    """When each Lease (by key, e.g. "namespace/name") was last seen to change, on our monotonic clock.

    `observe` (and `seconds_left`/`expired`, which observe first) must be given every read of the
    Lease, and every answer to our own writes of it. A key seen for the first time counts as just
    changed. `forget(key)` drops a Lease that no longer matters.
    """

    #: Used when a Lease has no usable leaseDurationSeconds.
    default_duration: float = 15.0
    #: When set: a Lease whose renewTime plus its duration plus this many seconds is already past by
    #: our wall clock has expired even if it was only just observed. Only as safe as the bound on
    #: clock skew between the writers; None (the default) never trusts renewTime.
    max_clock_skew: float | None = None
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    _seen: dict[str, _Observation] = field(default_factory=dict, init=False, repr=False)

    def observe(self, key: str, lease: dict[str, Any]) -> float:
        """Record this read of the Lease; return when (our monotonic clock) it last changed."""
        record = LeaseRecord.from_lease(lease)
        version = ((lease.get("metadata") or {}).get("resourceVersion"), record)
        seen = self._seen.get(key)
        if seen is None or seen.version != version:
            seen = self._seen[key] = _Observation(version, self.clock())
        return seen.at

    def observed_at(self, key: str) -> float | None:
        seen = self._seen.get(key)
        return None if seen is None else seen.at

    def duration(self, lease: dict[str, Any]) -> float:
        return float(LeaseRecord.from_lease(lease).duration or self.default_duration)

    def seconds_left(self, key: str, lease: dict[str, Any]) -> float:
        """Seconds until another candidate may take the Lease (<= 0: now); -inf when it names no holder."""
        at = self.observe(key, lease)
        record = LeaseRecord.from_lease(lease)
        if not record.holder:
            return float("-inf")
        duration = self.duration(lease)
        left = at + duration - self.clock()
        if self.max_clock_skew is not None:
            renewed = parse_micro_time(record.renew_time)
            if renewed is not None:
                by_wall = (renewed - self.wall_clock()).total_seconds() + duration + self.max_clock_skew
                left = min(left, by_wall)
        return left

    def expired(self, key: str, lease: dict[str, Any]) -> bool:
        """Whether another candidate may take the Lease now (it names no holder, or has been silent
        for its duration). Says nothing about who holds it: check `holder` for our own identity."""
        return self.seconds_left(key, lease) <= 0

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
