"""What a base publishes, built: the data of its replies and reports, in arklet's shapes.

The base's side of the arklet protocol; koupleless.arklet holds the topics, the envelope and the
parsers the controller reads these with. provider/basesim*.py speaks through these builders, and
tests use them to forge messages. Each returns plain JSON values (a whole `data`, or one item of
one); koupleless.arklet.encode_envelope wraps a `data` for publishing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from koupleless.arklet import (
    ACTIVATED,
    BATCH_INSTALL_COMMAND,
    CMD_INSTALL_BIZ,
    CODE_FAILED,
    CODE_SUCCESS,
    BizModel,
    BizStatus,
)


def simple_biz_item(status: BizStatus) -> dict[str, Any]:
    return {
        "name": status.name,
        "version": status.version,
        "state": status.state.lower(),
        "latestStateRecord": {
            "changeTime": status.change_time_ms,
            "state": status.state,
            "reason": status.reason or None,
            "message": status.message or None,
        },
    }


def biz_operation_data(
    command: str,
    model: BizModel,
    code: str,
    message: str = "",
    biz_state: str = "",
    elapsed: int = 0,
    *,
    installed: BizModel | None = None,
    detail_code: str = "",
) -> dict[str, Any]:
    """A bizOperation reply. The top level echoes the request (`model`); for an install,
    `data.bizInfos[0]` names what the base actually installed (`installed`, default the request:
    arklet reads the version from the jar, which may differ from the one asked for).
    `detail_code` is SOFAArk's own code in `data.code` (e.g. REPEAT_BIZ), default `code`."""
    inner: dict[str, Any] = {"code": detail_code or code, "message": message}
    if command == CMD_INSTALL_BIZ:
        biz = installed or model
        inner["elapsedSpace"] = elapsed
        inner["bizInfos"] = [biz_info(biz, biz_state)] if biz_state else []
    return {
        "command": command,
        "bizName": model.biz_name,
        "bizVersion": model.biz_version,
        "response": {"code": code, "message": message if code != CODE_SUCCESS else "", "data": inner},
    }


def biz_info(model: BizModel, biz_state: str) -> dict[str, str]:
    """One `bizInfos` item: a biz as SOFAArk describes it after an install."""
    return {"bizName": model.biz_name, "bizVersion": model.biz_version, "bizState": biz_state.lower()}


def batch_install_entry(
    code: str, message: str = "", installed: BizModel | None = None, biz_state: str = ""
) -> dict[str, Any]:
    """One `bizUrlToResponse` value: how installing one baseline jar went."""
    return {
        "code": code,
        "message": message,
        "bizInfos": [biz_info(installed, biz_state)] if installed is not None and biz_state else [],
    }


def batch_install_response_data(entries: Mapping[str, Mapping[str, Any]], elapsed: int = 0) -> dict[str, Any]:
    """A batchInstallBizResponse (the answer to a baseline): `entries` maps each bizUrl to its
    `batch_install_entry`. The batch succeeds only if every entry did, as in arklet."""
    ok = all(e.get("code") == CODE_SUCCESS for e in entries.values())
    code = CODE_SUCCESS if ok else CODE_FAILED
    message = "" if ok else "batch install biz not all succeeded"
    return {
        "command": BATCH_INSTALL_COMMAND,
        "response": {
            "code": code,
            "message": message,
            "data": {
                "code": code,
                "message": message,
                "elapsedSpace": elapsed,
                "bizUrlToResponse": {url: dict(e) for url, e in entries.items()},
            },
        },
    }


def health_data(
    memory_mb: int,
    cpu_count: int,
    run_time_s: float,
    master_state: str = ACTIVATED,
    master_name: str = "base",
    *,
    metrics: bool = True,
) -> dict[str, Any]:
    """A health answer. `metrics=False` leaves out `jvm` and `cpu`, as arklet's first answer after
    a start does (it registers those indicators only once its tunnel is connected)."""
    health: dict[str, Any] = {}
    if metrics:
        health["jvm"] = {
            "max memory(M)": memory_mb,
            "total memory(M)": memory_mb // 2,
            "free memory(M)": memory_mb // 4,
            "run time(s)": run_time_s,
            "java max metaspace": -1,
            "java committed metaspace": 64 * 1024 * 1024,
        }
        health["cpu"] = {"count": cpu_count, "type": "sim", "total used (%)": 1.0, "free (%)": 99.0}
    health["masterBizInfo"] = {"bizName": master_name, "bizState": master_state.lower(), "bizVersion": ""}
    return {"code": CODE_SUCCESS, "message": "", "data": {"healthData": health}}
