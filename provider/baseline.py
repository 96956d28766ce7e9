"""The answer to a base's queryBaseline: the modules of the Pods bound to its Node, in one message.

arklet asks once per JVM start, before its first heartbeat, and (runtime >= 1.4.1) installs the
whole answer as one batch, replying on base/batchInstallBizResponse. A base that restarted empty is
then whole again in one round trip instead of one installBiz per module after the provider notices
the loss. Each module sent is in flight for its Pod exactly as an installBiz would be: the batch
answer settles it, and if that never comes the usual install timeout and retry take over.
A new base has no Pods yet and gets an empty baseline.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from koupleless import arklet
from koupleless.kube.informer import object_key
from koupleless.model import is_module_pod, module_from_container
from provider.pods import PodReconciler
from provider.state import BaseState, PendingOp

log = logging.getLogger(__name__)


def _live_module_pods(pods: PodReconciler, base: BaseState) -> list[dict[str, Any]]:
    return [
        pod for pod in pods.pods.on_node(base.node_name)
        if not (pod.get("metadata") or {}).get("deletionTimestamp") and is_module_pod(pod)
        and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]


def baseline_models(pods: PodReconciler, base: BaseState) -> list[arklet.BizModel]:
    """What the base's live module Pods ask for, in Pod and container order, claiming nothing: the
    answer of a replica that does not hold the base's Lease (the holder's own sync installs them)."""
    by_key: dict[str, arklet.BizModel] = {}
    for pod in _live_module_pods(pods, base):
        for c in (pod.get("spec") or {}).get("containers") or []:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                m = module_from_container(c)
                by_key.setdefault(m.biz_key, arklet.BizModel(m.biz_name, m.biz_version, m.biz_url))
    return list(by_key.values())


def claim_baseline(pods: PodReconciler, base: BaseState, connection: int) -> list[arklet.BizModel]:
    """The modules the base's Pods ask for, each marked in flight for its Pod as sent now on
    `connection` (0: not connected, the timeout then counts from the next send)."""
    now = time.monotonic()
    by_url: dict[str, arklet.BizModel] = {}
    for pod in _live_module_pods(pods, base):
        meta = pod.get("metadata") or {}
        key = object_key(pod)
        rec = pods.records.get(key)
        if rec is None or not rec.admitted or rec.uid != str(meta.get("uid", "")):
            continue  # not admitted yet: its own sync installs it
        for c in (pod.get("spec") or {}).get("containers") or []:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                continue
            name = c["name"]
            desired = module_from_container(c)
            if name in rec.pending or name in rec.mismatch or name in rec.failed or desired.biz_url in by_url:
                continue  # busy, or retried on its own backoff
            if name in rec.installed:
                rec.restarts[name] = rec.restarts.get(name, 0) + 1
                pods.event(pod, "Warning", "ModuleLost",
                           f"Base {base.base_id} restarted without {desired.biz_key}; reinstalling it with the "
                           "base's baseline")
            rec.pending[name] = PendingOp(arklet.CMD_INSTALL_BIZ, desired, now if connection else None, connection,
                                          baseline=True)
            base.pending[(arklet.CMD_INSTALL_BIZ, desired.biz_key)] = key
            base.managed.add(desired.biz_key)
            by_url[desired.biz_url] = arklet.BizModel(desired.biz_name, desired.biz_version, desired.biz_url)
        pods.queue.add(key)
    base.baseline = by_url
    return list(by_url.values())
