"""The arklet MQTT protocol: topics, the envelope, payloads in both directions, the state vocabulary.

Wire-compatible with koupleless runtime's arklet-tunnel-mqtt (reference §2). Everything a base sends
is network input: parsing never trusts a shape and raises `ArkletError` naming the field path, what
is wrong and what a base should send instead. Commands to a base carry no envelope; everything a
base publishes is wrapped as `{"publishTimestamp": <epoch ms>, "data": ...}`. The data a base
publishes is built by koupleless.arklet_base_payloads (for the simulated bases and tests), and read
back by koupleless.arklet_parse.

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
            f"expected an object, got {type_name(doc)}",
            'wrap the payload as {"publishTimestamp": <epoch ms>, "data": ...}',
        )
    ts = doc.get("publishTimestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ArkletError(
            "wrong_type",
            "publishTimestamp",
            f"expected epoch milliseconds (a number), got {type_name(ts)}",
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


def type_name(value: Any) -> str:
    """How an error message names a JSON value's type."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )
