"""The Pod reconciler: kubelet's pod workers for module Pods on virtual Nodes.

Level-triggered: each sync compares what the Pod asks for (its containers) with what the base
reports (inventory and replies) and moves one step: admit or fail the Pod, install, adopt what is
already there, retry with backoff, uninstall on delete, and write the status that results. Replies
only speed this up; a lost, late, duplicated or replayed one changes nothing the next inventory
does not put right. One work queue, so each Pod has one writer.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from koupleless import arklet, keys
from koupleless.kube.client import ApiError, KubeClient, pod_path
from koupleless.kube.events import EventRecorder
from koupleless.kube.informer import object_key
from koupleless.kube.lease import parse_micro_time
from koupleless.kube.workqueue import WorkQueue
from koupleless.model import Module, is_module_pod, module_from_container, workload
from koupleless.model_rules import validate_pod
from provider.bases import BaseRegistry
from provider.commands import CommandSender
from provider.podsource import PodSource
from provider.podstatus import compute_status, iso, rejected_status, status_changed
from provider.state import BaseState, Failure, PendingOp, PodRecord

log = logging.getLogger(__name__)

API_WRITES = Counter("koupleless_provider_api_writes_total", "Writes to the API server", ["what"])
ORPHANS = Counter("koupleless_provider_orphan_modules_total", "Modules found on a base with no Pod asking for them")
LEFTOVERS = Counter(
    "koupleless_provider_leftover_uninstalls_total",
    "Modules this controller installed whose Pod is gone, uninstalled from their base",
)
REJECTED_PODS = Counter("koupleless_provider_rejected_pods_total", "Pods failed at admission, by reason", ["reason"])
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
REPLY_TO_PATCH_SENT = Histogram(
    "koupleless_provider_reply_to_status_patch_seconds",
    "From a base's installBiz reply arriving to the Pod status PATCH being sent: this process's own share "
    "of reply_to_status, the rest is the API server", buckets=_FINE,
)

#: How long a fresh Pod's "Installing" status waits for the base's answer before it is written.
STATUS_GRACE_S = 0.5
#: kubelet's CrashLoopBackOff: 10 s, doubling, at most 5 minutes.
RETRY_INITIAL_S = 10.0
RETRY_MAX_S = 300.0


@dataclass(frozen=True)
class PodOptions:
    install_timeout: float = 120.0
    orphan_policy: str = "report"
    workers: int = 16


class PodReconciler:
    def __init__(self, kube: KubeClient, registry: BaseRegistry, commands: CommandSender, pods: PodSource,
                 events: EventRecorder, opts: PodOptions) -> None:
        self.kube = kube
        self.registry = registry
        self.commands = commands
        self.pods = pods
        self.events = events
        self.opts = opts
        self.records: dict[str, PodRecord] = {}
        self.finalized: set[str] = set()
        self._first_seen: dict[str, float] = {}
        #: Pod key -> Events (type, reason, message) to write once its status write is done.
        self._after_status: dict[str, list[tuple[dict[str, Any], str, str, str]]] = {}
        self.queue = WorkQueue("pods", self.sync, workers=opts.workers)

    # --- what makes a Pod worth a look ---------------------------------------------------------------

    def on_pod(self, pod: dict[str, Any]) -> None:
        node = (pod.get("spec") or {}).get("nodeName") or ""
        if self.registry.for_node(node) is None:
            return
        key = object_key(pod)
        if key not in self.records and key not in self._first_seen:
            self._first_seen[key] = time.monotonic()
        self.queue.add(key)

    def on_pod_gone(self, pod: dict[str, Any]) -> None:
        self.finalized.discard(str((pod.get("metadata") or {}).get("uid", "")))
        self.on_pod(pod)

    def enqueue_node(self, node_name: str) -> None:
        for pod in self.pods.on_node(node_name):
            self.queue.add(object_key(pod))

    def event(self, obj: dict[str, Any] | None, type_: str, reason: str, message: str) -> None:
        if obj is not None:
            self.events.event(obj, type_, reason, message, kind=obj.get("kind") or "Pod", api_version="v1")

    # --- sync ---------------------------------------------------------------------------------------

    async def sync(self, key: str) -> float | None:
        with POD_SYNC_SECONDS.time():
            try:
                return await self._sync(key)
            finally:
                for pod, type_, reason, message in self._after_status.pop(key, ()):
                    self.event(self.pods.get(key) or pod, type_, reason, message)

    async def _sync(self, key: str) -> float | None:
        pod = self.pods.get(key)
        if pod is None:
            self._forget(key)
            return None
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        if uid in self.finalized:
            return None
        base = self.registry.for_node((pod.get("spec") or {}).get("nodeName") or "")
        if base is None or not base.owned:
            return None
        rec = self.records.get(key)
        if rec is None or rec.uid != uid:
            rec = PodRecord.from_pod(pod)
            rec.node_name = base.node_name
            base.managed.update(m.biz_key for m in rec.installed.values())
            self.records[key] = rec
        if meta.get("deletionTimestamp"):
            return await self._sync_deleting(key, pod, rec, base)
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return None
        refusal = self._admit(pod, rec, base)
        if refusal is not None:
            await self._fail(pod, base, *refusal)
            return None
        sent_before = len(base.pending)
        delay = self._drive(key, pod, rec, base)
        if len(base.pending) > sent_before and not rec.last_written:
            # Most installs answer within milliseconds: writing "Installing" first would put a
            # second etcd write in front of "Ready". Show it only if the base is still busy soon.
            return min(delay or STATUS_GRACE_S, STATUS_GRACE_S)
        await self._write_status(key, pod, rec, base)
        return delay

    # --- admission ------------------------------------------------------------------------------------

    def _admit(self, pod: dict[str, Any], rec: PodRecord, base: BaseState) -> tuple[str, str] | None:
        """Whether this base can run the Pod at all, decided once, as kubelet admits a Pod: None, or
        (reason, message) to fail it with."""
        if rec.admitted:
            return None
        node = base.node_name
        if not is_module_pod(pod):
            labels = (pod.get("metadata") or {}).get("labels") or {}
            seen = {k: v for k, v in labels.items() if "component" in k}
            said = f" (it has {', '.join(f'{k}={v}' for k, v in seen.items())})" if seen else ""
            return ("NotAModule",
                    f"Pod rejected: {node} is a Koupleless base and runs module Pods only, labelled "
                    f"{keys.LABEL_COMPONENT}={keys.COMPONENT_MODULE}{said}. It got here because it tolerates the "
                    f"taint {keys.TAINT_VIRTUAL_NODE}; keep such Pods off virtual Nodes with a node affinity "
                    f"{keys.LABEL_TYPE} NotIn [{keys.TYPE_VIRTUAL_KUBELET}]")
        problems = [p for p in validate_pod(pod) if p.severity == "error" and p.path.startswith("spec.containers")]
        if problems:
            return "InvalidModule", "Pod rejected: " + "; ".join(str(p) for p in problems)
        for c in (pod.get("spec") or {}).get("containers") or []:
            desired = module_from_container(c)
            holder = self._holder(base, desired.biz_name, object_key(pod))
            if holder is not None:
                other_key, other = holder
                other_pod = self.pods.get(other_key)
                if other.biz_version != desired.biz_version and other_pod is not None \
                        and workload(other_pod) is not None and workload(other_pod) == workload(pod):
                    continue  # the next version of the same workload: upgraded in place, as SOFAArk does
                return ("ModuleConflict",
                        f"Pod rejected: base {base.base_id} already runs {other.biz_key} for Pod {other_key}, and a "
                        f"base holds one copy of module {desired.biz_name}; schedule this Pod onto another base "
                        f"(the module scheduler does; a nodeName set by hand skips it)")
        rec.admitted = True
        return None

    def _holder(self, base: BaseState, biz_name: str, pod_key: str) -> tuple[str, Module] | None:
        """Another live, admitted Pod on the base that has (or is getting) a module of this name."""
        for other in self.pods.on_node(base.node_name):
            key = object_key(other)
            if key == pod_key or (other.get("metadata") or {}).get("deletionTimestamp"):
                continue
            if (other.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            rec = self.records.get(key)
            if rec is None or not rec.admitted:
                continue
            for module in [*rec.installed.values(), *(p.module for p in rec.pending.values())]:
                if module.biz_name == biz_name:
                    return key, module
            for c in (other.get("spec") or {}).get("containers") or []:
                module = module_from_container(c)
                if module.biz_name == biz_name:
                    return key, module
        return None

    async def _fail(self, pod: dict[str, Any], base: BaseState, reason: str, message: str) -> None:
        meta = pod.get("metadata") or {}
        REJECTED_PODS.labels(reason).inc()
        log.warning("pod %s/%s on %s: %s: %s", meta.get("namespace"), meta.get("name"), base.node_name, reason, message)
        try:
            await self.kube.patch(pod_path(meta.get("namespace"), meta.get("name")),
                                  {"status": rejected_status(pod, reason, message, base.ip)}, "strategic",
                                  subresource="status")
            API_WRITES.labels("pod_status").inc()
        except ApiError as exc:
            if not exc.not_found:
                raise
            return
        self.event(pod, "Warning", reason, message)

    # --- moving the base towards the Pod ------------------------------------------------------------

    def _send(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState, name: str, command: str,
              module: Module) -> None:
        connection = self.commands.connection_for(base)
        sent = self.commands.publish(base, command, _model(module))
        rec.pending[name] = PendingOp(command, module, time.monotonic() if sent and connection else None, connection)
        base.pending[(command, module.biz_key)] = key
        if command == arklet.CMD_INSTALL_BIZ:
            base.managed.add(module.biz_key)
            seen = self._first_seen.pop(key, None)
            if seen is not None:
                BOUND_TO_INSTALL.observe(time.monotonic() - seen)

    def _record_failure(self, pod: dict[str, Any], rec: PodRecord, name: str, biz_key: str, message: str) -> None:
        prev = rec.failed.get(name)
        attempts = prev.attempts + 1 if prev is not None and prev.biz_key == biz_key else 1
        backoff = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (attempts - 1))
        rec.failed[name] = Failure(biz_key, message, attempts, time.monotonic() + backoff, backoff)
        self._event_after_status(pod, "Warning", "InstallFailed", f"{message}; trying again in {backoff:.0f}s")

    def _event_after_status(self, pod: dict[str, Any], type_: str, reason: str, message: str) -> None:
        # Written after the Pod's status: the status is what makes the Pod Ready, and an Event
        # written at the same moment only competes with it for the API server.
        self._after_status.setdefault(object_key(pod), []).append((pod, type_, reason, message))

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
            observed = base.bizs.get(desired.biz_key)
            pend = rec.pending.get(name)
            if pend is not None:
                if pend.command == arklet.CMD_INSTALL_BIZ and observed is not None and observed.state == arklet.ACTIVATED \
                        and pend.module == desired:
                    # The base has it (a reply lost or still on its way): the inventory is the truth.
                    del rec.pending[name]
                    base.pending.pop((pend.command, pend.module.biz_key), None)
                elif pend.sent_at is None:
                    return None  # waits for the tunnel; sent again once the base is heard
                elif pend.sent_at + timeout > now:
                    return pend.sent_at + timeout - now
                else:
                    del rec.pending[name]
                    base.pending.pop((pend.command, pend.module.biz_key), None)
                    self.commands.request_inventory(base)
                    if pend.command == arklet.CMD_INSTALL_BIZ:
                        self._record_failure(pod, rec, name, pend.module.biz_key,
                                             f"base {base.base_id} did not answer installBiz {pend.module.biz_key} "
                                             f"within {timeout:.0f}s")
            if name in rec.mismatch:
                continue  # shown as VersionMismatch; trying again would install the same jar again
            inst = rec.installed.get(name)
            if inst is not None and (inst.biz_key, inst.biz_url) != (desired.biz_key, desired.biz_url):
                self._event_after_status(pod, "Normal", "Replacing",
                                         f"Uninstalling {inst.biz_key} ({inst.biz_url}) from base {base.base_id} to "
                                         f"install {desired.biz_key} ({desired.biz_url})")
                self._send(key, pod, rec, base, name, arklet.CMD_UNINSTALL_BIZ, inst)
                return timeout
            if observed is not None and observed.state == arklet.ACTIVATED:
                if inst is None:
                    # Already there: after a provider restart, a reply that came after its timeout,
                    # or a REPEAT_BIZ. Adopt it, never reinstall it.
                    rec.installed[name] = desired
                    rec.started.setdefault(name, iso((observed.change_time_ms or observed.ts) / 1000))
                    base.managed.add(desired.biz_key)
                    if rec.failed.pop(name, None) is not None:
                        self._event_after_status(pod, "Normal", "Installed",
                                                 f"Module {desired.biz_key} is active on base {base.base_id}")
                continue
            if inst is not None:
                if not base.inventory_known or observed is not None:
                    continue  # trust what we installed until an inventory says otherwise; show its state
                rec.installed.pop(name, None)
                rec.started.pop(name, None)
                rec.restarts[name] = rec.restarts.get(name, 0) + 1
                self._event_after_status(pod, "Warning", "ModuleLost",
                                         f"Base {base.base_id} no longer has {desired.biz_key} (restarted?); "
                                         "installing it again")
            fail = rec.failed.get(name)
            if fail is not None and fail.biz_key == desired.biz_key and fail.retry_at > now:
                return fail.retry_at - now
            if not base.inventory_known:
                self.commands.request_inventory(base)
                return 1.0
            if fail is None:
                self._event_after_status(pod, "Normal", "Installing",
                                         f"Installing module {desired.biz_key} from {desired.biz_url} on base "
                                         f"{base.base_id}")
            self._send(key, pod, rec, base, name, arklet.CMD_INSTALL_BIZ, desired)
            return timeout
        return None

    def redrive(self, base: BaseState) -> None:
        """The base is heard again on a new connection: what was sent before may never have reached
        it. Send every command still waiting again; the timeout counts from now."""
        for k, pod_key in list(base.pending.items()):
            if not pod_key:
                del base.pending[k]  # a leftover's uninstall: the next inventory asks again if needed
        for pod in self.pods.on_node(base.node_name):
            rec = self.records.get(object_key(pod))
            if rec is None:
                continue
            for pend in rec.pending.values():
                if pend.baseline:
                    continue  # the base's batch answer settles it; its timeout is the safety net
                if self.commands.publish(base, pend.command, _model(pend.module)):
                    pend.sent_at = time.monotonic() if self.commands.connection_for(base) else None
                    pend.connection = self.commands.connection_for(base)
            self.queue.add(object_key(pod))

    # --- replies ----------------------------------------------------------------------------------

    def on_call_failed(self, base: BaseState, command: str, biz_key: str, why: str) -> None:
        """A command that the tunnel knows got no answer (an HTTP call refused or timed out): what a
        timeout says, said now. A failed install is retried with back-off; a failed uninstall is sent
        again in RETRY_INITIAL_S; either way the base's module list is asked for, in case it acted."""
        pod_key = base.pending.get((command, biz_key))
        self.commands.request_inventory(base)
        rec = self.records.get(pod_key) if pod_key else None
        pod = self.pods.get(pod_key) if pod_key else None
        if rec is None or pod is None or not pod_key:
            base.pending.pop((command, biz_key), None)
            return
        for name, pend in list(rec.pending.items()):
            if pend.command != command or pend.module.biz_key != biz_key:
                continue
            if command == arklet.CMD_INSTALL_BIZ:
                del rec.pending[name]
                base.pending.pop((command, biz_key), None)
                self._record_failure(pod, rec, name, biz_key, f"installBiz {biz_key} on base {base.base_id} failed: {why}")
            elif pend.sent_at is not None:
                # Left pending (a Pod being deleted waits for it), due again in RETRY_INITIAL_S.
                pend.sent_at = min(pend.sent_at, time.monotonic() - self.opts.install_timeout + RETRY_INITIAL_S)
        self.queue.add(pod_key)

    def on_reply(self, base: BaseState, op: arklet.BizOperation) -> None:
        pod_key = base.pending.pop((op.command, op.key), None)
        log.debug("%s %s on %s: %s (for %s)", op.command, op.key, base.base_id, op.code, pod_key or "nobody")
        rec = self.records.get(pod_key) if pod_key else None
        pod = self.pods.get(pod_key) if pod_key else None
        if rec is not None and pod is not None and pod_key:
            self._settle(pod, rec, base, op)
            self.queue.add(pod_key)
        else:
            self.enqueue_node(base.node_name)
            if not pod_key:
                self.commands.request_inventory(base)  # a reply nobody waits for: look at what is true
        if op.command == arklet.CMD_INSTALL_BIZ and op.success and base.owned:
            self.sweep(base)  # an install that lands after its Pod went is taken off again
            if any(b.name == op.biz_name and b.key != op.installed_key for b in base.bizs.values()):
                # Another version of it is there (an upgrade in place): the base has just changed its
                # state, and only its module list says how.
                self.commands.request_inventory(base)

    def _settle(self, pod: dict[str, Any], rec: PodRecord, base: BaseState, op: arklet.BizOperation) -> None:
        for name, pend in list(rec.pending.items()):
            if pend.command != op.command or pend.module.biz_key != op.key:
                continue
            del rec.pending[name]
            if op.command == arklet.CMD_INSTALL_BIZ:
                if op.success or op.repeat:
                    installed = op.installed_key if op.success else op.key
                    rec.failed.pop(name, None)
                    rec.started[name] = iso()
                    rec.reply_at = time.monotonic()
                    base.managed.add(installed)
                    if installed != op.key:
                        version = installed.partition(":")[2]
                        rec.installed[name] = Module(pend.module.biz_name, version, pend.module.biz_url)
                        rec.mismatch[name] = (op.key, installed)
                        self._event_after_status(pod, "Warning", "VersionMismatch",
                                                 f"Base {base.base_id} installed {installed} from "
                                                 f"{pend.module.biz_url}, not the {op.key} the Pod asks for")
                    else:
                        rec.installed[name] = pend.module
                        self._event_after_status(pod, "Normal", "Installed",
                                                 f"Installed module {op.key} on base {base.base_id}")
                else:
                    self._record_failure(pod, rec, name, op.key,
                                         f"Base {base.base_id} failed to install {op.key}: {op.message or op.code}")
            else:
                inst = rec.installed.get(name)
                if inst is not None and inst.biz_key == op.key:
                    del rec.installed[name]
                    rec.started.pop(name, None)
                    rec.mismatch.pop(name, None)
                if op.success or op.not_found:
                    base.managed.discard(op.key)
                    self._event_after_status(pod, "Normal", "Uninstalled",
                                             f"Uninstalled module {op.key} from base {base.base_id}")
                else:
                    self._event_after_status(pod, "Warning", "UninstallFailed",
                                             f"Base {base.base_id} failed to uninstall {op.key}: {op.message or op.code}")
                if not (pod.get("metadata") or {}).get("deletionTimestamp"):
                    rec.restarts[name] = rec.restarts.get(name, 0) + 1

    # --- modules no Pod wants -----------------------------------------------------------------------

    def _wanted(self, base: BaseState) -> set[str]:
        wanted = {key for (_cmd, key), pod_key in base.pending.items() if pod_key}
        for pod in self.pods.on_node(base.node_name):
            rec = self.records.get(object_key(pod))
            if rec is not None:
                wanted |= {m.biz_key for m in rec.installed.values()}
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or not is_module_pod(pod):
                continue
            for c in (pod.get("spec") or {}).get("containers") or []:
                if isinstance(c, dict):
                    wanted.add(module_from_container(c).biz_key)
        return wanted

    def sweep(self, base: BaseState) -> None:
        """Modules on the base that no Pod wants: this controller's leftovers are uninstalled (a Pod
        deleted mid-install, evicted while its base was cut off); others are orphans, reported, and
        uninstalled only under --orphan-policy=uninstall."""
        wanted = self._wanted(base)
        busy = {key for (cmd, key) in base.pending if cmd == arklet.CMD_UNINSTALL_BIZ}
        node = None
        for key, biz in list(base.bizs.items()):
            if key in wanted or key in busy:
                base.orphans_reported.discard(key)
                continue
            if node is None:
                node = {"kind": "Node", "metadata": {"name": base.node_name, "uid": base.node_uid}}
            if key in base.managed:
                LEFTOVERS.inc()
                log.info("base %s: %s was installed for a Pod that is gone; uninstalling it", base.base_id, key)
                self.event(node, "Normal", "UninstallingLeftover",
                           f"Module {key} was installed for a Pod that is gone; uninstalling it from base {base.base_id}")
                self._uninstall_unowned(base, biz.name, biz.version)
                continue
            if key in base.orphans_reported:
                continue
            base.orphans_reported.add(key)
            ORPHANS.inc()
            action = "uninstalling it (--orphan-policy=uninstall)" if self.opts.orphan_policy == "uninstall" else (
                "left in place; run the provider with --orphan-policy=uninstall to remove such modules"
            )
            log.warning("orphan module %s (%s) on base %s: no Pod on %s asks for it; %s",
                        ascii(key), biz.state, base.base_id, base.node_name, action)
            self.event(node, "Warning", "OrphanModule",
                       f"Module {key} ({biz.state.lower()}) is on base {base.base_id} but no Pod asks for it; {action}")
            if self.opts.orphan_policy == "uninstall":
                self._uninstall_unowned(base, biz.name, biz.version)

    def _uninstall_unowned(self, base: BaseState, name: str, version: str) -> None:
        model = arklet.BizModel(name, version, "")
        base.pending[(arklet.CMD_UNINSTALL_BIZ, model.key)] = ""
        self.commands.publish(base, arklet.CMD_UNINSTALL_BIZ, model)

    # --- status -------------------------------------------------------------------------------------

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

    # --- deletion -----------------------------------------------------------------------------------

    async def _sync_deleting(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState) -> float | None:
        """Uninstall whatever the base holds for this Pod, then delete it for good. A base that
        cannot be reached does not hold the deletion up: what it still has is a leftover, taken off
        when it is heard again."""
        meta = pod.get("metadata") or {}
        now = time.monotonic()
        if base.ready and (rec.admitted or rec.installed):
            wait = self._uninstall_for(key, pod, rec, base, now)
            if wait is not None:
                deadline = _seconds_until(meta.get("deletionTimestamp"))
                if deadline > 0:
                    return min(deadline, wait, 5.0)
                if any(p.command == arklet.CMD_UNINSTALL_BIZ for p in rec.pending.values()):
                    self.event(pod, "Warning", "UninstallTimeout",
                               f"Base {base.base_id} did not confirm the uninstall before the grace period ended; "
                               "deleting the Pod anyway (what it still holds is uninstalled once it answers)")
        await self._final_delete(key, pod)
        return None

    def _uninstall_for(self, key: str, pod: dict[str, Any], rec: PodRecord, base: BaseState, now: float) -> float | None:
        """Send the uninstalls this Pod needs; seconds to wait for replies, or None when done."""
        timeout = self.opts.install_timeout
        wait: float | None = None
        for c in (pod.get("spec") or {}).get("containers") or []:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                continue
            name = c["name"]
            pend = rec.pending.get(name)
            if pend is not None:
                if pend.sent_at is None or pend.sent_at + timeout > now:
                    # An install still in flight is waited for: when it lands it is uninstalled.
                    left = timeout if pend.sent_at is None else pend.sent_at + timeout - now
                    wait = left if wait is None else min(wait, left)
                    continue
                del rec.pending[name]
                base.pending.pop((pend.command, pend.module.biz_key), None)
            target = rec.installed.get(name)
            desired = module_from_container(c)
            if target is None and rec.admitted and desired.biz_key in base.bizs:
                target = desired  # installed for us, the reply lost
            if target is None:
                continue
            if base.inventory_known and target.biz_key not in base.bizs:
                del rec.installed[name]
                continue
            if self._held_elsewhere(base, target.biz_key, key):
                del rec.installed[name]
                continue
            if "Uninstalling" not in rec.events_sent:
                rec.events_sent.add("Uninstalling")
                self.event(pod, "Normal", "Uninstalling", f"Uninstalling {target.biz_key} from base {base.base_id}")
            self._send(key, pod, rec, base, name, arklet.CMD_UNINSTALL_BIZ, target)
            wait = timeout if wait is None else min(wait, timeout)
        return wait

    async def _final_delete(self, key: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        try:
            await self.kube.delete(pod_path(meta.get("namespace"), meta.get("name")), grace_period_seconds=0,
                                   preconditions_uid=uid)
            API_WRITES.labels("pod_delete").inc()
        except ApiError as exc:
            if not (exc.conflict or exc.not_found):
                raise
        self.finalized.add(uid)
        self._drop_record(key)

    def _drop_record(self, key: str) -> None:
        self._first_seen.pop(key, None)
        rec = self.records.pop(key, None)
        if rec is None:
            return
        base = self.registry.for_node(rec.node_name)
        if base is None:
            return
        for k, waiting in list(base.pending.items()):
            if waiting == key:
                base.pending[k] = ""

    def _forget(self, key: str) -> None:
        """The Pod is gone from the API server without us uninstalling (force-deleted, or its Node
        was deleted): take its modules off the base unless another Pod there holds them."""
        rec = self.records.get(key)
        base = self.registry.for_node(rec.node_name) if rec else None
        self._drop_record(key)
        if base is not None and base.ready and base.owned:
            self.sweep(base)

    def _held_elsewhere(self, base: BaseState, biz_key: str, pod_key: str) -> bool:
        for pod in self.pods.on_node(base.node_name):
            other = object_key(pod)
            if other == pod_key or (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            rec = self.records.get(other)
            if rec and any(m.biz_key == biz_key for m in rec.installed.values()):
                return True
        return False


def _rv(obj: dict[str, Any]) -> int:
    """resourceVersion as a number: opaque by contract, an etcd revision in practice; 0 if not."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _model(module: Module) -> arklet.BizModel:
    return arklet.BizModel(module.biz_name, module.biz_version, module.biz_url)


def _seconds_until(timestamp: Any) -> float:
    parsed = parse_micro_time(timestamp)
    if parsed is None:
        return 0.0
    return (parsed - _dt.datetime.now(_dt.UTC)).total_seconds()
