"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's rules.

One replica holds the Lease and renews it every `retry_period`; the others read it as often and
take it over when it has not changed for its `leaseDurationSeconds`, measured on their own clock
from when they last saw it change (so clock skew between replicas does not matter). A leader that
cannot renew within `renew_deadline` (shorter than the lease duration) stops leading before anyone
else may start. A leader that stops on purpose releases the Lease, so a standby takes over at its
next try instead of after a whole lease duration. Every write carries the resourceVersion read
just before it, so of two replicas racing for an expired Lease exactly one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from koupleless.kube.client import ApiError, KubeClient, lease_path

log = logging.getLogger(__name__)

IS_LEADER = Gauge(
    "koupleless_leader_election_is_leader",
    "1 while this process holds the named leader-election Lease, else 0.",
    ["lease"],
)

#: client-go's JitterFactor: tries spread over [retry_period, 1.2 x retry_period].
JITTER = 1.2


@dataclass(frozen=True)
class LeaderElectionConfig:
    namespace: str
    name: str
    identity: str
    #: How long a standby waits, after the Lease last changed, before taking it.
    lease_duration: float = 15.0
    #: How long the leader keeps trying to renew before it stops leading.
    renew_deadline: float = 10.0
    #: Pause between tries, for the leader (renew) and the standbys (acquire).
    retry_period: float = 2.0

    def problems(self) -> list[str]:
        """What is wrong with these durations, in the flags' words (empty when they are usable)."""
        out = []
        if self.retry_period <= 0:
            out.append("--leader-retry-period must be above 0")
        if self.lease_duration <= self.renew_deadline:
            out.append(f"--leader-lease-duration ({self.lease_duration:g}s) must be longer than "
                       f"--leader-renew-deadline ({self.renew_deadline:g}s), or two replicas could both lead")
        if self.renew_deadline <= JITTER * self.retry_period:
            out.append(f"--leader-renew-deadline ({self.renew_deadline:g}s) must be longer than "
                       f"{JITTER:g} x --leader-retry-period ({self.retry_period:g}s), or one slow renewal loses the lead")
        if not self.identity:
            out.append("the leader-election identity must not be empty")
        return out


def micro_time(t: dt.datetime | None = None) -> str:
    return (t or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for one Lease until stopped. `is_leader` says whether this process leads right now;
    `on_change(is_leader)` is called on every change."""

    def __init__(self, client: KubeClient, config: LeaderElectionConfig,
                 on_change: Callable[[bool], None] | None = None) -> None:
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.client = client
        self.config = config
        self.on_change = on_change
        self.is_leader = False
        #: The holder the Lease named when last read ("" when free or never read).
        self.holder = ""
        self._path = lease_path(config.namespace, config.name)
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._gauge = IS_LEADER.labels(f"{config.namespace}/{config.name}")
        self._gauge.set(0)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"leader-election-{self.config.name}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop campaigning; a leader stops leading first and then (by default) frees the Lease."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        was_leader = self.is_leader
        self._set_leader(False)
        if was_leader and release:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.renew_deadline):
                    await self._release()

    async def _run(self) -> None:
        cfg = self.config
        while True:
            await self._acquire()
            self._set_leader(True)
            last_renewal = time.monotonic()
            while True:
                await asyncio.sleep(cfg.retry_period)
                left = cfg.renew_deadline - (time.monotonic() - last_renewal)
                renewed = False
                if left > 0:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                    # that arrives as the call finishes, and stop() would wait forever.
                    try:
                        async with asyncio.timeout(left):
                            renewed = await self._try_quietly()
                    except TimeoutError:
                        renewed = False
                if renewed:
                    last_renewal = time.monotonic()
                elif time.monotonic() - last_renewal >= cfg.renew_deadline:
                    log.warning("lease %s/%s: not renewed for %.1fs; no longer leading",
                                cfg.namespace, cfg.name, time.monotonic() - last_renewal)
                    self._set_leader(False)
                    break

    async def _acquire(self) -> None:
        """Try every retry period (jittered, so standbys do not hit the API server in step) until we lead."""
        while True:
            if await self._try_quietly():
                return
            await asyncio.sleep(self.config.retry_period * random.uniform(1.0, JITTER))

    def _set_leader(self, leading: bool) -> None:
        if leading == self.is_leader:
            return
        self.is_leader = leading
        self._gauge.set(1 if leading else 0)
        if leading:
            log.info("lease %s/%s: %s is now the leader", self.config.namespace, self.config.name, self.config.identity)
        if self.on_change is not None:
            self.on_change(leading)

    # --- one try -------------------------------------------------------------------------------

    async def _try_quietly(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except ApiError as exc:
            if exc.conflict:
                log.debug("lease %s: another replica wrote it first", self._path)
            else:
                log.warning("lease %s: %s", self._path, exc)
            return False

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.config.identity,
            # An integer on the wire; rounding up never lets a standby take over early.
            "leaseDurationSeconds": max(1, math.ceil(self.config.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": micro_time(),
            "leaseTransitions": transitions,
        }

    def _observe(self, lease: dict[str, Any]) -> dict[str, Any]:
        spec = lease.get("spec") or {}
        if spec != self._observed_spec:
            self._observed_spec = spec
            self._observed_at = time.monotonic()
        self.holder = str(spec.get("holderIdentity") or "")
        return spec

    def _held_by_another(self, spec: dict[str, Any]) -> bool:
        holder = spec.get("holderIdentity") or ""
        if not holder or holder == self.config.identity:
            return False
        duration = spec.get("leaseDurationSeconds")
        if not isinstance(duration, int | float) or duration <= 0:
            duration = self.config.lease_duration
        return time.monotonic() < self._observed_at + float(duration)

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        try:
            lease = await self.client.get(self._path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                "spec": self._spec(micro_time(), 0),
            }
            self._observe(await self.client.create(lease_path(self.config.namespace), body))
            return True
        spec = self._observe(lease)
        if self._held_by_another(spec):
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if spec.get("holderIdentity") == self.config.identity and spec.get("acquireTime"):
            acquire_time = str(spec["acquireTime"])
        else:
            acquire_time = micro_time()
            transitions += 1
            log.info("lease %s/%s: taking it over from %s", self.config.namespace, self.config.name,
                     spec.get("holderIdentity") or "nobody")
        # metadata keeps its resourceVersion: a replica that wrote in between makes this a 409.
        updated = {**lease, "spec": self._spec(acquire_time, transitions)}
        self._observe(await self.client.replace(self._path, updated))
        return True

    async def _release(self) -> None:
        """Free the Lease (holder empty) so a standby need not wait out the lease duration."""
        try:
            lease = await self.client.get(self._path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.config.identity:
                return
            now = micro_time()
            released = {**lease, "spec": {**spec, "holderIdentity": "", "leaseDurationSeconds": 1,
                                           "renewTime": now, "acquireTime": now}}
            await self.client.replace(self._path, released)
            log.info("lease %s/%s: released", self.config.namespace, self.config.name)
        except ApiError as exc:
            log.warning("lease %s: could not release it (a standby takes over when it expires): %s", self._path, exc)
