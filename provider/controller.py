"""The provider: plays kubelet for Koupleless bases.

Bases arrive over MQTT (heartbeats, replies), Kubernetes arrives through two watch caches (our
virtual Nodes, Pods bound to any Node). Two work queues hold the only writers: one per Node (Node
object, status, Lease) and one per Pod (installs, uninstalls, status, final delete), so no object is
ever written by two coroutines at once. MQTT handlers only update memory and enqueue keys.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from koupleless import arklet, keys
from koupleless.kube.client import ApiError, KubeClient, lease_path, node_path, pod_path
from koupleless.kube.events import EventRecorder
from koupleless.kube.informer import Informer, object_key
from koupleless.model import Module, is_module_pod, module_from_container
from provider import vnode
from provider.podstatus import compute_status, iso, status_changed
from provider.state import BaseState, BizRecord, PendingOp, PodRecord, node_base_id
from provider.tunnel import BrokerOptions, MqttTunnel
from provider.workqueue import WorkQueue

log = logging.getLogger(__name__)

MQTT_REJECTED = Counter(
    "koupleless_provider_mqtt_rejected_total",
    "Base messages not acted on, by reason (not_json, wrong_type, too_large, unknown_topic, identity_mismatch, "
    "stale, duplicate, unknown_base, failed_reply)",
    ["reason"],
)
MQTT_HANDLED = Counter("koupleless_provider_mqtt_handled_total", "Base messages acted on", ["kind"])
COMMANDS = Counter("koupleless_provider_commands_total", "Commands published to bases", ["command"])
ORPHANS = Counter("koupleless_provider_orphan_modules_total", "Modules found on a base with no Pod asking for them")
BASES = Gauge("koupleless_provider_bases", "Bases known to this provider, by readiness", ["ready"])
API_WRITES = Counter("koupleless_provider_api_writes_total", "Writes to the API server", ["what"])
INSTALL_RESULTS = Counter("koupleless_provider_install_results_total", "installBiz replies", ["result"])
POD_SYNC_SECONDS = Histogram("koupleless_provider_pod_sync_seconds", "Time to sync one Pod")
_FINE = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BOUND_TO_INSTALL = Histogram(
    "koupleless_provider_bound_to_install_seconds",
    "From a bound Pod arriving through the watch to its installBiz being published", buckets=_FINE,
)
REPLY_TO_STATUS = Histogram(
    "koupleless_provider_reply_to_status_seconds",
    "From a base's installBiz reply arriving to the Pod status that shows it being stored", buckets=_FINE,
)

LEASE_TAKEOVERS = Counter(
    "koupleless_provider_lease_takeovers_total", "Base Leases this replica took over from another holder"
)
REPLY_TO_PATCH_SENT = Histogram(
    "koupleless_provider_reply_to_status_patch_seconds",
    "From a base's installBiz reply arriving to the Pod status PATCH being sent: this process's own share "
    "of reply_to_status, the rest is the API server", buckets=_FINE,
)

COMPONENT = "koupleless-provider"
#: Renewals still waiting for the API server beyond this are skipped for the round, not stacked up.
_MAX_RENEWALS_IN_FLIGHT = 64
#: A standby looks at a Lease this long after it should have expired (clock skew, a late renewal).
_LEASE_EXPIRY_MARGIN_S = 0.25
#: How long a fresh Pod's "Installing" status waits for the base's answer before it is written.
STATUS_GRACE_S = 0.5


@dataclass(frozen=True)
class ProviderOptions:
    env: str = keys.DEFAULT_ENV
    identity: str = "module-controller"
    node: vnode.NodeOptions = field(default_factory=vnode.NodeOptions)
    heartbeat_interval: float = 10.0
    missed_heartbeats: int = 3
    gone_after: float = 600.0
    #: kubelet's ratio: renew every quarter of the Lease duration (10 s of 40 s).
    lease_renew_interval: float = vnode.LEASE_DURATION_S / 4
    resync_interval: float = 30.0
    health_interval: float = 30.0
    install_timeout: float = 120.0
    orphan_policy: str = "report"
    workers: int = 16


class Provider:
    def __init__(self, kube: KubeClient, broker: BrokerOptions, opts: ProviderOptions) -> None:
        self.kube = kube
        self.opts = opts
        env = opts.env
        self.nodes = Informer(
            kube,
            node_path(),
            label_selector=f"{keys.LABEL_COMPONENT_LEGACY}={keys.COMPONENT_VNODE},{keys.LABEL_VNODE_ENV}={env}",
            name="vnodes",
        )
        self.pods = Informer(
            kube,
            pod_path(),
            field_selector="spec.nodeName!=",
            indexers={"node": lambda p: [str((p.get("spec") or {}).get("nodeName") or "")]},
            name="bound-pods",
        )
        self.events = EventRecorder(kube, COMPONENT)
        self.tunnel = MqttTunnel(
            broker,
            client_id=f"koupleless@@@{opts.identity}",
            subscriptions=[(arklet.controller_subscription(env), 1)],
            on_message=self.on_mqtt,
            name="provider",
        )
        self.bases: dict[str, BaseState] = {}
        self.by_node: dict[str, str] = {}
        self.records: dict[str, PodRecord] = {}
        self.finalized: set[str] = set()
        self._first_seen: dict[str, float] = {}
        #: Pod key -> Events (type, reason, message) to write once its status write is done.
        self._after_status: dict[str, list[tuple[dict[str, Any], str, str, str]]] = {}
        self.pod_queue = WorkQueue("pods", self.sync_pod, workers=opts.workers)
        self.node_queue = WorkQueue("nodes", self.sync_node, workers=opts.workers)
        self._loops: list[asyncio.Task[None]] = []
        self._renewing: set[asyncio.Task[None]] = set()
        self.started = False

    # --- lifecycle --------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.started and self.tunnel.connected.is_set()

    async def start(self) -> None:
        await self.events.start()
        self.nodes.start()
        self.pods.start()
        await asyncio.gather(self.nodes.wait_synced(), self.pods.wait_synced())
        for node in self.nodes.list():
            self._adopt_node(node)
        self.pods.add_handler(self._on_pod, lambda _old, new: self._on_pod(new), self._on_pod_gone)
        self.nodes.add_handler(None, self._on_node_update, self._on_node_gone)
        self.pod_queue.start()
        self.node_queue.start()
        await self.tunnel.start()
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._liveness_loop(), name="liveness"),
            loop.create_task(self._lease_loop(), name="leases"),
            loop.create_task(self._resync_loop(), name="resync"),
        ]
        for name in list(self.by_node):
            self.node_queue.add(name)
        self.started = True
        asyncio.get_running_loop().create_task(self._query_adopted())
        log.info("provider %s started for env %s: %d known bases", self.opts.identity, self.opts.env, len(self.bases))

    async def _query_adopted(self) -> None:
        await self.tunnel.connected.wait()
        for base in list(self.bases.values()):
            self._request_inventory(base, force=True)
            self._publish(base, arklet.CMD_HEALTH)

    async def stop(self) -> None:
        for task in [*self._loops, *self._renewing]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._renewing, return_exceptions=True)
        await self.pod_queue.stop()
        await self.node_queue.stop()
        await self.tunnel.stop()
        await self.nodes.stop()
        await self.pods.stop()
        await self.events.stop()

    def _adopt_node(self, node: dict[str, Any]) -> None:
        """A vnode from before this process started: known, not heard from yet. It keeps its current
        readiness for one heartbeat window, so a provider restart makes no Node flap."""
        base_id = node_base_id(node)
        name = (node.get("metadata") or {}).get("name", "")
        if not base_id or name in self.by_node:
            return
        labels = (node.get("metadata") or {}).get("labels") or {}
        status = node.get("status") or {}
        ip = next((a.get("address", "") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), "")
        host = next((a.get("address", "") for a in status.get("addresses") or [] if a.get("type") == "Hostname"), "")
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
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
        base.ready = ready
        base.node_uid = str((node.get("metadata") or {}).get("uid", ""))
        self.bases[base_id] = base
        self.by_node[name] = base_id

    # --- MQTT in -------------------------------------------------------------------------------------

    def _reject(self, reason: str, topic: str, detail: object) -> None:
        MQTT_REJECTED.labels(reason).inc()
        log.warning("ignored MQTT message on %s (%s): %s", topic[:200], reason, str(detail)[:500])

    def on_mqtt(self, topic: str, payload: bytes) -> None:
        try:
            base_id, kind = arklet.parse_topic(self.opts.env, topic)
            env = arklet.decode_envelope(payload)
            if kind == arklet.HEART:
                self._on_heartbeat(base_id, arklet.parse_heartbeat(env.data, base_id), env.publish_ts_ms)
                return
            base = self.bases.get(base_id)
            if base is None:
                MQTT_REJECTED.labels("unknown_base").inc()
                log.debug("message on %s from base %s before its first heartbeat", topic, base_id)
                return
            if kind == arklet.BIZ_OPERATION:
                self._on_biz_operation(base, arklet.parse_biz_operation(env.data), env.publish_ts_ms)
                return
            if not self._in_order(base, kind, env.publish_ts_ms, topic):
                return
            if kind == arklet.SIMPLE_BIZ:
                self._on_inventory(base, arklet.parse_simple_biz(env.data), env.publish_ts_ms)
            elif kind == arklet.BIZ:
                self._on_inventory(base, arklet.parse_biz(env.data), env.publish_ts_ms)
            elif kind == arklet.BASE_HEALTH:
                self._on_health(base, arklet.parse_health(env.data))
            elif kind == arklet.QUERY_BASELINE:
                self._on_base_started(base)
            else:
                MQTT_REJECTED.labels("unsupported").inc()
                return
            MQTT_HANDLED.labels(kind).inc()
        except arklet.ArkletError as exc:
            self._reject(exc.kind, topic, exc)
        except Exception:  # a bug must not take the tunnel down; the message is counted and logged
            MQTT_REJECTED.labels("internal_error").inc()
            log.exception("failed to handle MQTT message on %s", topic[:200])

    def _in_order(self, base: BaseState, kind: str, ts: int, topic: str) -> bool:
        last = base.last_ts.get(kind)
        if last is not None and ts <= last:
            self._reject("stale", topic, f"publishTimestamp {ts} is not after the last one, {last}")
            return False
        base.last_ts[kind] = ts
        return True

    def _on_heartbeat(self, base_id: str, hb: arklet.Heartbeat, ts: int) -> None:
        base = self.bases.get(base_id)
        topic = arklet.topic(self.opts.env, base_id, arklet.HEART)
        if base is None:
            if not hb.activated:
                return
            name = keys.vnode_name(base_id)
            if name in self.by_node and self.by_node[name] != base_id:
                self._reject("node_name_collision", topic, f"{base_id} and {self.by_node[name]} both map to {name}")
                return
            base = BaseState(base_id=base_id, node_name=name)
            self.bases[base_id] = base
            self.by_node[name] = base_id
            log.info("new base %s (%s %s, %s) -> Node %s", base_id, hb.metadata.name, hb.metadata.version,
                     hb.local_ip, name)
            self._request_inventory(base, force=True)
            self._publish(base, arklet.CMD_HEALTH)
        if not self._in_order(base, arklet.HEART, ts, topic):
            return
        MQTT_HANDLED.labels(arklet.HEART).inc()
        base.last_heard = time.monotonic()
        changed = base.heartbeat is None or (
            base.heartbeat.metadata, base.heartbeat.local_ip, base.heartbeat.local_hostname
        ) != (hb.metadata, hb.local_ip, hb.local_hostname)
        base.heartbeat = hb
        if hb.activated:
            if not base.ready:
                base.ready = True
                log.info("base %s is ready", base_id)
                self._request_inventory(base, force=not base.inventory_requested_at)
                self._enqueue_pods_on(base.node_name)
                changed = True
        elif base.ready:
            self._set_not_ready(base, "BaseDeactivated", f"base {base_id} reported state {hb.state}")
            changed = True
        if changed:
            self.node_queue.add(base.node_name)

    def _set_not_ready(self, base: BaseState, reason: str, message: str) -> None:
        base.ready = False
        base.not_ready_reason, base.not_ready_message = reason, message
        log.warning("base %s is not ready: %s: %s", base.base_id, reason, message)
        self.node_queue.add(base.node_name)
        self._enqueue_pods_on(base.node_name)

    def _on_base_started(self, base: BaseState) -> None:
        """arklet asks for its baseline once per JVM start: a base that restarted may have lost
        every module, so look again before trusting what we knew."""
        base.inventory_known = False
        self._request_inventory(base, force=True)

    def _on_health(self, base: BaseState, report: arklet.HealthReport) -> None:
        if not report.ok:
            log.info("base %s health: %s %s", base.base_id, report.code, report.message)
            return
        before = base.health
        base.health = report
        if before and before.run_time_s is not None and report.run_time_s is not None:
            if report.run_time_s + 1 < before.run_time_s:
                self._on_base_started(base)
        if report.master_biz_state and report.master_biz_state != arklet.ACTIVATED and base.ready:
            self._set_not_ready(base, "BaseNotActivated", f"base master biz is {report.master_biz_state}")
        if before is None or (before.memory_bytes, before.cpu_count) != (report.memory_bytes, report.cpu_count):
            self.node_queue.add(base.node_name)

    def _on_inventory(self, base: BaseState, reported: list[arklet.BizStatus], ts: int) -> None:
        fresh: dict[str, BizRecord] = {}
        for b in reported:
            seen = base.biz_ts.get(b.key)
            if seen is not None and seen[0] > ts:
                continue  # a later reply already decided this module
            fresh[b.key] = BizRecord(b.name, b.version, b.state, b.change_time_ms, b.reason, b.message, ts=ts)
        for key, old in base.bizs.items():
            seen = base.biz_ts.get(key)
            if key not in fresh and seen is not None and seen[0] > ts:
                fresh[key] = old
        changed = fresh != base.bizs or not base.inventory_known
        base.bizs = fresh
        base.inventory_known = True
        if changed:
            self._enqueue_pods_on(base.node_name)
        if base.owned:
            self._check_orphans(base)

    def _on_biz_operation(self, base: BaseState, op: arklet.BizOperation, ts: int) -> None:
        topic = arklet.topic(self.opts.env, base.base_id, arklet.BIZ_OPERATION)
        seen = base.biz_ts.get(op.key)
        if seen is not None and (ts < seen[0] or (ts == seen[0] and seen[1] == op.command)):
            self._reject("stale", topic, f"{op.command} {op.key} at {ts} is not after {seen}")
            return
        base.biz_ts[op.key] = (ts, op.command)
        MQTT_HANDLED.labels(arklet.BIZ_OPERATION).inc()
        if op.command == arklet.CMD_INSTALL_BIZ:
            INSTALL_RESULTS.labels("success" if op.success else "failure").inc()
            if op.success:
                base.bizs[op.key] = BizRecord(op.biz_name, op.biz_version, op.biz_state or arklet.ACTIVATED, ts, ts=ts)
        elif op.success or "NOT_FOUND" in op.message.upper():
            base.bizs.pop(op.key, None)
        pod_key = base.pending.pop((op.command, op.key), None)
        log.debug("%s %s on %s: %s (for %s)", op.command, op.key, base.base_id, op.code, pod_key or "nobody")
        if pod_key:
            self._settle(pod_key, base, op)
        self._enqueue_pods_on(base.node_name)

    def _settle(self, pod_key: str, base: BaseState, op: arklet.BizOperation) -> None:
        rec = self.records.get(pod_key)
        pod = self.pods.get(pod_key)
        if rec is None:
            return
        # The Events this reply causes are written after the Pod's status (sync_pod runs next, the
        # Pod is queued below): the status is what makes the Pod Ready, and an Event written at the
        # same moment only competes with it for the API server.
        def event(type_: str, reason: str, message: str) -> None:
            if pod is not None:
                self._after_status.setdefault(pod_key, []).append((pod, type_, reason, message))

        for name, pend in list(rec.pending.items()):
            if pend.command != op.command or pend.module.biz_key != op.key:
                continue
            del rec.pending[name]
            if op.command == arklet.CMD_INSTALL_BIZ:
                if op.success:
                    rec.installed[name] = pend.module
                    rec.started[name] = iso()
                    rec.reply_at = time.monotonic()
                    rec.failed.pop(name, None)
                    event("Normal", "Installed", f"Installed module {op.key} on base {base.base_id}")
                else:
                    rec.failed[name] = (op.key, op.message or f"installBiz {op.key} failed: {op.code}")
                    event("Warning", "InstallFailed",
                          f"Base {base.base_id} failed to install {op.key}: {op.message or op.code}")
            else:
                inst = rec.installed.get(name)
                if inst is not None and inst.biz_key == op.key:
                    del rec.installed[name]
                    rec.started.pop(name, None)
                if not op.success and "NOT_FOUND" not in op.message.upper():
                    event("Warning", "UninstallFailed",
                          f"Base {base.base_id} failed to uninstall {op.key}: {op.message or op.code}")
                else:
                    event("Normal", "Uninstalled", f"Uninstalled module {op.key} from base {base.base_id}")
                if pod is not None and not (pod.get("metadata") or {}).get("deletionTimestamp"):
                    rec.restarts[name] = rec.restarts.get(name, 0) + 1

    def _check_orphans(self, base: BaseState) -> None:
        wanted: set[str] = {key for (cmd, key) in base.pending if cmd == arklet.CMD_UNINSTALL_BIZ}
        wanted |= {key for (cmd, key) in base.pending if cmd == arklet.CMD_INSTALL_BIZ}
        for pod in self.pods.by_index("node", base.node_name):
            for c in (pod.get("spec") or {}).get("containers") or []:
                if isinstance(c, dict):
                    wanted.add(module_from_container(c).biz_key)
            rec = self.records.get(object_key(pod))
            if rec:
                wanted |= {m.biz_key for m in rec.installed.values()}
        node = self.nodes.get(base.node_name)
        for key, biz in base.bizs.items():
            if key in wanted:
                base.orphans_reported.discard(key)
                continue
            if key in base.orphans_reported:
                continue
            base.orphans_reported.add(key)
            ORPHANS.inc()
            action = "uninstalling it (--orphan-policy=uninstall)" if self.opts.orphan_policy == "uninstall" else (
                "left in place; run the provider with --orphan-policy=uninstall to remove such modules"
            )
            log.warning("orphan module %s (%s) on base %s: no Pod on %s asks for it; %s",
                        key, biz.state, base.base_id, base.node_name, action)
            if node is not None:
                self._event(node, "Warning", "OrphanModule",
                            f"Module {key} ({biz.state.lower()}) is on base {base.base_id} but no Pod asks for it; {action}")
            if self.opts.orphan_policy == "uninstall":
                model = arklet.BizModel(biz.name, biz.version, "")
                base.pending[(arklet.CMD_UNINSTALL_BIZ, key)] = ""
                self._publish(base, arklet.CMD_UNINSTALL_BIZ, model)

    # --- MQTT out -----------------------------------------------------------------------------------

    def _publish(self, base: BaseState, command: str, model: arklet.BizModel | None = None) -> None:
        # Not retained (reference §8.4): a retained installBiz would be replayed to a restarted base.
        COMMANDS.labels(command).inc()
        qos = 1 if model is not None else 0
        self.tunnel.publish(arklet.topic(self.opts.env, base.base_id, command), arklet.encode_command(model), qos=qos)

    def _request_inventory(self, base: BaseState, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - base.inventory_requested_at < 1.0:
            return
        base.inventory_requested_at = now
        self._publish(base, arklet.CMD_QUERY_ALL_BIZ)

    # --- Kubernetes watch handlers --------------------------------------------------------------------

    def _on_pod(self, pod: dict[str, Any]) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node in self.by_node and is_module_pod(pod):
            key = object_key(pod)
            if key not in self.records and key not in self._first_seen:
                self._first_seen[key] = time.monotonic()
            self.pod_queue.add(key)

    def _on_pod_gone(self, pod: dict[str, Any]) -> None:
        self.finalized.discard(str((pod.get("metadata") or {}).get("uid", "")))
        self._on_pod(pod)

    def _on_node_update(self, _old: dict[str, Any], node: dict[str, Any]) -> None:
        """Someone else changed our Node: the node lifecycle controller setting Ready=Unknown after a
        slow Lease renewal, or a label or taint edited away. Put back what the base says; the
        controller never sets Ready=True itself."""
        name = (node.get("metadata") or {}).get("name", "")
        base = self.bases.get(self.by_node.get(name, ""))
        if base is None or not base.owned:
            return
        conds = (node.get("status") or {}).get("conditions") or []
        ready = next((c.get("status") for c in conds if c.get("type") == "Ready"), None)
        labels = (node.get("metadata") or {}).get("labels") or {}
        want_labels = vnode.node_labels(base, self.opts.node)
        if ready != ("True" if base.ready else "False") or any(labels.get(k) != v for k, v in want_labels.items()):
            self.node_queue.add(name)

    def _on_node_gone(self, node: dict[str, Any]) -> None:
        name = (node.get("metadata") or {}).get("name", "")
        if name in self.by_node:
            self.node_queue.add(name)  # deleted by someone else: recreated while the base lives

    def _enqueue_pods_on(self, node_name: str) -> None:
        for pod in self.pods.by_index("node", node_name):
            if is_module_pod(pod):
                self.pod_queue.add(object_key(pod))

    def _event(self, obj: dict[str, Any] | None, type_: str, reason: str, message: str) -> None:
        if obj is not None:
            self.events.event(obj, type_, reason, message, kind=obj.get("kind") or "Pod", api_version="v1")

    # --- Pods ---------------------------------------------------------------------------------------

    async def sync_pod(self, key: str) -> float | None:
        with POD_SYNC_SECONDS.time():
            try:
                return await self._sync_pod(key)
            finally:
                for pod, type_, reason, message in self._after_status.pop(key, ()):
                    self._event(self.pods.get(key) or pod, type_, reason, message)

    async def _sync_pod(self, key: str) -> float | None:
        pod = self.pods.get(key)
        if pod is None:
            self._forget_pod(key)
            return None
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        if uid in self.finalized or not is_module_pod(pod):
            return None
        base_id = self.by_node.get((pod.get("spec") or {}).get("nodeName") or "")
        base = self.bases.get(base_id or "")
        if base is None or not base.owned:
            return None
        rec = self.records.get(key)
        if rec is None or rec.uid != uid:
            rec = PodRecord.from_pod(pod)
            rec.node_name = base.node_name
            self.records[key] = rec
        if meta.get("deletionTimestamp"):
            return await self._sync_deleting(key, pod, rec, base)
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return None
        sent_before = len(base.pending)
        delay = self._drive(key, pod, rec, base)
        if len(base.pending) > sent_before and not rec.last_written:
            # Most installs answer within milliseconds: writing "Installing" first would put a
            # second etcd write in front of "Ready". Show it only if the base is still busy soon.
            return min(delay or STATUS_GRACE_S, STATUS_GRACE_S)
        await self._write_status(key, pod, rec, base)
        return delay

    def _forget_pod(self, key: str) -> None:
        """The Pod is gone from the API server without us uninstalling (force-deleted, or its Node
        was deleted): take its modules off the base unless another Pod there holds them."""
        self._first_seen.pop(key, None)
        rec = self.records.pop(key, None)
        base = self.bases.get(self.by_node.get(rec.node_name, "")) if rec else None
        if rec is None or base is None or not base.ready or not base.owned:
            return
        for module in rec.installed.values():
            if module.biz_key not in base.bizs or self._held_elsewhere(base, module.biz_key, key):
                continue
            base.pending[(arklet.CMD_UNINSTALL_BIZ, module.biz_key)] = ""
            self._publish(base, arklet.CMD_UNINSTALL_BIZ, _model(module))

    def _held_elsewhere(self, base: BaseState, biz_key: str, pod_key: str) -> bool:
        for pod in self.pods.by_index("node", base.node_name):
            other = object_key(pod)
            if other == pod_key or (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            rec = self.records.get(other)
            if rec and any(m.biz_key == biz_key for m in rec.installed.values()):
                return True
        return False

    def _send(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState, name: str, command: str,
              module: Module) -> None:
        rec.pending[name] = PendingOp(command, module, time.monotonic())
        base.pending[(command, module.biz_key)] = key
        self._publish(base, command, _model(module))
        seen = self._first_seen.pop(key, None)
        if seen is not None and command == arklet.CMD_INSTALL_BIZ:
            BOUND_TO_INSTALL.observe(time.monotonic() - seen)

    def _drive(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState) -> float | None:
        """Move the base one step towards the Pod's containers, in container order."""
        if not base.ready:
            return None
        now = time.monotonic()
        timeout = self.opts.install_timeout
        for c in (pod.get("spec") or {}).get("containers") or []:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                continue
            name = c["name"]
            desired = module_from_container(c)
            pend = rec.pending.get(name)
            if pend is not None:
                left = pend.sent_at + timeout - now
                if left > 0:
                    return left
                del rec.pending[name]
                base.pending.pop((pend.command, pend.module.biz_key), None)
                if pend.command == arklet.CMD_INSTALL_BIZ:
                    msg = f"base {base.base_id} did not answer installBiz {pend.module.biz_key} within {timeout:.0f}s"
                    rec.failed[name] = (pend.module.biz_key, msg)
                    self._event(pod, "Warning", "InstallFailed", msg)
                    continue
                rec.installed.pop(name, None)
            inst = rec.installed.get(name)
            if inst is not None and inst != desired:
                self._event(pod, "Normal", "Replacing",
                            f"Uninstalling {inst.biz_key} ({inst.biz_url}) from base {base.base_id} to install "
                            f"{desired.biz_key} ({desired.biz_url})")
                self._send(key, pod, rec, base, name, arklet.CMD_UNINSTALL_BIZ, inst)
                return timeout
            if inst is None:
                fail = rec.failed.get(name)
                if fail is not None and fail[0] == desired.biz_key:
                    continue
                if not base.inventory_known:
                    self._request_inventory(base)
                    return 1.0
                biz = base.bizs.get(desired.biz_key)
                if biz is not None and biz.state == arklet.ACTIVATED:
                    # Already there: after a provider restart, or installed for another Pod of the same
                    # module (a base holds one copy of a version; the Pods share it and the last one
                    # to go uninstalls it). Adopt it, never reinstall it.
                    if self._held_elsewhere(base, desired.biz_key, key):
                        self._event(pod, "Normal", "Installed",
                                    f"Module {desired.biz_key} is already installed on base {base.base_id} "
                                    "for another Pod; sharing it")
                    rec.installed[name] = desired
                    rec.started.setdefault(name, iso((biz.change_time_ms or biz.ts) / 1000))
                    continue
                self._event(pod, "Normal", "Installing",
                            f"Installing module {desired.biz_key} from {desired.biz_url} on base {base.base_id}")
                self._send(key, pod, rec, base, name, arklet.CMD_INSTALL_BIZ, desired)
                return timeout
            if base.inventory_known and desired.biz_key not in base.bizs:
                rec.installed.pop(name, None)
                rec.started.pop(name, None)
                rec.restarts[name] = rec.restarts.get(name, 0) + 1
                self._event(pod, "Warning", "ModuleLost",
                            f"Base {base.base_id} no longer has {desired.biz_key} (restarted?); installing it again")
                self._send(key, pod, rec, base, name, arklet.CMD_INSTALL_BIZ, desired)
                return timeout
        return None

    async def _write_status(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState) -> None:
        status = compute_status(pod, rec, base, base.ready)
        if not rec.start_time:
            rec.start_time = status["startTime"]
        current = pod.get("status") or {}
        # Compare with what the API server holds; our own last write stands in only while the cache
        # has not caught up with it. (Trusting our last write blindly would miss a status someone
        # else changed since, e.g. the node lifecycle controller marking Pods NotReady.)
        if rec.last_written is not None and _rv(pod) < rec.last_written_rv:
            current = rec.last_written
        if not status_changed(current, status):
            return
        meta = pod.get("metadata") or {}
        started = time.monotonic()
        if rec.reply_at:
            REPLY_TO_PATCH_SENT.observe(started - rec.reply_at)
        try:
            written = await self.kube.patch(pod_path(meta.get("namespace"), meta.get("name")), {"status": status},
                                            "strategic", subresource="status")
            log.debug("pod %s status %s written in %.1f ms", key, status["phase"], (time.monotonic() - started) * 1000)
            API_WRITES.labels("pod_status").inc()
            rec.last_written = status
            rec.last_written_rv = _rv(written)
            if rec.reply_at:
                REPLY_TO_STATUS.observe(time.monotonic() - rec.reply_at)
                rec.reply_at = 0.0
        except ApiError as exc:
            if exc.not_found:
                return
            raise

    async def _sync_deleting(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState) -> float | None:
        meta = pod.get("metadata") or {}
        now = time.monotonic()
        if base.ready:
            for name, module in list(rec.installed.items()):
                if name in rec.pending:
                    continue
                if module.biz_key not in base.bizs and base.inventory_known:
                    del rec.installed[name]
                    continue
                if self._held_elsewhere(base, module.biz_key, key):
                    del rec.installed[name]
                    continue
                if "Uninstalling" not in rec.events_sent:
                    rec.events_sent.add("Uninstalling")
                    self._event(pod, "Normal", "Uninstalling",
                                f"Uninstalling {', '.join(m.biz_key for m in rec.installed.values())} "
                                f"from base {base.base_id}")
                self._send(key, pod, rec, base, name, arklet.CMD_UNINSTALL_BIZ, module)
            for name, pend in list(rec.pending.items()):
                if now - pend.sent_at > self.opts.install_timeout:
                    del rec.pending[name]
            if rec.pending:
                deadline = _seconds_until(meta.get("deletionTimestamp"))
                if deadline > 0:
                    return min(deadline, 5.0)
                self._event(pod, "Warning", "UninstallTimeout",
                            f"Base {base.base_id} did not confirm the uninstall before the grace period ended; "
                            "deleting the Pod anyway")
        await self._final_delete(key, pod)
        return None

    async def _final_delete(self, key: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        try:
            await self.kube.delete(pod_path(meta.get("namespace"), meta.get("name")), grace_period_seconds=0,
                                   preconditions_uid=uid)
            API_WRITES.labels("pod_delete").inc()
        except ApiError as exc:
            if not exc.conflict:
                raise
        self.finalized.add(uid)
        rec = self.records.pop(key, None)
        if rec is not None:
            for base in self.bases.values():
                for k, waiting in list(base.pending.items()):
                    if waiting == key:
                        base.pending[k] = ""

    # --- Nodes and Leases ----------------------------------------------------------------------------

    async def sync_node(self, name: str) -> float | None:
        base = self.bases.get(self.by_node.get(name, ""))
        if base is None:
            return None
        if not base.owned:
            retry = await self._acquire_lease(base)
            if retry is not None:
                return retry
            self._enqueue_pods_on(name)
        now = iso()
        node = self.nodes.get(name)
        if node is None:
            try:
                created = await self.kube.create(node_path(), vnode.build_node(base, self.opts.node, now))
                API_WRITES.labels("node_create").inc()
                base.node_uid = str((created.get("metadata") or {}).get("uid", ""))
                log.info("created Node %s for base %s", name, base.base_id)
                await self._renew_lease(base)  # now with the Node as owner
                return None
            except ApiError as exc:
                if not exc.already_exists:
                    raise
                node = await self.kube.get(node_path(name))
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
        status = vnode.node_status(base, self.opts.node, old_status, now)
        if vnode.node_status_changed(old_status, status):
            await self.kube.patch(node_path(name), {"status": status}, "strategic", subresource="status")
            API_WRITES.labels("node_status").inc()
        return None

    async def _acquire_lease(self, base: BaseState) -> float | None:
        """Take the base's Lease if it is free or expired. None when this replica holds it now; else
        the seconds until it is worth looking again: just after the holder's Lease would expire, so
        a standby takes over as soon as the holder stops renewing, with one GET per Lease period."""
        path = lease_path(vnode.LEASE_NAMESPACE, base.node_name)
        me = self.opts.identity
        try:
            lease = await self.kube.get(path)
        except ApiError as exc:
            if not exc.not_found:
                raise
            try:
                created = await self.kube.create(
                    lease_path(vnode.LEASE_NAMESPACE), vnode.build_lease(base, me, self.opts.node)
                )
            except ApiError as exc2:
                if exc2.already_exists:
                    return 0.5  # another replica was first: read its Lease to learn when it expires
                raise
            API_WRITES.labels("lease").inc()
            base.lease_rv = str(created["metadata"]["resourceVersion"])
            base.owned = True
            return None
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        left = vnode.lease_seconds_left(lease)
        if holder != me and left >= 0:
            if base.owned:
                log.warning("base %s: Lease held by %s; leaving it to that replica", base.base_id, holder)
            base.owned = False
            return left + _LEASE_EXPIRY_MARGIN_S
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == me else 1)
        body = vnode.build_lease(base, me, self.opts.node, transitions)
        body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        if holder == me and spec.get("acquireTime"):
            body["spec"]["acquireTime"] = spec["acquireTime"]
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
        base.owned = True
        return None

    async def _renew_lease(self, base: BaseState) -> None:
        if not base.owned:
            return
        path = lease_path(vnode.LEASE_NAMESPACE, base.node_name)
        body = vnode.build_lease(base, self.opts.identity, self.opts.node)
        body["metadata"]["resourceVersion"] = base.lease_rv
        try:
            updated = await self.kube.replace(path, body)
            API_WRITES.labels("lease").inc()
            base.lease_rv = str(updated["metadata"]["resourceVersion"])
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                base.owned = False
                self.node_queue.add(base.node_name)  # re-acquire or step back
            else:
                log.warning("base %s: Lease renewal failed: %s", base.base_id, exc)

    # --- background loops ---------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        limit = self.opts.heartbeat_interval * self.opts.missed_heartbeats
        while True:
            await asyncio.sleep(min(1.0, self.opts.heartbeat_interval / 2))
            now = time.monotonic()
            ready = 0
            for base in list(self.bases.values()):
                silent = now - base.last_heard
                if base.ready and silent > limit:
                    self._set_not_ready(
                        base,
                        "BaseHeartbeatMissed",
                        f"no heartbeat from base {base.base_id} for {silent:.0f}s "
                        f"({self.opts.missed_heartbeats} missed at {self.opts.heartbeat_interval:g}s)",
                    )
                elif not base.ready and silent > self.opts.gone_after:
                    await self._forget_base(base)
                    continue
                ready += base.ready
            BASES.labels("true").set(ready)
            BASES.labels("false").set(len(self.bases) - ready)

    async def _forget_base(self, base: BaseState) -> None:
        log.warning("base %s silent for over %.0fs: deleting Node %s", base.base_id, self.opts.gone_after, base.node_name)
        self.bases.pop(base.base_id, None)
        self.by_node.pop(base.node_name, None)
        if not base.owned:
            return
        try:
            await self.kube.delete(node_path(base.node_name))
            await self.kube.delete(lease_path(vnode.LEASE_NAMESPACE, base.node_name))
            API_WRITES.labels("node_delete").inc()
        except ApiError as exc:
            log.warning("deleting Node %s failed: %s", base.node_name, exc)

    async def _lease_loop(self) -> None:
        """Renew every owned Lease once per interval, each at its own moment: renewing them all at
        once put hundreds of writes in front of the API server every interval, and a module's
        status write that fell into that burst waited behind them."""
        interval = self.opts.lease_renew_interval
        loop = asyncio.get_running_loop()
        renewing = self._renewing
        while True:
            started = loop.time()
            owned = [b for b in self.bases.values() if b.owned]
            # Spread over most of the interval; the rest absorbs slow renewals before the next round.
            step = interval * 0.8 / max(len(owned), 1)
            for i, base in enumerate(owned):
                wait = started + i * step - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not base.owned or len(renewing) >= _MAX_RENEWALS_IN_FLIGHT:
                    continue
                task = loop.create_task(self._renew_lease(base))
                renewing.add(task)
                task.add_done_callback(renewing.discard)
            await asyncio.sleep(max(0.1, started + interval - loop.time()))

    async def _resync_loop(self) -> None:
        last_health = time.monotonic()
        while True:
            await asyncio.sleep(self.opts.resync_interval)
            health = time.monotonic() - last_health >= self.opts.health_interval
            if health:
                last_health = time.monotonic()
            bases = [b for b in self.bases.values() if b.owned and b.ready]
            step = self.opts.resync_interval / max(len(bases), 1) / 2
            for base in bases:
                self._request_inventory(base)
                if health:
                    self._publish(base, arklet.CMD_HEALTH)
                if step > 0.001:
                    await asyncio.sleep(step)


def _rv(obj: dict[str, Any]) -> int:
    """resourceVersion as a number: opaque by contract, an etcd revision in practice; 0 if not."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _model(module: Module) -> arklet.BizModel:
    return arklet.BizModel(module.biz_name, module.biz_version, module.biz_url)


def _seconds_until(timestamp: Any) -> float:
    parsed = vnode.parse_micro_time(timestamp)
    if parsed is None:
        return 0.0
    return (parsed - _dt.datetime.now(_dt.UTC)).total_seconds()
