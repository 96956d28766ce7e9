"""What the bases say, as observed state: MQTT in, `BaseState` out. Knows nothing of Kubernetes.

Every message a base publishes is network input that may be lost, late, duplicated, reordered or
forged. The registry orders each base's messages by the base's own timestamps, with bounds: a
message dated ahead of our clock is refused (one such heartbeat would otherwise make every real
one "stale" until the clock catches up), and a base whose clock steps back by more than a minute
starts a new order instead of being ignored. Liveness is judged only over time this provider could
hear: while its own connection to the broker is down, silence says nothing about the bases.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import Counter

from koupleless import arklet, arklet_parse, arklet_replies, keys
from provider.admission import BaseAdmission
from provider.state import ARKLET_HTTP_DEFAULT_PORT, TUNNEL_HTTP, TUNNEL_MQTT, BaseState, BizRecord

log = logging.getLogger(__name__)

MQTT_REJECTED = Counter(
    "koupleless_provider_mqtt_rejected_total",
    "Base messages not acted on, by reason (not_json, wrong_type, too_large, unknown_topic, identity_mismatch, "
    "stale, future, unknown_base, failed_reply, node_name_collision, base_refused, new_base_throttled, unattributed)",
    ["reason"],
)
MQTT_HANDLED = Counter("koupleless_provider_mqtt_handled_total", "Base messages acted on", ["kind"])
INSTALL_RESULTS = Counter("koupleless_provider_install_results_total", "installBiz replies", ["result"])

#: A message dated further ahead of this provider's clock is refused: clocks of a cluster agree to
#: well under this, and one accepted far-future timestamp would make every later message "stale".
MAX_FUTURE_SKEW_MS = 10_000
#: Heartbeat intervals of nothing but old-dated heartbeats from a base after which its clock is
#: taken to have stepped back (a replay is a message or two; a clock is every message from then on).
CLOCK_STEP_HEARTBEATS = 3
#: Heartbeat intervals of silence after a base said it was leaving (a DEACTIVATED heartbeat) before
#: its Node goes NotReady: long enough for the base's next ACTIVATED heartbeat to prove a forged
#: goodbye wrong, even when that beat is late. No longer than --missed-heartbeats (default 2) counted
#: from the last ACTIVATED one, which usually comes first; either way the reason is BaseDeactivated.
GOODBYE_CONFIRM_HEARTBEATS = 2
#: The slowest heartbeat of any arklet (runtime 1.3.0-1.3.1): an old-dialect base is given this long
#: between heartbeats until its second one shows how often it really beats.
LEGACY_HEARTBEAT_MAX_S = 120.0


def judge_period(heartbeat_interval: float) -> float:
    """How often the provider judges liveness (`BaseRegistry.judge`): a silence is seen at most this
    long after it passes --missed-heartbeats x --heartbeat-interval."""
    return min(1.0, heartbeat_interval / 2)


class BaseListener(Protocol):
    """What the registry tells the rest of the provider. Called on the event loop, never blocks."""

    def base_discovered(self, base: BaseState) -> None: ...

    def node_changed(self, base: BaseState) -> None: ...

    def modules_changed(self, base: BaseState) -> None: ...

    def inventory_received(self, base: BaseState) -> None: ...

    def operation_replied(self, base: BaseState, op: arklet.BizOperation) -> None: ...

    def base_heard_again(self, base: BaseState) -> None: ...

    def health_incomplete(self, base: BaseState) -> None: ...

    def baseline_requested(self, base_id: str, base: BaseState | None, metadata: arklet.BaseMetadata) -> None: ...


class BaseRegistry:
    def __init__(self, env: str, listener: BaseListener, *, heartbeat_interval: float, missed_heartbeats: int,
                 gone_after: float, admission: BaseAdmission | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.env = env
        #: Monotonic seconds: every liveness time (heard, heartbeat, goodbye, hearing since) is on it.
        self.clock = clock
        #: Which heartbeats may make or keep a Node (provider/admission.py); None: every valid one.
        self.admission = admission
        self.listener = listener
        self.heartbeat_interval = heartbeat_interval
        self.missed_heartbeats = missed_heartbeats
        self.gone_after = gone_after
        self.bases: dict[str, BaseState] = {}
        self.by_node: dict[str, str] = {}
        #: Monotonic time since which this provider can hear the broker; None while it cannot.
        self.hearing_since: float | None = None
        #: The same for HTTP-tunnel bases (since the heartbeat server listens), and their heartbeat
        #: period: arklet's HTTP tunnel heartbeats every 12 s, whatever the MQTT bases do.
        self.http_hearing_since: float | None = None
        self.http_heartbeat_interval = heartbeat_interval

    # --- membership -------------------------------------------------------------------------------

    def get(self, base_id: str) -> BaseState | None:
        return self.bases.get(base_id)

    def for_node(self, node_name: str) -> BaseState | None:
        return self.bases.get(self.by_node.get(node_name, ""))

    def add(self, base: BaseState) -> bool:
        """Register a base (discovered, or adopted from its Node); False if its Node name is taken."""
        owner = self.by_node.get(base.node_name)
        if owner is not None and owner != base.base_id:
            return False
        self.bases[base.base_id] = base
        self.by_node[base.node_name] = base.base_id
        return True

    def remove(self, base: BaseState) -> None:
        if self.bases.get(base.base_id) is base:
            del self.bases[base.base_id]
        if self.by_node.get(base.node_name) == base.base_id:
            del self.by_node[base.node_name]

    # --- the tunnel ------------------------------------------------------------------------------

    def connection_changed(self, up: bool) -> None:
        if not up:
            self.hearing_since = None
            return
        self.hearing_since = self.clock()
        for base in self.bases.values():
            if base.tunnel != TUNNEL_MQTT:
                continue  # the broker says nothing about bases on another tunnel
            # A new connection may carry a base's messages in a new order (its own reconnect, a
            # broker that lost its queue): judge its timestamps afresh.
            base.last_ts.clear()
            base.heard_since_connect = False

    def hearing(self) -> bool:
        return self.hearing_since is not None

    # --- MQTT in ----------------------------------------------------------------------------------

    def reject(self, reason: str, topic: str, detail: object) -> None:
        MQTT_REJECTED.labels(reason).inc()
        log.warning("ignored MQTT message on %r (%s): %s", topic[:200], reason, ascii(str(detail)[:500]))

    def handle(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/" + arklet.CMD_BASELINE):
            # A provider's own answer to a queryBaseline (this one's or another replica's): it is
            # published under the base/ subtree every provider reads.
            return
        try:
            base_id, kind = arklet.parse_topic(self.env, topic)
            if kind in arklet_replies.SLIM_KINDS:
                env = arklet_replies.decode_envelope(kind, payload)
            else:
                env = arklet.decode_envelope(payload, arklet.payload_limit(kind))
            if env.publish_ts_ms > arklet.now_ms() + MAX_FUTURE_SKEW_MS:
                self.reject("future", topic, f"publishTimestamp {env.publish_ts_ms} is "
                            f"{(env.publish_ts_ms - arklet.now_ms()) / 1000:.0f}s ahead of this provider's clock")
                return
            if kind == arklet.HEART:
                self._on_heartbeat(base_id, arklet_parse.parse_heartbeat(env.data, base_id), env.publish_ts_ms)
                return
            if kind == arklet.QUERY_BASELINE:
                # Sent once per JVM start, before the first heartbeat: a base may not be known yet.
                metadata = arklet_parse.parse_base_metadata(env.data, base_id)
                known = self.bases.get(base_id)
                if known is not None:
                    self._on_base_started(known)
                MQTT_HANDLED.labels(kind).inc()
                self.listener.baseline_requested(base_id, known, metadata)
                return
            base = self.bases.get(base_id)
            if base is None:
                MQTT_REJECTED.labels("unknown_base").inc()
                log.debug("message on %r from base %r before its first heartbeat", topic[:200], base_id[:80])
                return
            if not self._on_base_message(base, kind, env.data, env.publish_ts_ms, topic):
                MQTT_REJECTED.labels("unsupported").inc()
        except arklet.ArkletError as exc:
            self.reject(exc.kind, topic, exc)
        except Exception:  # a bug must not take the tunnel down; the message is counted and logged
            MQTT_REJECTED.labels("internal_error").inc()
            log.exception("failed to handle MQTT message on %r", topic[:200])

    def _in_order(self, base: BaseState, kind: str, ts: int, topic: str) -> bool:
        last = base.last_ts.get(kind)
        if last is not None and ts <= last:
            now = self.clock()
            if kind == arklet.HEART and base.stale_since is not None \
                    and now - base.stale_since > CLOCK_STEP_HEARTBEATS * self.heartbeat_interval:
                # Nothing but old-dated heartbeats for a while: not a replay, the base's clock went
                # back (NTP, a VM restored). Order its messages afresh instead of ignoring it.
                log.warning("base %s: its clock went back %.0fs; ordering its messages afresh",
                            base.base_id, (last - ts) / 1000)
                base.last_ts.clear()
                base.biz_ts.clear()
            else:
                if kind == arklet.HEART and base.stale_since is None:
                    base.stale_since = now
                self.reject("stale", topic, f"publishTimestamp {ts} is not after the last one, {last}")
                return False
        if kind == arklet.HEART:
            base.stale_since = None
        base.last_ts[kind] = ts
        self._heard(base)
        return True

    def _heard(self, base: BaseState) -> None:
        base.last_heard = self.clock()
        if not base.heard_since_connect:
            base.heard_since_connect = True
            self.listener.base_heard_again(base)

    def _on_heartbeat(self, base_id: str, hb: arklet.Heartbeat, ts: int, tunnel: str = TUNNEL_MQTT) -> None:
        base = self.bases.get(base_id)
        topic = arklet.topic(self.env, base_id, arklet.HEART)
        if base is None and not hb.activated:
            return
        if self.admission is not None:
            not_now = self.admission.admit(base_id, hb, known=base is not None)
            if not_now is not None:
                MQTT_REJECTED.labels(not_now).inc()
                return
        new = base is None
        if base is None:
            base = BaseState(base_id=base_id, node_name=keys.vnode_name(base_id), tunnel=tunnel,
                             tunnel_port=_tunnel_port(tunnel, hb))
            if not self.add(base):
                self.reject("node_name_collision", topic,
                            f"{base_id} and {self.by_node[base.node_name]} both map to {base.node_name}")
                return
            log.info("new base %s (%s %s, %s) -> Node %s", ascii(base_id), ascii(hb.metadata.name[:100]),
                     ascii(hb.metadata.version[:100]), ascii(hb.local_ip[:100]), base.node_name)
            self.listener.base_discovered(base)
        if not hb.activated:
            self._on_goodbye(base, hb, ts, topic)
            return
        if not self._in_order(base, arklet.HEART, ts, topic):
            return
        MQTT_HANDLED.labels(arklet.HEART).inc()
        now = self.clock()
        if hb.dialect == arklet.DIALECT_LEGACY:
            gap = now - base.last_heartbeat_at if base.last_heartbeat_at else LEGACY_HEARTBEAT_MAX_S
            base.heartbeat_every = min(max(gap, 0.0), LEGACY_HEARTBEAT_MAX_S)
        base.last_heartbeat_at = now
        if (base.tunnel, base.tunnel_port) != (tunnel, _tunnel_port(tunnel, hb)):
            log.info("base %s now speaks over %s%s", base_id, tunnel,
                     f" at {hb.local_ip}:{_tunnel_port(tunnel, hb)}" if tunnel == TUNNEL_HTTP else "")
            base.tunnel, base.tunnel_port = tunnel, _tunnel_port(tunnel, hb)
            # Commands sent over the old tunnel (or before its first heartbeat here, to a base
            # adopted from its Node) went nowhere: ask again over this one.
            self.listener.base_heard_again(base)
        changed = base.gone or base.heartbeat is None or (
            base.heartbeat.metadata, base.heartbeat.local_ip, base.heartbeat.local_hostname
        ) != (hb.metadata, hb.local_ip, hb.local_hostname)
        base.gone = False
        base.heartbeat = hb
        base.goodbye_at = None
        if not base.ready:
            base.ready = True
            if not new:  # a new base's "new base" line says as much
                log.info("base %s is ready", base_id)
            # Back from a silence: what it holds and what reached it are unknown until it says.
            self.listener.base_heard_again(base)
            self.listener.modules_changed(base)
            changed = True
        if changed:
            self.listener.node_changed(base)

    def _on_goodbye(self, base: BaseState, hb: arklet.Heartbeat, ts: int, topic: str) -> None:
        """A heartbeat saying the base is not ACTIVATED (real arklet sends none; a base that says
        goodbye on shutdown does). Anyone on the broker can send one for any base, so it changes
        nothing at once: it neither refreshes the base's liveness nor enters the order of its
        heartbeats (a forged one dated ahead cannot make the real ones stale); `judge` makes the Node
        NotReady only if no ACTIVATED heartbeat follows within GOODBYE_CONFIRM_HEARTBEATS intervals."""
        last = base.last_ts.get(arklet.HEART)
        if last is not None and ts <= last:
            self.reject("stale", topic, f"publishTimestamp {ts} is not after the last one, {last}")
            return
        MQTT_HANDLED.labels(arklet.HEART).inc()
        if base.goodbye_at is None and base.ready:
            base.goodbye_at = self.clock()
            base.goodbye_state = hb.state[:40]
            log.info("base %s reported state %s; its Node goes NotReady unless a heartbeat follows within %gs",
                     base.base_id, ascii(base.goodbye_state),
                     GOODBYE_CONFIRM_HEARTBEATS * max(self.heartbeat_interval, base.heartbeat_every or 0.0))

    def set_not_ready(self, base: BaseState, reason: str, message: str) -> None:
        base.ready = False
        base.not_ready_reason, base.not_ready_message = reason, message
        log.warning("base %s is not ready: %s: %s", base.base_id, reason, message)
        self.listener.node_changed(base)
        self.listener.modules_changed(base)

    def _on_base_started(self, base: BaseState) -> None:
        """arklet asks for its baseline once per JVM start: a base that restarted may have lost
        every module and restarted its clock, so look again before trusting what we knew (what it
        held before says nothing about now: it must not stand for what its baseline reinstalls)."""
        base.inventory_known = False
        base.bizs = {}
        base.last_ts.clear()
        base.biz_ts.clear()
        base.heard_since_connect = False
        self._heard(base)

    def _on_health(self, base: BaseState, report: arklet.HealthReport) -> None:
        if not report.ok:
            log.info("base %s health: %s %s", base.base_id, ascii(report.code), ascii(report.message[:200]))
            return
        before = base.health
        if report.memory_bytes is None or report.cpu_count is None:
            # arklet registers its JVM and CPU figures only once its tunnel is up: keep what we knew
            # and ask again soon rather than advertise defaults until the next health period.
            self.listener.health_incomplete(base)
            if before is not None:
                report = arklet.HealthReport(
                    report.code, report.message,
                    report.memory_bytes if report.memory_bytes is not None else before.memory_bytes,
                    report.cpu_count if report.cpu_count is not None else before.cpu_count,
                    report.run_time_s, report.master_biz_state,
                )
        base.health = report
        if before and before.run_time_s is not None and report.run_time_s is not None:
            if report.run_time_s + 1 < before.run_time_s:
                self._on_base_started(base)
        if report.master_biz_state and report.master_biz_state != arklet.ACTIVATED and base.ready:
            self.set_not_ready(base, "BaseNotActivated", f"base master biz is {report.master_biz_state}")
        if before is None or (before.memory_bytes, before.cpu_count) != (report.memory_bytes, report.cpu_count):
            self.listener.node_changed(base)

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
            self.listener.modules_changed(base)
        if base.heartbeat is not None and base.heartbeat.dialect == arklet.DIALECT_LEGACY:
            self._settle_from_inventory(base)
        self.listener.inventory_received(base)

    def _settle_from_inventory(self, base: BaseState) -> None:
        """Runtime 1.3.0-1.3.1 answers a successful command only with its full module list: a
        pending install whose module is ACTIVATED in it, or uninstall whose module is gone from it,
        is answered by that list as a reply would."""
        for command, key in list(base.pending):
            biz = base.bizs.get(key)
            if command == arklet.CMD_INSTALL_BIZ and biz is not None and biz.state == arklet.ACTIVATED:
                state = arklet.ACTIVATED
            elif command == arklet.CMD_UNINSTALL_BIZ and biz is None:
                state = ""
            else:
                continue
            name, _, version = key.partition(":")
            self.listener.operation_replied(base, arklet.BizOperation(command, name, version, arklet.CODE_SUCCESS,
                                                                      biz_state=state))

    def _on_batch_install(self, base: BaseState, entries: list[arklet_replies.BatchEntry], ts: int,
                          topic: str) -> None:
        """A baseline's answer: each entry is applied as the install reply it stands for."""
        self._heard(base)
        MQTT_HANDLED.labels(arklet.BATCH_INSTALL_RESPONSE).inc()
        for entry in entries:
            asked = base.baseline.get(entry.biz_url)
            if asked is None and not entry.installed_name:
                continue  # neither our baseline nor the base says which module this was
            name = asked.biz_name if asked else entry.installed_name
            version = asked.biz_version if asked else entry.installed_version
            op = arklet.BizOperation(arklet.CMD_INSTALL_BIZ, name, version, entry.code, entry.message,
                                     entry.biz_state, entry.installed_name, entry.installed_version)
            self._on_biz_operation(base, op, ts, topic, counted=True)

    def _on_biz_operation(self, base: BaseState, op: arklet.BizOperation, ts: int, topic: str,
                          counted: bool = False) -> None:
        if not op.biz_name:
            # Runtime 1.3.0-1.3.1 names no biz in a failure: it answers the one command of its kind in
            # flight; with several in flight it cannot be told which, and their timeouts decide.
            asked = [key for command, key in base.pending if command == op.command]
            if len(asked) != 1:
                self.reject("unattributed", topic, f"{op.command} {op.code} names no biz, and {len(asked)} "
                            f"{op.command} commands are in flight to base {base.base_id}: {op.message[:200]}")
                return
            name, _, version = asked[0].partition(":")
            op = dataclasses.replace(op, biz_name=name, biz_version=version)
        seen = base.biz_ts.get(op.key)
        if seen is not None and (ts < seen[0] or (ts == seen[0] and seen[1] == op.command)):
            self.reject("stale", topic, f"{op.command} {op.key} at {ts} is not after {seen}")
            return
        base.biz_ts[op.key] = (ts, op.command)
        self._heard(base)
        if not counted:
            MQTT_HANDLED.labels(arklet.BIZ_OPERATION).inc()
        if op.command == arklet.CMD_INSTALL_BIZ:
            INSTALL_RESULTS.labels("success" if op.success else ("repeat" if op.repeat else "failure")).inc()
            if op.success or op.repeat:
                installed = op.installed_key if op.success else op.key
                if installed != op.key:
                    base.biz_ts[installed] = (ts, op.command)
                name, _, version = installed.partition(":")
                base.bizs[installed] = BizRecord(name, version, op.biz_state or arklet.ACTIVATED, ts, ts=ts)
        elif (op.success or op.not_found) and (op.command, op.key) in base.pending:
            # Only an uninstall we asked for takes the module off our books: a replayed or stray
            # reply says nothing about now (the inventory it prompts does).
            base.bizs.pop(op.key, None)
        # The listener decides which Pods this concerns (the one waiting for it, else all on the base).
        self.listener.operation_replied(base, op)

    # --- liveness ---------------------------------------------------------------------------------

    def judge(self, now: float | None = None) -> list[BaseState]:
        """Mark bases that stopped heartbeating NotReady; return those silent past --gone-after.

        Silence counts only from when this provider could hear: during its own outage, and for one
        heartbeat interval after it reconnects (the bases' first heartbeats are on their way), no
        base is judged at all."""
        now = self.clock() if now is None else now
        gone = []
        for base in list(self.bases.values()):
            if base.tunnel == TUNNEL_HTTP:
                since, interval = self.http_hearing_since, self.http_heartbeat_interval
            else:
                since, interval = self.hearing_since, self.heartbeat_interval
            if since is None or now - since < interval:
                continue
            # An old-dialect base beats at its own pace (runtime 1.3.0: every 120 s).
            interval = max(interval, base.heartbeat_every or 0.0)
            silent = now - max(base.last_heard, since)
            missed = silent > interval * self.missed_heartbeats
            if base.ready and base.goodbye_at is not None and (
                    missed or now - max(base.goodbye_at, since) > interval * GOODBYE_CONFIRM_HEARTBEATS):
                # A goodbye that silence confirmed (whichever bound passed first) says why.
                self.set_not_ready(
                    base,
                    "BaseDeactivated",
                    f"base {base.base_id} reported state {base.goodbye_state!a} and sent no heartbeat "
                    f"for {now - base.goodbye_at:.0f}s after it",
                )
            elif base.ready and missed:
                self.set_not_ready(
                    base,
                    "BaseHeartbeatMissed",
                    f"no heartbeat from base {base.base_id} for {silent:.0f}s "
                    f"({self.missed_heartbeats} missed at {interval:g}s)",
                )
            elif not base.ready and not base.gone and silent > self.gone_after:
                base.gone = True
                gone.append(base)
        return gone

    # --- other tunnels in ------------------------------------------------------------------------------

    def receive(self, kind: str, data: object, ts: int, *, base_id: str = "", tunnel: str = TUNNEL_HTTP) -> None:
        """A base's message that came without MQTT's topic and envelope (arklet's HTTP tunnel): `kind`
        is the MQTT topic kind it stands for, `ts` the time that orders it among the base's messages
        (the HTTP tunnel has no base timestamps; its caller stamps them). A heartbeat names its base
        itself; anything else comes from `base_id`. Raises ArkletError for a message that cannot be
        used, for the caller to answer or log."""
        if kind == arklet.HEART:
            identity = _heartbeat_identity(data)
            self._on_heartbeat(identity, arklet_parse.parse_heartbeat(data, identity), ts, tunnel)
            return
        if kind not in (arklet.BIZ_OPERATION, arklet.BIZ, arklet.BASE_HEALTH):
            raise ValueError(f"receive: {kind!r} is not a kind another tunnel delivers")
        base = self.bases.get(base_id)
        if base is None:
            return  # forgotten while the call was out; its next heartbeat brings it back
        self._on_base_message(base, kind, data, ts, f"{tunnel} {kind} of {base_id}")

    def _on_base_message(self, base: BaseState, kind: str, data: Any, ts: int, where: str) -> bool:
        """A known base's reply, inventory or health report, whichever tunnel brought it; False for a
        kind no base sends."""
        if kind == arklet.BIZ_OPERATION:
            self._on_biz_operation(base, arklet_parse.parse_biz_operation(data), ts, where)
            return True
        if kind == arklet.BATCH_INSTALL_RESPONSE:
            self._on_batch_install(base, arklet_replies.parse_batch_install_response(data), ts, where)
            return True
        if not self._in_order(base, kind, ts, where):
            return True
        if kind == arklet.SIMPLE_BIZ:
            self._on_inventory(base, arklet_parse.parse_simple_biz(data), ts)
        elif kind == arklet.BIZ:
            self._on_inventory(base, arklet_parse.parse_biz(data), ts)
        elif kind == arklet.BASE_HEALTH:
            self._on_health(base, arklet_parse.parse_health(data))
        else:
            return False
        MQTT_HANDLED.labels(kind).inc()
        return True


def _tunnel_port(tunnel: str, hb: arklet.Heartbeat) -> int:
    if tunnel != TUNNEL_HTTP:
        return 0
    return hb.port if 0 < hb.port < 65536 else ARKLET_HTTP_DEFAULT_PORT


def _heartbeat_identity(data: object) -> str:
    """The identity a heartbeat claims, checked as such by parse_heartbeat ("" when it has none)."""
    meta = data.get("baseMetadata") if isinstance(data, dict) else None
    identity = meta.get("identity") if isinstance(meta, dict) else None
    return identity if isinstance(identity, str) else ""
