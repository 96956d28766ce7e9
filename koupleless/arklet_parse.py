"""What a base sends, read without trusting its shape: heartbeats of both dialects, health,
queryAllBiz replies, install/uninstall replies, and (on the base-sim side) a command's BizModel.

Each parser takes the envelope's `data` as plain JSON values and returns koupleless.arklet's
dataclasses, or raises `ArkletError` naming the field's path, what is wrong with it and what a base
should send instead. The want_* helpers are those checks one field at a time (koupleless.arklet_replies
uses them too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from koupleless.arklet import (
    CMD_INSTALL_BIZ,
    CMD_UNINSTALL_BIZ,
    CODE_SUCCESS,
    DIALECT_LEGACY,
    ArkletError,
    BaseMetadata,
    BizModel,
    BizOperation,
    BizStatus,
    HealthReport,
    Heartbeat,
    decode_json,
    type_name,
)


def parse_heartbeat(data: Any, topic_base_id: str) -> Heartbeat:
    """Either dialect, told apart by its shape: `baseMetadata` (runtime >= 1.4) or `masterBizInfo`
    (runtime 1.3.x, 2.1.5-2.1.7)."""
    obj = want_object(data, "data", "a BaseStatus object")
    if "baseMetadata" not in obj and "masterBizInfo" in obj:
        return parse_legacy_heartbeat(obj, topic_base_id)
    if "baseMetadata" not in obj:
        raise ArkletError(
            "wrong_type", "data.baseMetadata", "is missing (and so is data.masterBizInfo)",
            "send {baseMetadata: {identity, name, version, clusterName}, localIP, localHostName, port, state} "
            "(runtime >= 1.4) or {masterBizInfo: {name, version}, networkInfo: {localIP, localHostName}, state} "
            "(runtime 1.3.x)",
        )
    meta = want_object(obj.get("baseMetadata"), "data.baseMetadata", "{identity, name, version, clusterName}")
    identity = want_string(meta, "identity", "data.baseMetadata", required=True)
    if identity != topic_base_id:
        raise ArkletError(
            "identity_mismatch",
            "data.baseMetadata.identity",
            f"{identity!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<identity>/base/heart with the same identity",
        )
    port = obj.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int | float | type(None)):
        raise ArkletError("wrong_type", "data.port", f"expected a number, got {type_name(port)}", "send 0 over MQTT")
    state = want_string(obj, "state", "data", required=True).upper()
    return Heartbeat(
        metadata=BaseMetadata(
            identity=identity,
            name=want_string(meta, "name", "data.baseMetadata"),
            version=want_string(meta, "version", "data.baseMetadata"),
            cluster_name=want_string(meta, "clusterName", "data.baseMetadata"),
        ),
        local_ip=want_string(obj, "localIP", "data"),
        local_hostname=want_string(obj, "localHostName", "data"),
        port=int(port or 0),
        state=state,
    )


def parse_legacy_heartbeat(obj: Mapping[str, Any], topic_base_id: str) -> Heartbeat:
    """Runtime 1.3.x / 2.1.5-2.1.7: `{masterBizInfo: {name, version}, networkInfo: {localIP,
    localHostName[, arkletPort]}, state}`. The base is named only by its topic (a random UUID per
    JVM start); it has no cluster name, so its own name stands for it: all bases of one application
    form one cluster, as the cluster name is used for."""
    master = want_object(obj.get("masterBizInfo"), "data.masterBizInfo", "{name, version}")
    network = want_object(obj.get("networkInfo", {}), "data.networkInfo", "{localIP, localHostName}")
    named = obj.get("baseID")
    if named is not None and named != topic_base_id:
        raise ArkletError(
            "identity_mismatch", "data.baseID", f"{named!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<baseID>/base/heart with the same baseID",
        )
    port = network.get("arkletPort", 0)
    if isinstance(port, bool) or not isinstance(port, int | float | type(None)):
        raise ArkletError("wrong_type", "data.networkInfo.arkletPort", f"expected a number, got {type_name(port)}",
                          "send the arklet port as a number")
    name = want_string(master, "name", "data.masterBizInfo")
    return Heartbeat(
        metadata=BaseMetadata(
            identity=topic_base_id,
            name=name,
            version=want_string(master, "version", "data.masterBizInfo"),
            cluster_name=name,
        ),
        local_ip=want_string(network, "localIP", "data.networkInfo"),
        local_hostname=want_string(network, "localHostName", "data.networkInfo"),
        port=int(port or 0),
        state=want_string(obj, "state", "data", required=True).upper(),
        dialect=DIALECT_LEGACY,
    )


def parse_base_metadata(data: Any, topic_base_id: str) -> BaseMetadata:
    """queryBaseline's body: the base's BaseMetadata."""
    meta = want_object(data, "data", "{identity, name, version, clusterName}")
    identity = want_string(meta, "identity", "data") or topic_base_id
    if identity != topic_base_id:
        raise ArkletError(
            "identity_mismatch", "data.identity", f"{identity!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<identity>/base/queryBaseline with the same identity",
        )
    return BaseMetadata(identity, want_string(meta, "name", "data"), want_string(meta, "version", "data"),
                        want_string(meta, "clusterName", "data"))


def parse_health(data: Any) -> HealthReport:
    obj = want_object(data, "data", "an arklet Output {code, message, data: {healthData}}")
    code = want_string(obj, "code", "data", required=True).upper()
    message = want_string(obj, "message", "data")
    inner = obj.get("data")
    if inner is None:
        return HealthReport(code, message)
    inner = want_object(inner, "data.data", "{healthData: {jvm, cpu, masterBizInfo}}")
    health = inner.get("healthData")
    if health is None:
        return HealthReport(code, message)
    health = want_object(health, "data.data.healthData", "{jvm, cpu, masterBizInfo}")
    jvm = want_object(health.get("jvm", {}), "data.data.healthData.jvm", "an object of numbers")
    cpu = want_object(health.get("cpu", {}), "data.data.healthData.cpu", "an object of numbers")
    master = want_object(health.get("masterBizInfo", {}), "data.data.healthData.masterBizInfo", "{bizName, bizState}")
    max_mb = want_number(jvm, "max memory(M)", "data.data.healthData.jvm")
    metaspace = want_number(jvm, "java max metaspace", "data.data.healthData.jvm")
    memory: int | None = None
    if max_mb is not None and max_mb > 0:
        memory = int(max_mb * 1024 * 1024)
    elif metaspace is not None and metaspace > 0:
        memory = int(metaspace)
    count = want_number(cpu, "count", "data.data.healthData.cpu")
    return HealthReport(
        code=code,
        message=message,
        memory_bytes=memory,
        cpu_count=int(count) if count and count > 0 else None,
        run_time_s=want_number(jvm, "run time(s)", "data.data.healthData.jvm"),
        master_biz_state=want_string(master, "bizState", "data.data.healthData.masterBizInfo").upper(),
    )


def parse_simple_biz(data: Any) -> list[BizStatus]:
    """The current runtime's queryAllBiz reply: `[{name, version, state, latestStateRecord}]`."""
    items = want_array(data, "data", "an array of {name, version, state, latestStateRecord}")
    out = []
    for i, item in enumerate(items):
        path = f"data[{i}]"
        item = want_object(item, path, "{name, version, state, latestStateRecord}")
        record = item.get("latestStateRecord")
        change, reason, message = state_record(record, f"{path}.latestStateRecord")
        out.append(
            BizStatus(
                name=want_string(item, "name", path, required=True),
                version=want_string(item, "version", path),
                state=want_string(item, "state", path, required=True).upper(),
                change_time_ms=change,
                reason=reason,
                message=message,
            )
        )
    return out


def parse_biz(data: Any) -> list[BizStatus]:
    """The older queryAllBiz reply: `{code, message, data: [ArkBizInfo]}`."""
    obj = want_object(data, "data", "{code, message, data: [ArkBizInfo]}")
    code = want_string(obj, "code", "data", required=True).upper()
    if code != CODE_SUCCESS:
        raise ArkletError(
            "failed_reply", "data.code", f"queryAllBiz failed: {code} {want_string(obj, 'message', 'data')}", "check the base"
        )
    items = want_array(obj.get("data", []), "data.data", "an array of ArkBizInfo")
    out = []
    for i, item in enumerate(items):
        path = f"data.data[{i}]"
        item = want_object(item, path, "{bizName, bizVersion, bizState, bizStateRecords}")
        records = want_array(item.get("bizStateRecords", []), f"{path}.bizStateRecords", "an array of records")
        change, reason, message = state_record(records[-1] if records else None, f"{path}.bizStateRecords[-1]")
        out.append(
            BizStatus(
                name=want_string(item, "bizName", path, required=True),
                version=want_string(item, "bizVersion", path),
                state=want_string(item, "bizState", path, required=True).upper(),
                change_time_ms=change,
                reason=reason,
                message=message,
            )
        )
    return out


def parse_biz_operation(data: Any) -> BizOperation:
    """A bizOperation's data as plain JSON values (koupleless.arklet_replies decodes the payload)."""
    obj = want_object(data, "data", "{command, bizName, bizVersion, response}")
    command = want_string(obj, "command", "data", required=True)
    if command not in (CMD_INSTALL_BIZ, CMD_UNINSTALL_BIZ):
        raise ArkletError(
            "wrong_type", "data.command", f"{command!r} is not installBiz or uninstallBiz", "reply with the command's name"
        )
    response = want_object(obj.get("response"), "data.response", "an arklet Output {code, message, data}")
    code = want_string(response, "code", "data.response", required=True).upper()
    message = want_string(response, "message", "data.response")
    state = installed_name = installed_version = ""
    inner = response.get("data")
    if isinstance(inner, dict):
        # The base's own explanation (a stack trace on exceptions) is in data.message.
        detail = inner.get("message")
        if isinstance(detail, str) and detail:
            message = detail if message in ("", code, detail) else f"{message}: {detail}"
        infos = inner.get("bizInfos")
        if isinstance(infos, list) and infos and isinstance(infos[0], dict):
            info = infos[0]
            biz_state = info.get("bizState")
            state = biz_state.upper() if isinstance(biz_state, str) else ""
            name, version = info.get("bizName"), info.get("bizVersion")
            installed_name = name if isinstance(name, str) else ""
            installed_version = version if isinstance(version, str) else ""
    elif inner is not None:
        raise ArkletError("wrong_type", "data.response.data", f"expected an object, got {type_name(inner)}", "send {}")
    # Runtime 1.3.0-1.3.1 names no biz in a failure reply: biz_name is then "" and the registry
    # decides which command it answers.
    return BizOperation(
        command=command,
        biz_name=want_string(obj, "bizName", "data"),
        biz_version=want_string(obj, "bizVersion", "data"),
        code=code,
        message=message,
        biz_state=state,
        installed_name=installed_name,
        installed_version=installed_version,
    )


def parse_biz_model(payload: bytes) -> BizModel:
    """A command's BizModel, as arklet reads it (the base-sim side)."""
    obj = want_object(decode_json(payload), "payload", "{bizName, bizVersion, bizUrl}")
    name = want_string(obj, "bizName", "payload")
    version = want_string(obj, "bizVersion", "payload")
    url = want_string(obj, "bizUrl", "payload")
    if bool(name) != bool(version):
        raise ArkletError(
            "wrong_type", "payload", "bizName and bizVersion must be both set or both empty", "send both"
        )
    extra = {k: v for k, v in obj.items() if k not in ("bizName", "bizVersion", "bizUrl")}
    return BizModel(name, version, url, extra)


# --- fields ---------------------------------------------------------------------------------------


def want_object(value: Any, path: str, expect: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArkletError("wrong_type", path, f"expected {expect}, got {type_name(value)}", f"send {expect}")
    return value


def want_array(value: Any, path: str, expect: str) -> list[Any]:
    if not isinstance(value, list):
        raise ArkletError("wrong_type", path, f"expected {expect}, got {type_name(value)}", f"send {expect}")
    return value


def want_string(obj: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ArkletError("wrong_type", f"{path}.{key}", "is missing", f"send {key} as a string")
        return ""
    if not isinstance(value, str):
        raise ArkletError("wrong_type", f"{path}.{key}", f"expected a string, got {type_name(value)}", f"send {key} as a string")
    if required and not value:
        raise ArkletError("wrong_type", f"{path}.{key}", "is empty", f"send a non-empty {key}")
    return value


def want_number(obj: Mapping[str, Any], key: str, path: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArkletError("wrong_type", f"{path}.{key}", f"expected a number, got {type_name(value)}", "send a number")
    return float(value)


def state_record(record: Any, path: str) -> tuple[int | None, str, str]:
    if record is None:
        return None, "", ""
    record = want_object(record, path, "{changeTime, state, reason, message}")
    change = record.get("changeTime")
    if change is not None and (isinstance(change, bool) or not isinstance(change, int | float)):
        raise ArkletError("wrong_type", f"{path}.changeTime", f"expected epoch ms, got {type_name(change)}", "send a number")
    reason = record.get("reason")
    message = record.get("message")
    return (
        int(change) if change is not None else None,
        reason if isinstance(reason, str) else "",
        message if isinstance(message, str) else "",
    )
