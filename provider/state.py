"""What the provider knows about each base and each module Pod, in memory.

Everything here can be rebuilt: bases from their next heartbeat and queryAllBiz, Pods from their
status (containerID `arklet://<bizName>:<bizVersion>` records what was installed), so a restarted
provider picks up where the last one stopped without reinstalling anything.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from koupleless import arklet, keys
from koupleless.model import Module, biz_key

CONTAINER_ID_SCHEME = "arklet://"

#: How a base is reached: its MQTT topics, or arklet's HTTP API at its IP and port (reference §3).
TUNNEL_MQTT = "mqtt"
TUNNEL_HTTP = "http"
#: arklet's HTTP port when a heartbeat says none.
ARKLET_HTTP_DEFAULT_PORT = 1238


@dataclass(frozen=True, slots=True)
class BizRecord(arklet.BizStatus):
    """A module as the base last reported it, with the base's timestamp of that report."""

    ts: int = 0


@dataclass
class BaseState:
    base_id: str
    node_name: str
    heartbeat: arklet.Heartbeat | None = None
    last_heard: float = field(default_factory=time.monotonic)
    #: The base's own timestamp of the newest message per topic kind: older ones are replays.
    last_ts: dict[str, int] = field(default_factory=dict)
    #: Since when (monotonic) every heartbeat has been older than the newest seen; None if in order.
    stale_since: float | None = None
    #: When (monotonic) the base said it was leaving (a heartbeat not ACTIVATED) and no ACTIVATED one
    #: has followed; only silence after it makes the Node NotReady (anyone may forge the message).
    goodbye_at: float | None = None
    goodbye_state: str = ""
    #: Newest (timestamp, command) that decided each biz key's state.
    biz_ts: dict[str, tuple[int, str]] = field(default_factory=dict)
    bizs: dict[str, BizRecord] = field(default_factory=dict)
    #: A full module list arrived since the base was (re)discovered.
    inventory_known: bool = False
    inventory_requested_at: float = 0.0
    health: arklet.HealthReport | None = None
    ready: bool = False
    not_ready_reason: str = "BaseStarting"
    not_ready_message: str = "waiting for the first heartbeat"
    #: This replica holds the base's Lease: only the holder acts on its Node and Pods.
    owned: bool = False
    lease_rv: str = ""
    node_uid: str = ""
    orphans_reported: set[str] = field(default_factory=set)
    #: (command, biz key) -> Pod key waiting for that reply ("" when no Pod waits: a leftover).
    pending: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Biz keys this controller installed (or adopted) for a Pod: when no Pod wants one any more it
    #: is uninstalled, whatever --orphan-policy says (that governs modules installed outside).
    managed: set[str] = field(default_factory=set)
    #: Heard from since this provider's MQTT connection last came up: commands published before
    #: that may have reached a broker that had not yet seen the base's subscription.
    heard_since_connect: bool = True
    #: Health asks left while the base's report lacks its JVM or CPU figures (arklet registers them
    #: only after its tunnel connects).
    health_retries: int = 0
    #: When this replica last wrote the base's Lease (monotonic; 0: never).
    lease_renewed_at: float = 0.0
    #: Silent past --gone-after: the Node reconciler deletes its Node and Lease.
    gone: bool = False
    #: How often this base heartbeats, when it is not --heartbeat-interval: learned for old-dialect
    #: bases (runtime 1.3.0-1.3.1 every 120 s, 1.3.2 every 10 s) from the gap between heartbeats.
    heartbeat_every: float | None = None
    last_heartbeat_at: float = 0.0
    #: bizUrl -> module of the baseline last sent to this base (to read its batch answer by).
    baseline: dict[str, arklet.BizModel] = field(default_factory=dict)
    #: The tunnel its last heartbeat came over (TUNNEL_MQTT or TUNNEL_HTTP), and for HTTP the port
    #: of arklet's HTTP API on `ip` (the heartbeat's `port`).
    tunnel: str = TUNNEL_MQTT
    tunnel_port: int = 0
    #: While another replica holds the base's Lease: that replica's HTTP tunnel address, from the
    #: Lease, where heartbeats this replica receives for the base are forwarded ("" if unknown).
    lease_holder_address: str = ""

    @property
    def ip(self) -> str:
        """The base's localIP when it is an IP address (it becomes the Node's InternalIP and its
        Pods' podIP, which the API server validates); "" otherwise."""
        ip = self.heartbeat.local_ip if self.heartbeat else ""
        return ip if ip and _is_ip(ip) else ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass
class PendingOp:
    command: str
    module: Module
    #: Monotonic time of the publish that the timeout counts from; None while it waits for the
    #: tunnel (a command queued during an outage has not been sent yet).
    sent_at: float | None
    #: The MQTT connection it went out on (MqttTunnel.connect_count).
    connection: int = 0
    #: Sent as part of the base's baseline: answered by its batchInstallBizResponse, never sent
    #: again as an installBiz on its own unless the timeout passes.
    baseline: bool = False


@dataclass
class Failure:
    """An install that did not work, retried with kubelet's CrashLoopBackOff timing."""

    biz_key: str
    message: str
    attempts: int = 1
    #: Monotonic time of the next try, and how long after the failure that is.
    retry_at: float = 0.0
    backoff: float = 0.0


@dataclass
class PodRecord:
    uid: str
    #: container name -> the module this provider (or a previous one) installed for it.
    installed: dict[str, Module] = field(default_factory=dict)
    #: container name -> command in flight.
    pending: dict[str, PendingOp] = field(default_factory=dict)
    #: container name -> the last failed install of it, and when it is tried again.
    failed: dict[str, Failure] = field(default_factory=dict)
    #: container name -> (biz key the Pod asks for, biz key the base installed instead).
    mismatch: dict[str, tuple[str, str]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    #: container name -> epoch seconds the module was last seen ACTIVATED after an install.
    started: dict[str, str] = field(default_factory=dict)
    start_time: str = ""
    #: The base accepted the Pod (kubelet admission): decided once, at first sight.
    admitted: bool = False
    events_sent: set[str] = field(default_factory=set)
    node_name: str = ""
    #: The status this provider last wrote, so a stale cache does not cause the same write twice.
    last_written: dict[str, Any] | None = None
    last_written_rv: int = 0
    #: When the last successful install reply arrived (monotonic), until the status shows it.
    reply_at: float = 0.0

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> PodRecord:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        rec = cls(uid=str(meta.get("uid", "")), start_time=str(status.get("startTime") or ""))
        for cs in status.get("containerStatuses") or []:
            if not isinstance(cs, dict):
                continue
            name = cs.get("name")
            cid = cs.get("containerID") or ""
            if not isinstance(name, str) or not isinstance(cid, str):
                continue
            rec.restarts[name] = int(cs.get("restartCount") or 0)
            if cid.startswith(CONTAINER_ID_SCHEME):
                biz_name, _, version = cid[len(CONTAINER_ID_SCHEME) :].partition(":")
                rec.installed[name] = Module(biz_name, version, str(cs.get("image") or ""))
                running = (cs.get("state") or {}).get("running") or {}
                if running.get("startedAt"):
                    rec.started[name] = running["startedAt"]
        # Something was installed for it, or it ran: a provider before this one admitted it.
        rec.admitted = bool(rec.installed) or status.get("phase") == "Running"
        return rec


def container_id(module: Module) -> str:
    return CONTAINER_ID_SCHEME + biz_key(module.biz_name, module.biz_version)


def node_base_id(node: dict[str, Any]) -> str | None:
    meta = node.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(keys.ANNOTATION_BASE_ID)
    return value if isinstance(value, str) and value else None
