"""What a simulated base sends, per Koupleless runtime version: `base-sim --dialect`.

- `current` (runtime >= 1.4): heartbeat `{baseMetadata, localIP, localHostName, port, state}` every
  10 s under a stable base ID, queryBaseline on every start, queryAllBiz answered on base/simpleBiz,
  every install or uninstall answered on base/bizOperation naming the biz.
- `1.3.0` (runtime 1.3.0-1.3.1, 2.1.5-2.1.6): heartbeat `{masterBizInfo: {name, version},
  networkInfo: {localIP, localHostName}, state: "ACTIVATED"}` every 120 s under a random UUID per JVM
  start, no queryBaseline (baselines came with 1.4), queryAllBiz answered on base/biz as
  `{code, message, data: [ArkBizInfo]}`; a successful install is answered only by an unsolicited
  base/biz full list, a failure by bizOperation `{command, response}` naming no biz. base-sim answers
  a successful uninstall the same way as an install (the provider copes with either).
- `1.3.2` (runtime 1.3.2, 2.1.7): the old heartbeat shape and UUID base ID, but simpleBiz, 10 s
  heartbeats and bizOperation replies naming the biz, as `current`.

The wire shapes live here so that BaseSimulator only asks which to send.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from koupleless import arklet, arklet_base_payloads


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    #: `{masterBizInfo, networkInfo, state}` instead of `{baseMetadata, ...}`.
    legacy_heartbeat: bool
    #: A random UUID as base ID, new on every JVM start, instead of a stable identity.
    uuid_ids: bool
    heartbeat_s: float
    #: Asks for its baseline (queryBaseline) on start and batch-installs a base/baseline answer.
    baselines: bool
    #: Where queryAllBiz is answered: base/simpleBiz or (older) base/biz.
    inventory_topic: str
    #: A successful install or uninstall is answered on base/bizOperation (else only by base/biz).
    success_replies: bool
    #: bizOperation names the biz (bizName, bizVersion).
    names_in_replies: bool


CURRENT = Dialect("current", False, False, 10.0, True, arklet.SIMPLE_BIZ, True, True)
RUNTIME_1_3_0 = Dialect("1.3.0", True, True, 120.0, False, arklet.BIZ, False, False)
RUNTIME_1_3_2 = Dialect("1.3.2", True, True, 10.0, False, arklet.SIMPLE_BIZ, True, True)
DIALECTS = {d.name: d for d in (CURRENT, RUNTIME_1_3_0, RUNTIME_1_3_2)}


def new_jvm_id() -> str:
    """The base ID an old runtime picks on each JVM start."""
    return str(uuid.uuid4())


def heartbeat_data(dialect: Dialect, hb: arklet.Heartbeat) -> dict[str, Any]:
    if not dialect.legacy_heartbeat:
        return hb.to_wire()
    return {
        "masterBizInfo": {"name": hb.metadata.name, "version": hb.metadata.version},
        "networkInfo": {"localIP": hb.local_ip, "localHostName": hb.local_hostname},
        "state": hb.state.upper(),
    }


def ark_biz_info(status: arklet.BizStatus) -> dict[str, Any]:
    """One ArkBizInfo of the older queryAllBiz answer."""
    return {
        "bizName": status.name,
        "bizState": status.state.lower(),
        "bizVersion": status.version,
        "mainClass": f"com.example.{status.name.replace('-', '_')}.Application",
        "webContextPath": status.name,
        "bizStateRecords": [
            {"changeTime": status.change_time_ms, "state": status.state, "reason": status.reason or None,
             "message": status.message or None}
        ],
    }


def inventory(dialect: Dialect, modules: list[arklet.BizStatus]) -> tuple[str, Any]:
    """(topic kind, data) of a queryAllBiz answer."""
    if dialect.inventory_topic == arklet.BIZ:
        return arklet.BIZ, {"code": arklet.CODE_SUCCESS, "message": "", "data": [ark_biz_info(m) for m in modules]}
    return arklet.SIMPLE_BIZ, [arklet_base_payloads.simple_biz_item(m) for m in modules]


def operation_reply(dialect: Dialect, data: dict[str, Any]) -> dict[str, Any] | None:
    """What this dialect publishes on base/bizOperation for a reply of the current shape (see
    arklet_base_payloads.biz_operation_data); None when it answers with its full module list instead."""
    ok = data["response"]["code"] == arklet.CODE_SUCCESS
    if ok and not dialect.success_replies:
        return None
    if dialect.names_in_replies:
        return data
    return {"command": data["command"], "response": data["response"]}
