"""A module Pod's status from what the base reports: the kubelet's job, as a pure function.

One containerStatus per container (= module): running when the base reports the module ACTIVATED,
waiting with the base's own reason otherwise; the Pod is Ready when every module is. podIP and hostIP
are the base's IP, so `kubectl get pod --field-selector status.podIP=<baseIP>` finds a base's modules.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from koupleless import arklet
from koupleless.model import Module, module_from_container
from provider.state import BaseState, PodRecord, container_id

OUR_CONDITIONS = ("PodScheduled", "Initialized", "ContainersReady", "Ready")


def iso(ts: float | None = None) -> str:
    t = dt.datetime.now(dt.UTC) if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _waiting(reason: str, message: str) -> dict[str, Any]:
    return {"waiting": {"reason": reason, "message": message}}


def container_state(
    name: str, desired: Module, rec: PodRecord, base: BaseState | None, deleting: bool
) -> tuple[dict[str, Any], bool, Module | None]:
    """(state, running, the module whose image the status names)."""
    inst = rec.installed.get(name)
    pend = rec.pending.get(name)
    biz = base.bizs.get(inst.biz_key) if (inst and base) else None
    base_id = base.base_id if base else "?"
    mismatch = rec.mismatch.get(name)
    if mismatch is not None and pend is None:
        wanted, got = mismatch
        got_version = got.partition(":")[2]
        return _waiting(
            "VersionMismatch",
            f"base {base_id} installed {got} from {desired.biz_url} (the version inside the jar), but the Pod asks "
            f"for {wanted}: set BIZ_VERSION to {got_version}, or point the image at the jar of {wanted}",
        ), False, inst
    if pend is not None and pend.command == arklet.CMD_UNINSTALL_BIZ:
        reason = "Uninstalling" if deleting or pend.module == desired or inst is None else "Replacing"
        msg = f"uninstallBiz {pend.module.biz_key} sent to base {base_id}"
        if reason == "Replacing":
            msg += f"; {desired.biz_key} from {desired.biz_url} is installed next"
        return _waiting(reason, msg), False, inst
    if inst is not None and biz is not None:
        if biz.state == arklet.ACTIVATED:
            started = rec.started.get(name) or iso((biz.change_time_ms or biz.ts) / 1000)
            return {"running": {"startedAt": started}}, True, inst
        if biz.state == arklet.DEACTIVATED:
            why = biz.message or f"the base deactivated {inst.biz_key}"
            return _waiting("ModuleDeactivated", why), False, inst
        if biz.state == arklet.BROKEN:
            return _waiting("InstallFailed", biz.message or f"{inst.biz_key} is broken on base {base_id}"), False, inst
        return _waiting("Installing", f"{inst.biz_key} is {biz.state.lower()} on base {base_id}"), False, inst
    if pend is not None:
        return _waiting("Installing", f"installBiz {pend.module.biz_key} sent to base {base_id}"), False, pend.module
    fail = rec.failed.get(name)
    if fail is not None and fail.biz_key == desired.biz_key:
        tries = "1 try" if fail.attempts == 1 else f"{fail.attempts} tries"
        return _waiting("InstallFailed", f"{fail.message} ({tries}; trying again {fail.backoff:.0f}s after the last)"), \
            False, desired
    if inst is not None:
        if base is not None and base.inventory_known:
            return _waiting("ModuleMissing", f"base {base_id} no longer has {inst.biz_key}; reinstalling"), False, inst
        if name in rec.started:
            return {"running": {"startedAt": rec.started[name]}}, True, inst
        return _waiting("Installing", f"waiting for base {base_id} to report {inst.biz_key}"), False, inst
    return _waiting("ContainerCreating", f"{desired.biz_key} is installed on base {base_id} in container order"), False, None


def compute_status(
    pod: dict[str, Any], rec: PodRecord, base: BaseState | None, node_ready: bool, now: str | None = None
) -> dict[str, Any]:
    now = now or iso()
    spec = pod.get("spec") or {}
    old = pod.get("status") or {}
    deleting = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    statuses = []
    all_ready = True
    any_started = False
    for c in spec.get("containers") or []:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            continue
        name = c["name"]
        desired = module_from_container(c)
        state, running, shown = container_state(name, desired, rec, base, deleting)
        current = shown == desired
        ready = running and current and node_ready
        all_ready = all_ready and ready
        any_started = any_started or running or name in rec.started
        image = shown.biz_url if shown else desired.biz_url
        cs: dict[str, Any] = {
            "name": name,
            "image": image,
            "imageID": image,
            "ready": ready,
            "started": running,
            "restartCount": rec.restarts.get(name, 0),
            "state": state,
        }
        inst = rec.installed.get(name)
        if inst is not None:
            cs["containerID"] = container_id(inst)
        statuses.append(cs)
    if not statuses:
        all_ready = False
    phase = "Running" if (all_ready or any_started) else "Pending"
    if old.get("phase") == "Running":
        phase = "Running"  # a Pod phase never goes back (a module being reinstalled is not Ready)
    ip = base.ip if base else ""
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": _conditions(old, all_ready, now),
        "containerStatuses": statuses,
        "startTime": rec.start_time or old.get("startTime") or now,
    }
    if ip:
        status.update(hostIP=ip, hostIPs=[{"ip": ip}], podIP=ip, podIPs=[{"ip": ip}])
    return status


def rejected_status(pod: dict[str, Any], reason: str, message: str, ip: str, now: str | None = None) -> dict[str, Any]:
    """A Pod this base will not run, failed as kubelet fails a Pod it does not admit: its controller
    replaces it and the scheduler places the replacement elsewhere."""
    now = now or iso()
    old = pod.get("status") or {}
    status: dict[str, Any] = {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "conditions": _conditions(old, False, now),
        "startTime": old.get("startTime") or now,
    }
    if ip:
        status.update(hostIP=ip, hostIPs=[{"ip": ip}])
    return status


def _conditions(old: dict[str, Any], ready: bool, now: str) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, dict)}
    wanted = {"PodScheduled": True, "Initialized": True, "ContainersReady": ready, "Ready": ready}
    out = []
    for ctype in OUR_CONDITIONS:
        value = "True" if wanted[ctype] else "False"
        prev = before.get(ctype) or {}
        cond: dict[str, Any] = {"type": ctype, "status": value, "lastProbeTime": None}
        cond["lastTransitionTime"] = prev.get("lastTransitionTime") if prev.get("status") == value else now
        if not wanted[ctype]:
            cond["reason"] = "ContainersNotReady"
        out.append(cond)
    return out


def _pruned(value: Any) -> Any:
    """Without empty values: the API server stores `lastState: {}` and drops nulls, so a status read
    back must compare equal to the one written."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def status_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether writing `new` would change what a user sees (times of unchanged conditions aside)."""
    for key in ("phase", "reason", "message", "containerStatuses", "startTime", "podIP", "hostIP"):
        was, will = old.get(key), new.get(key)
        # Equal as they are is the usual case (every inventory sweep asks); prune only to be sure
        # a difference is not just an empty value the API server added or dropped.
        if was != will and _pruned(was) != _pruned(will):
            return True
    before = {c.get("type"): c.get("status") for c in old.get("conditions") or [] if isinstance(c, dict)}
    return any(before.get(c["type"]) != c["status"] for c in new["conditions"])
