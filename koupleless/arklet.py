"""The arklet MQTT protocol: topics, the envelope, payloads in both directions, the state vocabulary.

Wire-compatible with koupleless runtime's arklet-tunnel-mqtt (reference §2). Everything a base sends
is network input: parsing never trusts a shape and raises `ArkletError` naming the field path, what
is wrong and what a base should send instead. Commands to a base carry no envelope; everything a
base publishes is wrapped as `{"publishTimestamp": <epoch ms>, "data": ...}`. The data a base
publishes is built by koupleless.arklet_base_payloads (for the simulated bases and tests).

This module knows nothing about Kubernetes or about the MQTT client: it turns bytes into dataclasses
and back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from koupleless import keys
from koupleless.model import biz_key

# --- topics ---------------------------------------------------------------------------------------
# base -> controller (all under `koupleless_{env}/{baseID}/`)
HEART: Final = "base/heart"
QUERY_BASELINE: Final = "base/queryBaseline"
BASE_HEALTH: Final = "base/health"
SIMPLE_BIZ: Final = "base/simpleBiz"
BIZ: Final = "base/biz"
BIZ_OPERATION: Final = "base/bizOperation"
BATCH_INSTALL_RESPONSE: Final = "base/batchInstallBizResponse"
BASE_TOPICS: Final = frozenset(
    {HEART, QUERY_BASELINE, BASE_HEALTH, SIMPLE_BIZ, BIZ, BIZ_OPERATION, BATCH_INSTALL_RESPONSE}
)
# controller -> base
CMD_HEALTH: Final = "health"
CMD_QUERY_ALL_BIZ: Final = "queryAllBiz"
CMD_INSTALL_BIZ: Final = "installBiz"
CMD_UNINSTALL_BIZ: Final = "uninstallBiz"
CMD_BASELINE: Final = "base/baseline"
COMMANDS: Final = frozenset({CMD_HEALTH, CMD_QUERY_ALL_BIZ, CMD_INSTALL_BIZ, CMD_UNINSTALL_BIZ, CMD_BASELINE})
#: The command name a batchInstallBizResponse carries (what arklet turns a baseline into).
BATCH_INSTALL_COMMAND: Final = "batchInstallBiz"

# --- states and codes -----------------------------------------------------------------------------
#: SOFAArk BizState (arklet sends them lower case; compare upper-cased).
UNRESOLVED: Final = "UNRESOLVED"
RESOLVED: Final = "RESOLVED"
ACTIVATED: Final = "ACTIVATED"
DEACTIVATED: Final = "DEACTIVATED"
BROKEN: Final = "BROKEN"
#: Synthetic: uninstall succeeded, the module is gone from the base.
STOPPED: Final = "STOPPED"
BIZ_STATES: Final = frozenset({UNRESOLVED, RESOLVED, ACTIVATED, DEACTIVATED, BROKEN, STOPPED})

CODE_SUCCESS: Final = "SUCCESS"
CODE_FAILED: Final = "FAILED"

#: Larger payloads are refused unread: a base's status messages (heartbeat, health, a queryAllBiz of
#: ~100 modules) are a few tens of kB, and decoding megabytes on the event loop would stall every base.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
#: Install replies carry the installed biz's whole class path (`bizInfos[0]`): 18 KB for a base
#: plugin of 110 jars, so ~165 bytes a jar. These limits leave room for ~25,000 jars in one reply and
#: for a baseline of a few dozen such modules; koupleless.arklet_replies reads only the few fields
#: the provider uses, skipping the rest without building it.
MAX_PAYLOAD_BYTES_BY_KIND: Final = {BIZ_OPERATION: 4 * 1024 * 1024, BATCH_INSTALL_RESPONSE: 32 * 1024 * 1024}

#: The two heartbeat shapes (reference §2.3; README "Compatibility"): runtime >= 1.4 sends
#: `baseMetadata`, runtime 1.3.x / 2.1.5-2.1.7 `masterBizInfo` + `networkInfo` under a random UUID.
DIALECT_CURRENT: Final = "current"
DIALECT_LEGACY: Final = "legacy"


class ArkletError(ValueError):
    """A message a base sent that cannot be used. `kind` is a short, fixed metric label."""

    def __init__(self, kind: str, path: str, what: str, fix: str) -> None:
        super().__init__(f"{path}: {what} — {fix}")
        self.kind = kind
        self.path = path
        self.what = what
        self.fix = fix


def topic_prefix(env: str) -> str:
    return keys.MQTT_TOPIC_ROOT.format(env=env.lower())


def topic(env: str, base_id: str, kind: str) -> str:
    return f"{topic_prefix(env)}/{base_id}/{kind}"


def controller_subscription(env: str) -> str:
    """One wildcard that covers every topic a base publishes on."""
    return f"{topic_prefix(env)}/+/base/+"


def base_subscriptions(env: str, base_id: str) -> list[str]:
    """What arklet subscribes to: its commands and its baseline."""
    return [f"{topic_prefix(env)}/{base_id}/+", topic(env, base_id, CMD_BASELINE)]


def parse_topic(env: str, name: str, *, direction: str = "base") -> tuple[str, str]:
    """(baseID, kind) of a topic, where kind is one of BASE_TOPICS (direction "base") or COMMANDS
    (direction "command")."""
    prefix = topic_prefix(env) + "/"
    allowed = BASE_TOPICS if direction == "base" else COMMANDS
    if not name.startswith(prefix):
        raise ArkletError("unknown_topic", "topic", f"{name!r} is not under {prefix}", "publish under " + prefix)
    base_id, _, kind = name[len(prefix) :].partition("/")
    if not base_id or kind not in allowed:
        raise ArkletError(
            "unknown_topic",
            "topic",
            f"{name!r} is not an arklet topic",
            f"use {prefix}<baseID>/<one of {', '.join(sorted(allowed))}>",
        )
    return base_id, kind


# --- envelope -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    publish_ts_ms: int
    data: Any


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_envelope(data: Any, publish_ts_ms: int | None = None) -> bytes:
    return orjson.dumps({"publishTimestamp": now_ms() if publish_ts_ms is None else publish_ts_ms, "data": data})


def payload_limit(kind: str) -> int:
    """The largest payload accepted on a base topic of this kind."""
    return MAX_PAYLOAD_BYTES_BY_KIND.get(kind, MAX_PAYLOAD_BYTES)


def check_size(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> None:
    if len(payload) > limit:
        raise ArkletError(
            "too_large",
            "payload",
            f"{len(payload)} bytes is over the {limit} byte limit for this topic",
            "a base's messages are JSON documents of at most a few MB; check what publishes on this topic",
        )


def decode_json(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> Any:
    check_size(payload, limit)
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ArkletError("not_json", "payload", f"is not JSON ({exc})", "publish a UTF-8 JSON object") from None


def decode_envelope(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> Envelope:
    return check_envelope(decode_json(payload, limit))


def check_envelope(doc: Any) -> Envelope:
    if not isinstance(doc, dict):
        raise ArkletError(
            "wrong_type",
            "payload",
            f"expected an object, got {_type(doc)}",
            'wrap the payload as {"publishTimestamp": <epoch ms>, "data": ...}',
        )
    ts = doc.get("publishTimestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ArkletError(
            "wrong_type",
            "publishTimestamp",
            f"expected epoch milliseconds (a number), got {_type(ts)}",
            "set publishTimestamp to System.currentTimeMillis()",
        )
    if "data" not in doc:
        raise ArkletError("wrong_type", "data", "is missing", "put the message body under data")
    return Envelope(int(ts), doc["data"])


# --- payloads -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaseMetadata:
    identity: str
    name: str
    version: str
    cluster_name: str = ""

    def to_wire(self) -> dict[str, str]:
        return {"identity": self.identity, "name": self.name, "version": self.version, "clusterName": self.cluster_name}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    metadata: BaseMetadata
    local_ip: str
    local_hostname: str
    port: int
    state: str  # upper case
    #: Which heartbeat shape the base sent: DIALECT_CURRENT or DIALECT_LEGACY.
    dialect: str = DIALECT_CURRENT

    @property
    def activated(self) -> bool:
        return self.state == ACTIVATED

    def to_wire(self) -> dict[str, Any]:
        """The current shape (the old one: provider/basesim_dialects.py)."""
        return {
            "baseMetadata": self.metadata.to_wire(),
            "localIP": self.local_ip,
            "localHostName": self.local_hostname,
            "port": self.port,
            "state": self.state.lower(),
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    code: str
    message: str
    #: JVM max memory in bytes, None when the base did not say.
    memory_bytes: int | None = None
    cpu_count: int | None = None
    run_time_s: float | None = None
    master_biz_state: str = ""

    @property
    def ok(self) -> bool:
        return self.code == CODE_SUCCESS


@dataclass(frozen=True, slots=True)
class BizStatus:
    name: str
    version: str
    state: str  # upper case
    change_time_ms: int | None = None
    reason: str = ""
    message: str = ""

    @property
    def key(self) -> str:
        return biz_key(self.name, self.version)


@dataclass(frozen=True, slots=True)
class BizOperation:
    command: str
    biz_name: str
    biz_version: str
    code: str
    message: str = ""
    #: The state the base reports for the biz after the operation, when it says.
    biz_state: str = ""
    #: What the base says it installed (response.data.bizInfos[0]): arklet echoes the requested
    #: bizName/bizVersion at the top, but installs under the version inside the jar.
    installed_name: str = ""
    installed_version: str = ""

    @property
    def key(self) -> str:
        return biz_key(self.biz_name, self.biz_version)

    @property
    def installed_key(self) -> str:
        """The biz key the base really holds after a successful install."""
        if not self.installed_name:
            return self.key
        return biz_key(self.installed_name, self.installed_version or self.biz_version)

    @property
    def success(self) -> bool:
        return self.code == CODE_SUCCESS

    @property
    def repeat(self) -> bool:
        """arklet's answer to installing a name:version it already has: FAILED, REPEAT_BIZ."""
        return not self.success and "REPEAT_BIZ" in self.message.upper()

    @property
    def not_found(self) -> bool:
        """arklet's answer to uninstalling what it does not have: FAILED, NOT_FOUND_BIZ."""
        return not self.success and "NOT_FOUND" in self.message.upper()


@dataclass(frozen=True, slots=True)
class BizModel:
    biz_name: str
    biz_version: str
    biz_url: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return biz_key(self.biz_name, self.biz_version)

    def to_wire(self) -> dict[str, str]:
        model = {"bizName": self.biz_name, "bizVersion": self.biz_version, "bizUrl": self.biz_url}
        return {k: v for k, v in model.items() if v}


def encode_command(model: BizModel | None = None) -> bytes:
    """installBiz / uninstallBiz carry a BizModel; health / queryAllBiz carry `{}`."""
    return orjson.dumps(model.to_wire() if model else {})


def parse_heartbeat(data: Any, topic_base_id: str) -> Heartbeat:
    """Either dialect, told apart by its shape: `baseMetadata` (runtime >= 1.4) or `masterBizInfo`
    (runtime 1.3.x, 2.1.5-2.1.7)."""
    obj = _obj(data, "data", "a BaseStatus object")
    if "baseMetadata" not in obj and "masterBizInfo" in obj:
        return parse_legacy_heartbeat(obj, topic_base_id)
    if "baseMetadata" not in obj:
        raise ArkletError(
            "wrong_type", "data.baseMetadata", "is missing (and so is data.masterBizInfo)",
            "send {baseMetadata: {identity, name, version, clusterName}, localIP, localHostName, port, state} "
            "(runtime >= 1.4) or {masterBizInfo: {name, version}, networkInfo: {localIP, localHostName}, state} "
            "(runtime 1.3.x)",
        )
    meta = _obj(obj.get("baseMetadata"), "data.baseMetadata", "{identity, name, version, clusterName}")
    identity = _str(meta, "identity", "data.baseMetadata", required=True)
    if identity != topic_base_id:
        raise ArkletError(
            "identity_mismatch",
            "data.baseMetadata.identity",
            f"{identity!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<identity>/base/heart with the same identity",
        )
    port = obj.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int | float | type(None)):
        raise ArkletError("wrong_type", "data.port", f"expected a number, got {_type(port)}", "send 0 over MQTT")
    state = _str(obj, "state", "data", required=True).upper()
    return Heartbeat(
        metadata=BaseMetadata(
            identity=identity,
            name=_str(meta, "name", "data.baseMetadata"),
            version=_str(meta, "version", "data.baseMetadata"),
            cluster_name=_str(meta, "clusterName", "data.baseMetadata"),
        ),
        local_ip=_str(obj, "localIP", "data"),
        local_hostname=_str(obj, "localHostName", "data"),
        port=int(port or 0),
        state=state,
    )


def parse_legacy_heartbeat(obj: Mapping[str, Any], topic_base_id: str) -> Heartbeat:
    """Runtime 1.3.x / 2.1.5-2.1.7: `{masterBizInfo: {name, version}, networkInfo: {localIP,
    localHostName[, arkletPort]}, state}`. The base is named only by its topic (a random UUID per
    JVM start); it has no cluster name, so its own name stands for it: all bases of one application
    form one cluster, as the cluster name is used for."""
    master = _obj(obj.get("masterBizInfo"), "data.masterBizInfo", "{name, version}")
    network = _obj(obj.get("networkInfo", {}), "data.networkInfo", "{localIP, localHostName}")
    named = obj.get("baseID")
    if named is not None and named != topic_base_id:
        raise ArkletError(
            "identity_mismatch", "data.baseID", f"{named!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<baseID>/base/heart with the same baseID",
        )
    port = network.get("arkletPort", 0)
    if isinstance(port, bool) or not isinstance(port, int | float | type(None)):
        raise ArkletError("wrong_type", "data.networkInfo.arkletPort", f"expected a number, got {_type(port)}",
                          "send the arklet port as a number")
    name = _str(master, "name", "data.masterBizInfo")
    return Heartbeat(
        metadata=BaseMetadata(
            identity=topic_base_id,
            name=name,
            version=_str(master, "version", "data.masterBizInfo"),
            cluster_name=name,
        ),
        local_ip=_str(network, "localIP", "data.networkInfo"),
        local_hostname=_str(network, "localHostName", "data.networkInfo"),
        port=int(port or 0),
        state=_str(obj, "state", "data", required=True).upper(),
        dialect=DIALECT_LEGACY,
    )


def parse_base_metadata(data: Any, topic_base_id: str) -> BaseMetadata:
    """queryBaseline's body: the base's BaseMetadata."""
    meta = _obj(data, "data", "{identity, name, version, clusterName}")
    identity = _str(meta, "identity", "data") or topic_base_id
    if identity != topic_base_id:
        raise ArkletError(
            "identity_mismatch", "data.identity", f"{identity!r} disagrees with the topic's baseID {topic_base_id!r}",
            "publish on koupleless_<env>/<identity>/base/queryBaseline with the same identity",
        )
    return BaseMetadata(identity, _str(meta, "name", "data"), _str(meta, "version", "data"),
                        _str(meta, "clusterName", "data"))


def parse_health(data: Any) -> HealthReport:
    obj = _obj(data, "data", "an arklet Output {code, message, data: {healthData}}")
    code = _str(obj, "code", "data", required=True).upper()
    message = _str(obj, "message", "data")
    inner = obj.get("data")
    if inner is None:
        return HealthReport(code, message)
    inner = _obj(inner, "data.data", "{healthData: {jvm, cpu, masterBizInfo}}")
    health = inner.get("healthData")
    if health is None:
        return HealthReport(code, message)
    health = _obj(health, "data.data.healthData", "{jvm, cpu, masterBizInfo}")
    jvm = _obj(health.get("jvm", {}), "data.data.healthData.jvm", "an object of numbers")
    cpu = _obj(health.get("cpu", {}), "data.data.healthData.cpu", "an object of numbers")
    master = _obj(health.get("masterBizInfo", {}), "data.data.healthData.masterBizInfo", "{bizName, bizState}")
    max_mb = _num(jvm, "max memory(M)", "data.data.healthData.jvm")
    metaspace = _num(jvm, "java max metaspace", "data.data.healthData.jvm")
    memory: int | None = None
    if max_mb is not None and max_mb > 0:
        memory = int(max_mb * 1024 * 1024)
    elif metaspace is not None and metaspace > 0:
        memory = int(metaspace)
    count = _num(cpu, "count", "data.data.healthData.cpu")
    return HealthReport(
        code=code,
        message=message,
        memory_bytes=memory,
        cpu_count=int(count) if count and count > 0 else None,
        run_time_s=_num(jvm, "run time(s)", "data.data.healthData.jvm"),
        master_biz_state=_str(master, "bizState", "data.data.healthData.masterBizInfo").upper(),
    )


def parse_simple_biz(data: Any) -> list[BizStatus]:
    """The current runtime's queryAllBiz reply: `[{name, version, state, latestStateRecord}]`."""
    items = _arr(data, "data", "an array of {name, version, state, latestStateRecord}")
    out = []
    for i, item in enumerate(items):
        path = f"data[{i}]"
        item = _obj(item, path, "{name, version, state, latestStateRecord}")
        record = item.get("latestStateRecord")
        change, reason, message = _record(record, f"{path}.latestStateRecord")
        out.append(
            BizStatus(
                name=_str(item, "name", path, required=True),
                version=_str(item, "version", path),
                state=_str(item, "state", path, required=True).upper(),
                change_time_ms=change,
                reason=reason,
                message=message,
            )
        )
    return out


def parse_biz(data: Any) -> list[BizStatus]:
    """The older queryAllBiz reply: `{code, message, data: [ArkBizInfo]}`."""
    obj = _obj(data, "data", "{code, message, data: [ArkBizInfo]}")
    code = _str(obj, "code", "data", required=True).upper()
    if code != CODE_SUCCESS:
        raise ArkletError(
            "failed_reply", "data.code", f"queryAllBiz failed: {code} {_str(obj, 'message', 'data')}", "check the base"
        )
    items = _arr(obj.get("data", []), "data.data", "an array of ArkBizInfo")
    out = []
    for i, item in enumerate(items):
        path = f"data.data[{i}]"
        item = _obj(item, path, "{bizName, bizVersion, bizState, bizStateRecords}")
        records = _arr(item.get("bizStateRecords", []), f"{path}.bizStateRecords", "an array of records")
        change, reason, message = _record(records[-1] if records else None, f"{path}.bizStateRecords[-1]")
        out.append(
            BizStatus(
                name=_str(item, "bizName", path, required=True),
                version=_str(item, "bizVersion", path),
                state=_str(item, "bizState", path, required=True).upper(),
                change_time_ms=change,
                reason=reason,
                message=message,
            )
        )
    return out


def parse_biz_operation(data: Any) -> BizOperation:
    """A bizOperation's data as plain JSON values (koupleless.arklet_replies decodes the payload)."""
    obj = _obj(data, "data", "{command, bizName, bizVersion, response}")
    command = _str(obj, "command", "data", required=True)
    if command not in (CMD_INSTALL_BIZ, CMD_UNINSTALL_BIZ):
        raise ArkletError(
            "wrong_type", "data.command", f"{command!r} is not installBiz or uninstallBiz", "reply with the command's name"
        )
    response = _obj(obj.get("response"), "data.response", "an arklet Output {code, message, data}")
    code = _str(response, "code", "data.response", required=True).upper()
    message = _str(response, "message", "data.response")
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
        raise ArkletError("wrong_type", "data.response.data", f"expected an object, got {_type(inner)}", "send {}")
    # Runtime 1.3.0-1.3.1 names no biz in a failure reply: biz_name is then "" and the registry
    # decides which command it answers.
    return BizOperation(
        command=command,
        biz_name=_str(obj, "bizName", "data"),
        biz_version=_str(obj, "bizVersion", "data"),
        code=code,
        message=message,
        biz_state=state,
        installed_name=installed_name,
        installed_version=installed_version,
    )


def parse_biz_model(payload: bytes) -> BizModel:
    """A command's BizModel, as arklet reads it (the base-sim side)."""
    obj = _obj(decode_json(payload), "payload", "{bizName, bizVersion, bizUrl}")
    name = _str(obj, "bizName", "payload")
    version = _str(obj, "bizVersion", "payload")
    url = _str(obj, "bizUrl", "payload")
    if bool(name) != bool(version):
        raise ArkletError(
            "wrong_type", "payload", "bizName and bizVersion must be both set or both empty", "send both"
        )
    extra = {k: v for k, v in obj.items() if k not in ("bizName", "bizVersion", "bizUrl")}
    return BizModel(name, version, url, extra)


# --- helpers --------------------------------------------------------------------------------------


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _obj(value: Any, path: str, expect: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArkletError("wrong_type", path, f"expected {expect}, got {_type(value)}", f"send {expect}")
    return value


def _arr(value: Any, path: str, expect: str) -> list[Any]:
    if not isinstance(value, list):
        raise ArkletError("wrong_type", path, f"expected {expect}, got {_type(value)}", f"send {expect}")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ArkletError("wrong_type", f"{path}.{key}", "is missing", f"send {key} as a string")
        return ""
    if not isinstance(value, str):
        raise ArkletError("wrong_type", f"{path}.{key}", f"expected a string, got {_type(value)}", f"send {key} as a string")
    if required and not value:
        raise ArkletError("wrong_type", f"{path}.{key}", "is empty", f"send a non-empty {key}")
    return value


def _num(obj: Mapping[str, Any], key: str, path: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArkletError("wrong_type", f"{path}.{key}", f"expected a number, got {_type(value)}", "send a number")
    return float(value)


def _record(record: Any, path: str) -> tuple[int | None, str, str]:
    if record is None:
        return None, "", ""
    record = _obj(record, path, "{changeTime, state, reason, message}")
    change = record.get("changeTime")
    if change is not None and (isinstance(change, bool) or not isinstance(change, int | float)):
        raise ArkletError("wrong_type", f"{path}.changeTime", f"expected epoch ms, got {_type(change)}", "send a number")
    reason = record.get("reason")
    message = record.get("message")
    return (
        int(change) if change is not None else None,
        reason if isinstance(reason, str) else "",
        message if isinstance(message, str) else "",
    )
