"""The Node reconciler: each base's virtual Node and its Lease, with one writer per Node.

A Node key in the queue means "make the Node, its status and its Lease what the base says". Lease
renewals are jobs of the same queue (a sync asks to be run again when the next renewal is due), so
a renewal never races a status write, and deleting a gone base's Node holds up no other base.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from koupleless import arklet, keys
from koupleless.kube import nodes as node_reader
from koupleless.kube.client import ApiError, KubeClient, lease_path, node_path
from koupleless.kube.informer import Informer
from koupleless.kube.lease import LeaseObserver
from koupleless.kube.workqueue import WorkQueue
from provider import vnode
from provider.bases import BaseRegistry
from provider.pods import API_WRITES
from provider.podstatus import iso
from provider.state import BaseState, node_base_id

log = logging.getLogger(__name__)

LEASE_TAKEOVERS = Counter(
    "koupleless_provider_lease_takeovers_total", "Base Leases this replica took over from another holder"
)

#: A standby looks at a Lease this long after it should have expired (a late renewal).
_LEASE_EXPIRY_MARGIN_S = 0.25
#: The most the provider replicas' clocks are trusted to disagree by.
LEASE_MAX_CLOCK_SKEW_S = 5.0


@dataclass(frozen=True)
class NodeReconcilerOptions:
    identity: str = "module-controller"
    node: vnode.NodeOptions = field(default_factory=vnode.NodeOptions)
    #: kubelet's ratio: renew every quarter of the Lease duration (10 s of 40 s).
    lease_renew_interval: float = vnode.LEASE_DURATION_S / 4
    workers: int = 16


class NodeReconciler:
    def __init__(self, kube: KubeClient, registry: BaseRegistry, nodes: Informer, opts: NodeReconcilerOptions,
                 on_owned: Callable[[BaseState, bool], None]) -> None:
        self.kube = kube
        self.registry = registry
        self.nodes = nodes
        self.opts = opts
        self.on_owned = on_owned
        self.queue = WorkQueue("nodes", self.sync, workers=opts.workers)
        #: Nodes this replica created that its informer has not delivered yet (see sync).
        self._created: dict[str, dict[str, Any]] = {}
        # Expiry by observed silence (client-go's way), so replicas' clocks need not agree; a Lease
        # whose renewTime is older than its duration plus this skew by our clock is free at once,
        # so a new replica does not wait a whole Lease period for bases nobody holds.
        self.leases = LeaseObserver(default_duration=opts.node.lease_duration_s, max_clock_skew=LEASE_MAX_CLOCK_SKEW_S)

    # --- what the informer and the bases say ----------------------------------------------------------

    def adopt(self, node: dict[str, Any]) -> None:
        """A vnode from before this process started: known, not heard from yet. It keeps its current
        readiness for one heartbeat window, so a provider restart makes no Node flap."""
        base_id = node_base_id(node)
        meta = node.get("metadata") or {}
        name = meta.get("name", "")
        if not base_id or self.registry.for_node(name) is not None:
            return
        labels = meta.get("labels") or {}
        ip, host = node_reader.address(node, "InternalIP"), node_reader.address(node, "Hostname")
        base = BaseState(base_id=base_id, node_name=name)
        base.heartbeat = arklet.Heartbeat(
            arklet.BaseMetadata(
                base_id,
                labels.get(keys.LABEL_BASE_NAME, ""),
                labels.get(keys.LABEL_BASE_VERSION, ""),
                labels.get(keys.LABEL_BASE_CLUSTER_NAME, ""),
            ),
            ip,
            host,
            0,
            arklet.ACTIVATED,
        )
        base.ready = node_reader.is_ready(node)
        base.node_uid = str(meta.get("uid", ""))
        self.registry.add(base)

    def on_node_update(self, _old: dict[str, Any], node: dict[str, Any]) -> None:
        """Someone else changed our Node: the node lifecycle controller setting Ready=Unknown after a
        slow Lease renewal, or a label or taint edited away. Put back what the base says; the
        controller never sets Ready=True itself."""
        name = (node.get("metadata") or {}).get("name", "")
        base = self.registry.for_node(name)
        if base is None or not base.owned:
            return
        ready = node_reader.condition_status(node, "Ready")
        labels = (node.get("metadata") or {}).get("labels") or {}
        want_labels = vnode.node_labels(base, self.opts.node)
        if ready != ("True" if base.ready else "False") or any(labels.get(k) != v for k, v in want_labels.items()):
            self.queue.add(name)

    def on_node_gone(self, node: dict[str, Any]) -> None:
        name = (node.get("metadata") or {}).get("name", "")
        self._created.pop(name, None)
        base = self.registry.for_node(name)
        if base is None:
            return
        if base.ready:
            self.queue.add(name)  # deleted by someone else while the base lives: made again
            return
        # An operator deleted the Node of a base we cannot hear: that sticks until it heartbeats.
        log.info("Node %s of silent base %s was deleted; forgetting the base until it is heard again",
                 name, base.base_id)
        self.registry.remove(base)

    # --- sync ---------------------------------------------------------------------------------------

    async def sync(self, name: str) -> float | None:
        base = self.registry.for_node(name)
        if base is None:
            return None
        if base.gone:
            await self._forget(base)
            return None
        now = time.monotonic()
        node = self._node(name)
        fresh = False  # the Node was created by this sync, as the base says it is
        if not base.owned:
            new = node is None and not base.lease_rv
            if new:
                # A base never seen before: its Node first, so that its Lease is written once, with
                # the Node as owner (two API writes per new base; a Lease before the Node took a
                # third to set the owner). Replicas racing for a new base may both try; one create
                # wins, and only the Lease's holder writes the Node after that.
                node, fresh = await self._create_node(base)
            retry = await self._acquire_lease(base, new=new)
            if retry is not None:
                return retry
            self.on_owned(base, new)
        elif now - base.lease_renewed_at >= self.opts.lease_renew_interval * 0.85:
            if not await self._renew_lease(base):
                return 0.05  # lost it: look at who holds it now
        if node is None:
            node, fresh = await self._create_node(base)
        if not fresh:
            try:
                await self._update_node(base, node)
            except ApiError as exc:
                if not exc.not_found:
                    raise
                self._created.pop(name, None)  # deleted before our informer saw it: make it again
                return 0.05
        # The next renewal, with jitter so a fleet registered in one burst spreads out over rounds;
        # on average once per interval, as kubelet renews (6 writes a minute at 10 s).
        due = base.lease_renewed_at + self.opts.lease_renew_interval * random.uniform(0.9, 1.1)
        return max(0.05, due - time.monotonic())

    def _node(self, name: str) -> dict[str, Any] | None:
        node = self.nodes.get(name)
        if node is not None:
            self._created.pop(name, None)
            return node
        # Created by this replica a moment ago, not in the informer yet: the next sync (the base's
        # health reply) must not POST again, get AlreadyExists and GET it.
        return self._created.get(name)

    async def _create_node(self, base: BaseState) -> tuple[dict[str, Any], bool]:
        """The base's Node, and whether this call created it (else it was there: read back)."""
        try:
            created = await self.kube.create(node_path(), vnode.build_node(base, self.opts.node, iso()))
        except ApiError as exc:
            if not exc.already_exists:
                raise
            node: dict[str, Any] = await self.kube.get(node_path(base.node_name))
            base.node_uid = str((node.get("metadata") or {}).get("uid", "")) or base.node_uid
            return node, False
        API_WRITES.labels("node_create").inc()
        base.node_uid = str((created.get("metadata") or {}).get("uid", ""))
        self._created[base.node_name] = created
        log.info("created Node %s for base %s", base.node_name, base.base_id)
        return created, True

    async def _update_node(self, base: BaseState, node: dict[str, Any]) -> None:
        name = base.node_name
        meta = node.get("metadata") or {}
        base.node_uid = str(meta.get("uid", "")) or base.node_uid
        labels = meta.get("labels") or {}
        want_labels = vnode.node_labels(base, self.opts.node)
        patch: dict[str, Any] = {}
        if any(labels.get(k) != v for k, v in want_labels.items()):
            patch.setdefault("metadata", {})["labels"] = want_labels
        taints = (node.get("spec") or {}).get("taints") or []
        have = {(t.get("key"), t.get("effect")) for t in taints}
        missing = [t for t in vnode.node_taints(self.opts.node) if (t["key"], t["effect"]) not in have]
        if missing:
            patch["spec"] = {"taints": taints + missing}
        if patch:
            await self.kube.patch(node_path(name), patch, "merge")
            API_WRITES.labels("node_meta").inc()
        old_status = node.get("status") or {}
        status = vnode.node_status(base, self.opts.node, old_status, iso())
        if vnode.node_status_changed(old_status, status):
            await self.kube.patch(node_path(name), {"status": status}, "strategic", subresource="status")
            API_WRITES.labels("node_status").inc()

    async def _forget(self, base: BaseState) -> None:
        self._created.pop(base.node_name, None)
        log.warning("base %s silent for over %.0fs: deleting Node %s", base.base_id, self.registry.gone_after,
                    base.node_name)
        self.registry.remove(base)
        if not base.owned:
            return
        for path in (node_path(base.node_name), lease_path(vnode.LEASE_NAMESPACE, base.node_name)):
            try:
                await self.kube.delete(path)
                API_WRITES.labels("node_delete").inc()
            except ApiError as exc:
                if not exc.not_found:
                    log.warning("deleting %s failed: %s", path, exc)

    # --- Leases -------------------------------------------------------------------------------------

    async def _acquire_lease(self, base: BaseState, *, new: bool = False) -> float | None:
        """Take the base's Lease if it is free or expired. None when this replica holds it now; else
        the seconds until it is worth looking again: just after the holder's Lease would expire, so
        a standby takes over as soon as the holder stops renewing, with one GET per Lease period.

        `new`: a base with no Node yet, whose Lease most likely does not exist either: create it
        first (a GET would only say 404), and read it only if someone was first."""
        path = lease_path(vnode.LEASE_NAMESPACE, base.node_name)
        me = self.opts.identity
        if new:
            created = await self._create_lease(base)
            if created:
                return None
        try:
            lease = await self.kube.get(path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            return None if await self._create_lease(base) else 0.5
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        left = self.leases.seconds_left(base.node_name, lease)
        address = ((lease.get("metadata") or {}).get("annotations") or {}).get(keys.ANNOTATION_HTTP_TUNNEL_ADDRESS)
        base.lease_holder_address = address if holder != me and isinstance(address, str) else ""
        if holder != me and left >= 0:
            if base.owned:
                log.warning("base %s: Lease held by %s; leaving it to that replica", base.base_id, holder)
            base.owned = False
            return left + _LEASE_EXPIRY_MARGIN_S
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == me else 1)
        body = vnode.build_lease(base, me, self.opts.node, transitions,
                                 acquire_time=spec.get("acquireTime") if holder == me else None)
        body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        try:
            updated = await self.kube.replace(path, body)
        except ApiError as exc:
            if exc.conflict:
                return 0.5  # someone else wrote it first: look again
            raise
        API_WRITES.labels("lease").inc()
        if holder != me:
            LEASE_TAKEOVERS.inc()
            log.info("base %s: took over Lease %s from %s", base.base_id, base.node_name, holder or "nobody")
        base.lease_rv = str(updated["metadata"]["resourceVersion"])
        base.lease_renewed_at = time.monotonic()
        base.owned = True
        return None

    async def _create_lease(self, base: BaseState) -> bool:
        """False when another replica created it first (its expiry is then learnt by reading it)."""
        try:
            created = await self.kube.create(
                lease_path(vnode.LEASE_NAMESPACE), vnode.build_lease(base, self.opts.identity, self.opts.node)
            )
        except ApiError as exc:
            if exc.already_exists:
                return False
            raise
        API_WRITES.labels("lease").inc()
        base.lease_rv = str(created["metadata"]["resourceVersion"])
        base.lease_renewed_at = time.monotonic()
        base.owned = True
        return True

    async def _renew_lease(self, base: BaseState) -> bool:
        """False when the Lease is no longer ours (someone else wrote it, or it was deleted)."""
        if not base.owned:
            return False
        path = lease_path(vnode.LEASE_NAMESPACE, base.node_name)
        body = vnode.build_lease(base, self.opts.identity, self.opts.node)
        body["metadata"]["resourceVersion"] = base.lease_rv
        try:
            # Not behind --kube-qps: renewals are one per base per interval, as every kubelet renews
            # its own, and one that waits behind a burst of Pod writes makes a healthy base NotReady.
            updated = await self.kube.replace(path, body, limited=False)
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                base.owned = False
                return False
            raise
        API_WRITES.labels("lease").inc()
        base.lease_rv = str(updated["metadata"]["resourceVersion"])
        base.lease_renewed_at = time.monotonic()
        return True
