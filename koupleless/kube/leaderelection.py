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
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from koupleless.kube.client import ApiError, KubeClient, lease_path, pod_path
from koupleless.kube.lease import LeaseObserver, LeaseRecord, lease_body, micro_time

__all__ = ["LeaderElectionConfig", "LeaderElector", "LeaderPodLabel", "micro_time"]

log = logging.getLogger(__name__)

IS_LEADER = Gauge(
    "koupleless_leader_election_is_leader",
    "1 while this process holds the named leader-election Lease, else 0.",
    ["lease"],
)

LEADER_LABEL_WRITES = Counter(
    "koupleless_leader_label_writes_total",
    "Writes of the leader label on Pods (outcome: ok, or error when retried later).",
    ["change", "outcome"],
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
        self._observer = LeaseObserver(default_duration=config.lease_duration)
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

    def _observe(self, lease: dict[str, Any]) -> LeaseRecord:
        self._observer.observe(self._path, lease)
        record = LeaseRecord.from_lease(lease)
        self.holder = record.holder
        return record

    def _held_by_another(self, lease: dict[str, Any]) -> bool:
        holder = LeaseRecord.from_lease(lease).holder
        if not holder or holder == self.config.identity:
            return False
        return not self._observer.expired(self._path, lease)

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        cfg = self.config
        try:
            lease = await self.client.get(self._path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            body = lease_body(cfg.name, cfg.namespace, cfg.identity, cfg.lease_duration, 0)
            self._observe(await self.client.create(lease_path(cfg.namespace), body))
            return True
        record = self._observe(lease)
        if self._held_by_another(lease):
            return False
        if record.holder != cfg.identity or not record.acquire_time:
            log.info("lease %s/%s: taking it over from %s", cfg.namespace, cfg.name, record.holder or "nobody")
        # metadata keeps its resourceVersion: a replica that wrote in between makes this a 409.
        updated = {**lease, "spec": record.renewed_by(cfg.identity, cfg.lease_duration).to_spec()}
        self._observe(await self.client.replace(self._path, updated))
        return True

    async def _release(self) -> None:
        """Free the Lease (holder empty) so a standby need not wait out the lease duration."""
        try:
            lease = await self.client.get(self._path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.config.identity:
                return
            released = {**lease, "spec": {**spec, **LeaseRecord.from_spec(spec).released().to_spec()}}
            await self.client.replace(self._path, released)
            log.info("lease %s/%s: released", self.config.namespace, self.config.name)
        except ApiError as exc:
            log.warning("lease %s: could not release it (a standby takes over when it expires): %s", self._path, exc)


class LeaderPodLabel:
    """Keeps the label `key: value` on this process's own Pod exactly while it leads, so a Service
    selecting that label sends traffic to the leader only, while every replica can report Ready.

    Called with `set_leading(...)` (an elector's `on_change`). One task converges the Pod to the
    latest wish, re-read before every write, so a change that arrives during a slow write is
    applied after it rather than lost. When it leads it also removes the label from every other Pod
    in the namespace: a leader that was killed, or cut off from the API server, cannot remove its
    own. While leading it looks again every `resync` seconds, which also undoes a late write by a
    former leader. Failed writes are retried with backoff up to `max_retry_delay`.
    """

    def __init__(self, client: KubeClient, namespace: str, pod_name: str, key: str, value: str, *,
                 resync: float = 30.0, retry_delay: float = 0.5, max_retry_delay: float = 10.0) -> None:
        self.client = client
        self.namespace = namespace
        self.pod_name = pod_name
        self.key, self.value = key, value
        self.resync = resync
        self.retry_delay, self.max_retry_delay = retry_delay, max_retry_delay
        self.leading = False
        #: What our own Pod carries as of the last successful write (None: not written yet).
        self.labelled: bool | None = None
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def set_leading(self, leading: bool) -> None:
        self.leading = leading
        self._settled.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._wake.set()  # first round: a restarted container's Pod may still carry the label
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"leader-label-{self.pod_name}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Take the label off our Pod (waiting up to `timeout` for that write), then stop."""
        if self._task is None:
            return
        self.set_leading(False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            wait = self.resync if self.leading else None
            if failures:
                wait = min(self.max_retry_delay, self.retry_delay * 2 ** (failures - 1))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            want = self.leading
            try:
                if want:
                    await self._lead_round()
                elif self.labelled is not False:
                    await self._write_own(False)
            except ApiError as exc:
                failures += 1
                log.warning("pod %s/%s: could not %s the label %s (retrying): %s", self.namespace, self.pod_name,
                            "set" if want else "remove", self.key, exc)
                continue
            failures = 0
            if want == self.leading:
                self._settled.set()

    async def _write_own(self, labelled: bool) -> None:
        await self._patch(self.pod_name, labelled)
        self.labelled = labelled
        log.info("pod %s/%s: label %s=%s %s", self.namespace, self.pod_name, self.key, self.value,
                 "set (this replica leads)" if labelled else "removed")

    async def _lead_round(self) -> None:
        """Our Pod first (the Service gets an endpoint at once), then everyone else's."""
        found = await self.client.list(pod_path(self.namespace), {"labelSelector": f"{self.key}={self.value}"})
        holders = {str(p["metadata"]["name"]): p for p in found.get("items") or []}
        if self.pod_name in holders:
            self.labelled = True
        else:
            await self._write_own(True)
        for name, pod in holders.items():
            if name != self.pod_name:
                # Only if the Pod is as listed: a 409 means look again, not remove blindly.
                await self._patch(name, False, resource_version=pod["metadata"].get("resourceVersion"))
                log.info("pod %s/%s: removed the label %s from a former leader", self.namespace, name, self.key)

    async def _patch(self, name: str, labelled: bool, resource_version: str | None = None) -> None:
        metadata: dict[str, Any] = {"labels": {self.key: self.value if labelled else None}}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        change = "set" if labelled else "remove"
        try:
            await self.client.patch(pod_path(self.namespace, name), {"metadata": metadata})
        except ApiError as exc:
            if exc.not_found and not labelled:
                LEADER_LABEL_WRITES.labels(change, "ok").inc()
                return  # a Pod that is gone carries no label
            LEADER_LABEL_WRITES.labels(change, "error").inc()
            if exc.not_found:
                raise ApiError(exc.status, exc.reason, f"Pod {self.namespace}/{name} not found: set POD_NAME "
                               "and POD_NAMESPACE from the downward API (metadata.name, metadata.namespace)") from exc
            raise
        LEADER_LABEL_WRITES.labels(change, "ok").inc()
