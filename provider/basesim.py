"""Simulated Koupleless bases: N arklets in one process, speaking the MQTT protocol exactly.

Each base has its own baseID, IP and module table, subscribes to its own command topics, heartbeats,
answers installBiz / uninstallBiz / queryAllBiz / health / baseline with the payloads arklet
publishes, and announces itself on every start with queryBaseline and then its first heartbeat, as
arklet does. On the wire each message is what a real base would send.

Connections: with `logins` (baseID -> broker options, user name = the baseID) every base has its own
MQTT connection and identity, client id `<client_prefix>@@@<baseID>` like arklet's, so a broker
that gives each base its own account and ACL sees exactly what real bases do. Without it all bases
share one connection and one account, which lets thousands of them fit in a process (paho runs a
thread per connection), but needs an account allowed to speak for every base.

Install semantics follow a base configured for rolling upgrades (activate.new.module=true): a new
version of a module becomes ACTIVATED and the old one DEACTIVATED; installing a name:version that is
already ACTIVATED fails at once with REPEAT_BIZ; uninstalling one that is not there fails with
NOT_FOUND_BIZ.

Real arklet's habits, each behind a flag and on by default where arklet has it:
- `version_from_jar` (on): arklet reads the version from the jar, so a module is installed (and
  later reported) under the version in a `<artifact>-<version>-ark-biz.jar` name when it differs
  from the requested one; the reply echoes the request at top level and the installed biz in
  `response.data.bizInfos[0]`. Uninstall goes by the bizName:bizVersion it is sent, as arklet's
  does, so uninstalling such a module by its requested version answers NOT_FOUND_BIZ.
- `late_health_metrics` (on): the first health answer after a (re)start has no `jvm` / `cpu`.
- `goodbye` (off): arklet sends nothing when its JVM stops; with it, a graceful stop or a shutdown
  first sends one DEACTIVATED heartbeat.

`dialect` picks the runtime version whose wire shapes the bases speak (provider/basesim_dialects.py):
`current` (>= 1.4, the default), `1.3.0` or `1.3.2`.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from paho.mqtt.client import MQTTMessageInfo

from koupleless import arklet, arklet_base_payloads, arklet_parse
from koupleless.model import infer_from_jar
from provider import basesim_dialects as dialects
from provider.tunnel import BrokerOptions, MqttTunnel

log = logging.getLogger(__name__)


@dataclass
class SimModule:
    name: str
    version: str
    url: str
    state: str
    change_time_ms: int
    reason: str = ""
    message: str = ""

    def status(self) -> arklet.BizStatus:
        return arklet.BizStatus(self.name, self.version, self.state, self.change_time_ms, self.reason, self.message)


#: Lifecycle of a simulated JVM, as the snapshot shows it.
RUNNING = "running"
KILLED = "killed"
STOPPED = "stopped"

#: SOFAArk client codes arklet puts in a failed reply's data.code.
REPEAT_BIZ = "REPEAT_BIZ"
NOT_FOUND_BIZ = "NOT_FOUND_BIZ"


@dataclass
class SimBase:
    base_id: str
    name: str
    version: str
    cluster_name: str
    ip: str
    hostname: str
    #: Where the base sits in the simulator (`<id-prefix><n>`): stays when a new JVM takes a new ID.
    slot: str = ""
    alive: bool = True
    lifecycle: str = RUNNING
    started_at: float = field(default_factory=time.monotonic)
    #: Bumped whenever the JVM dies or starts again: work begun by an earlier JVM is dropped.
    generation: int = 0
    modules: dict[str, SimModule] = field(default_factory=dict)
    #: Installs actually performed: a module became ACTIVATED (by installBiz or a baseline).
    installs: int = 0
    #: Every installBiz command received, whatever became of it.
    install_commands: int = 0
    #: installBiz commands (and baseline entries) answered REPEAT_BIZ.
    repeats: int = 0
    uninstalls: int = 0
    #: baseline commands answered with a batchInstallBizResponse.
    baselines: int = 0
    #: Health answers since this JVM started (the first one lacks jvm/cpu with late metrics).
    health_answers: int = 0
    last_ts: int = 0
    #: (topic, payload) of the last bizOperation published, for the replay action.
    last_biz_operation: tuple[str, bytes] | None = None

    def next_ts(self) -> int:
        # Strictly increasing per base: the provider orders a base's messages by these.
        self.last_ts = max(arklet.now_ms(), self.last_ts + 1)
        return self.last_ts

    def snapshot(self) -> dict[str, Any]:
        return {
            "baseID": self.base_id,
            "slot": self.slot,
            "name": self.name,
            "version": self.version,
            "clusterName": self.cluster_name,
            "ip": self.ip,
            "alive": self.alive,
            "lifecycle": self.lifecycle,
            "installs": self.installs,
            "install_commands": self.install_commands,
            "repeats": self.repeats,
            "uninstalls": self.uninstalls,
            "baselines": self.baselines,
            "modules": [
                {"name": m.name, "version": m.version, "url": m.url, "state": m.state, "message": m.message}
                for m in self.modules.values()
            ],
        }


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """What one install did: the reply's code and message, and the biz as installed (None when the
    base could not tell what the jar is)."""

    code: str
    message: str = ""
    installed: arklet.BizModel | None = None
    biz_state: str = ""
    #: SOFAArk's own code for data.code (REPEAT_BIZ, ...), empty = same as `code`.
    detail_code: str = ""


def sim_ip(base_id: str) -> str:
    """A stable, unlikely-to-collide 10.x.y.z address per base ID, so several simulator processes
    never hand out the same IP."""
    digest = hashlib.sha256(base_id.encode()).digest()
    return f"10.{digest[0]}.{digest[1]}.{digest[2] % 254 + 1}"


def default_id_prefix(name: str, version: str) -> str:
    return f"{name}-{version.replace('.', '-')}-"


def sim_base_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def heartbeat_schedule(count: int, interval: float, jitter: float, start: float,
                       rng: random.Random) -> Iterator[tuple[float, int]]:
    """(time, base index) of every heartbeat of `count` bases from `start` on, in time order.

    arklet's heartbeat is a fixed-rate timer: base n beats in its own slot of the interval (a big
    fleet spread over it instead of one burst), once an interval. With `jitter` each beat is moved
    off its slot by up to that much either way, independently, so two beats of one base are
    interval +- 2 x jitter apart and the slots never drift. The first slots start one jitter after
    `start`, so no beat is due before it."""
    step = interval / max(count, 1)
    first = start + jitter

    def jittered(slot: float) -> float:
        return slot + rng.uniform(-jitter, jitter) if jitter else slot

    due = [(jittered(first + i * step), i, first + i * step) for i in range(count)]
    heapq.heapify(due)
    while due:
        at, i, slot = due[0]
        yield at, i
        slot += interval
        heapq.heapreplace(due, (jittered(slot), i, slot))


class BaseSimulator:
    def __init__(
        self,
        broker: BrokerOptions,
        *,
        env: str = "dev",
        count: int = 1,
        name: str = "base",
        version: str = "1.1.1",
        cluster_name: str = "",
        id_prefix: str | None = None,
        install_delay: float = 0.0,
        fail_rate: float = 0.0,
        fail_biz: frozenset[str] = frozenset(),
        heartbeat_interval: float | None = None,
        heartbeat_jitter: float = 0.0,
        memory_mb: int = 4096,
        cpus: int = 4,
        seed: int | None = None,
        version_from_jar: bool = True,
        goodbye: bool = False,
        late_health_metrics: bool = True,
        dialect: str = dialects.CURRENT.name,
        logins: Mapping[str, BrokerOptions] | None = None,
        client_prefix: str = "koupleless",
    ) -> None:
        self.env = env
        self.dialect = dialects.DIALECTS[dialect]
        if heartbeat_interval is None:
            heartbeat_interval = self.dialect.heartbeat_s
        self.install_delay = install_delay
        self.fail_rate = fail_rate
        self.fail_biz = fail_biz
        if not 0.0 <= heartbeat_jitter < heartbeat_interval / 2:
            raise ValueError(f"--heartbeat-jitter {heartbeat_jitter:g}: between 0 and half the heartbeat interval "
                             f"(under {heartbeat_interval / 2:g} s), so each base's beats stay in order")
        self.heartbeat_interval = heartbeat_interval
        #: Each beat lands up to this many seconds before or after its slot on the fixed-rate schedule
        #: (network or GC delay); the schedule itself never drifts.
        self.heartbeat_jitter = heartbeat_jitter
        self._jitter_random = random.Random(None if seed is None else seed + 1)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.version_from_jar = version_from_jar
        self.goodbye = goodbye
        self.late_health_metrics = late_health_metrics
        self._random = random.Random(seed)
        prefix = id_prefix if id_prefix is not None else default_id_prefix(name, version)
        self.bases: dict[str, SimBase] = {}
        for i in range(count):
            slot = f"{prefix}{i}"
            base_id = dialects.new_jvm_id() if self.dialect.uuid_ids else slot
            self.bases[base_id] = SimBase(
                base_id=base_id,
                name=name,
                version=version,
                cluster_name=cluster_name or name,
                ip=sim_ip(slot),
                hostname=slot,
                slot=slot,
            )
        if logins is not None and self.dialect.uuid_ids:
            raise ValueError(f"--dialect {dialect} names each base by a random UUID per JVM start, so no login can be "
                             "issued for it ahead: run these bases on one shared login (no per-base logins)")
        if logins is None:
            shared = MqttTunnel(
                broker,
                client_id=f"{client_prefix}@@@basesim-{prefix}{random.randrange(1 << 30):x}",
                subscriptions=[(s, 1) for b in self.bases for s in arklet.base_subscriptions(env, b)],
                on_message=self._on_message,
                persistent_session=False,
                name="basesim",
            )
            #: The connection each base speaks on (shared: the same one for all).
            self.tunnels = dict.fromkeys(self.bases, shared)
        else:
            missing = [b for b in self.bases if b not in logins]
            if missing:
                raise ValueError(f"no credentials for base {missing[0]!r} ({len(missing)} bases without); "
                                 "give every base ID of this simulator a login")
            self.tunnels = {
                b: MqttTunnel(
                    logins[b],
                    client_id=f"{client_prefix}@@@{b}",
                    subscriptions=[(s, 1) for s in arklet.base_subscriptions(env, b)],
                    on_message=self._on_message,
                    persistent_session=False,
                    name="basesim",
                )
                for b in self.bases
            }
        self.connections = list({id(t): t for t in self.tunnels.values()}.values())
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None

    def connected(self) -> bool:
        return all(t.connected.is_set() for t in self.connections)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, subscribe_timeout: float = 10.0) -> None:
        for tunnel in self.connections:
            await tunnel.start()
        await asyncio.gather(*(t.connected.wait() for t in self.connections))
        await self._await_subscriptions(subscribe_timeout)
        for base in self.bases.values():
            self._announce(base)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _await_subscriptions(self, timeout: float) -> None:
        """Like arklet, subscribe before announcing: a controller answers a new base's first
        heartbeat with commands at once, and a command sent before the broker has our SUBSCRIBE is
        lost (commands are not retained). The broker's SUBACK says it has it."""
        try:
            await asyncio.wait_for(asyncio.gather(*(t.subscribed.wait() for t in self.connections)), timeout)
        except TimeoutError:
            log.warning("base-sim: broker has not acknowledged every subscription after %.0fs; announcing anyway "
                        "(commands may be missed)", timeout)

    async def stop(self, graceful: bool = True) -> None:
        """Stop every base. Real arklet says nothing when its JVM stops; with `goodbye` a graceful
        stop first sends one DEACTIVATED heartbeat from every live base."""
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if graceful and self.goodbye:
            goodbyes: dict[MqttTunnel, list[MQTTMessageInfo]] = {t: [] for t in self.connections}
            for b in self.bases.values():
                if b.alive:
                    goodbyes[self.tunnels[b.base_id]].append(self._heartbeat(b, arklet.DEACTIVATED))
            await asyncio.gather(*(t.flush(infos) for t, infos in goodbyes.items()))
        await asyncio.gather(*(t.stop() for t in self.connections))

    def kill(self, base_id: str) -> None:
        """The base's JVM died: no more heartbeats, no answers, no goodbye."""
        self._end(self.bases[base_id], KILLED)

    def shutdown(self, base_id: str) -> None:
        """The base stopped cleanly: silence, as arklet (with `goodbye`: one DEACTIVATED heartbeat
        first)."""
        base = self.bases[base_id]
        if base.alive and self.goodbye:
            self._heartbeat(base, arklet.DEACTIVATED)
        self._end(base, STOPPED)

    def restart(self, base_id: str) -> str:
        """A fresh JVM: no modules, health metrics not yet registered; announces itself again with
        queryBaseline (where the dialect has it), then a heartbeat. Same identity, except in a
        dialect with UUID base IDs, where the new JVM takes a new one. Returns the base's ID."""
        base = self.bases[base_id]
        if self.dialect.uuid_ids:
            self._rename(base, dialects.new_jvm_id())
        base.modules.clear()
        base.alive = True
        base.lifecycle = RUNNING
        base.generation += 1
        base.health_answers = 0
        base.started_at = time.monotonic()
        self._announce(base)
        return base.base_id

    def _rename(self, base: SimBase, new_id: str) -> None:
        """The new JVM's ID: listen on its topics, no more on the old ones. The subscription goes out
        before the announcement on the same connection, so the broker has it before any answer."""
        tunnel = self.tunnels.pop(base.base_id)  # shared: UUID dialects have no per-base logins
        for sub in arklet.base_subscriptions(self.env, base.base_id):
            tunnel.remove_subscription(sub)
        del self.bases[base.base_id]
        base.base_id = new_id
        self.bases[new_id] = base
        self.tunnels[new_id] = tunnel
        for sub in arklet.base_subscriptions(self.env, new_id):
            tunnel.add_subscription(sub)

    def replay(self, base_id: str) -> bool:
        """Publish the base's last bizOperation again, byte for byte: a duplicated or replayed
        reply (the broker's doing, so even a dead base's). False if it never sent one."""
        base = self.bases[base_id]
        if base.last_biz_operation is None:
            return False
        topic, payload = base.last_biz_operation
        self.tunnels[base_id].publish(topic, payload, qos=1)
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected(),
            "bases": {b.base_id: b.snapshot() for b in self.bases.values()},
        }

    def _end(self, base: SimBase, lifecycle: str) -> None:
        if base.alive:
            base.generation += 1
            base.lifecycle = lifecycle
        base.alive = False

    # --- outgoing ---------------------------------------------------------------------------------------

    def _publish(self, base: SimBase, kind: str, data: Any) -> MQTTMessageInfo:
        topic = arklet.topic(self.env, base.base_id, kind)
        payload = arklet.encode_envelope(data, base.next_ts())
        if kind == arklet.BIZ_OPERATION:
            base.last_biz_operation = (topic, payload)
        return self.tunnels[base.base_id].publish(topic, payload, qos=1)

    def _heartbeat(self, base: SimBase, state: str = arklet.ACTIVATED) -> MQTTMessageInfo:
        hb = arklet.Heartbeat(
            metadata=arklet.BaseMetadata(base.base_id, base.name, base.version, base.cluster_name),
            local_ip=base.ip,
            local_hostname=base.hostname,
            port=0,
            state=state,
        )
        return self._publish(base, arklet.HEART, dialects.heartbeat_data(self.dialect, hb))

    def _announce(self, base: SimBase) -> None:
        # arklet (>= 1.4) asks for its baseline first, then starts its heartbeat task.
        if self.dialect.baselines:
            self._publish(base, arklet.QUERY_BASELINE, base_metadata_wire(base))
        self._heartbeat(base)

    def _publish_inventory(self, base: SimBase) -> None:
        kind, data = dialects.inventory(self.dialect, [m.status() for m in base.modules.values()])
        self._publish(base, kind, data)

    def _publish_reply(self, base: SimBase, data: dict[str, Any]) -> None:
        """A command's outcome as the dialect answers it: a bizOperation, or the full module list."""
        reply = dialects.operation_reply(self.dialect, data)
        if reply is None:
            self._publish_inventory(base)
        else:
            self._publish(base, arklet.BIZ_OPERATION, reply)

    async def _heartbeats(self) -> None:
        bases = list(self.bases.values())
        for at, i in heartbeat_schedule(len(bases), self.heartbeat_interval, self.heartbeat_jitter,
                                        time.monotonic(), self._jitter_random):
            # Also when behind (sleep 0): a fleet late on every beat still lets its replies out.
            await asyncio.sleep(max(at - time.monotonic(), 0.0))
            if bases[i].alive:
                self._heartbeat(bases[i])

    # --- incoming ---------------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            base_id, command = arklet.parse_topic(self.env, topic, direction="command")
        except arklet.ArkletError:
            return
        base = self.bases.get(base_id)
        if base is None or not base.alive:
            return
        if command == arklet.CMD_HEALTH:
            self._answer_health(base)
        elif command == arklet.CMD_QUERY_ALL_BIZ:
            self._publish_inventory(base)
        elif command == arklet.CMD_BASELINE and self.dialect.baselines:
            try:
                models = parse_baseline(payload)
            except arklet.ArkletError as exc:
                log.warning("base %s: bad baseline: %s", base_id, exc)
                return
            self._spawn(self._batch_install(base, models))
        elif command in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ):
            if command == arklet.CMD_INSTALL_BIZ:
                base.install_commands += 1
            try:
                model = arklet_parse.parse_biz_model(payload)
            except arklet.ArkletError as exc:
                log.warning("base %s: bad %s command: %s", base_id, command, exc)
                return
            if command == arklet.CMD_INSTALL_BIZ and self._would_repeat(base, model):
                self._install(base, model)  # REPEAT_BIZ, at once: arklet checks before installing
                return
            self._spawn(self._operate(base, command, model))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer_health(self, base: SimBase) -> None:
        first = base.health_answers == 0
        base.health_answers += 1
        run_time = time.monotonic() - base.started_at
        data = arklet_base_payloads.health_data(
            self.memory_mb, self.cpus, run_time, master_name=base.name,
            metrics=not (self.late_health_metrics and first),
        )
        self._publish(base, arklet.BASE_HEALTH, data)

    async def _operate(self, base: SimBase, command: str, model: arklet.BizModel) -> None:
        generation = base.generation
        if command == arklet.CMD_INSTALL_BIZ:
            if self.install_delay > 0:
                await asyncio.sleep(self.install_delay)
            if base.alive and base.generation == generation:
                self._install(base, model)
        else:
            base.uninstalls += 1
            if base.alive:
                self._uninstall(base, model)

    async def _batch_install(self, base: SimBase, models: list[arklet.BizModel]) -> None:
        """A baseline: install every module (in parallel, as arklet does, so one install delay),
        then one batchInstallBizResponse keyed by bizUrl."""
        generation = base.generation
        if self.install_delay > 0 and not all(self._would_repeat(base, m) for m in models):
            await asyncio.sleep(self.install_delay)
        if not base.alive or base.generation != generation:
            return
        base.baselines += 1
        entries = {}
        for model in models:
            out = self._perform_install(base, model)
            entries[model.biz_url] = arklet_base_payloads.batch_install_entry(out.code, out.message, out.installed, out.biz_state)
        self._publish(base, arklet.BATCH_INSTALL_RESPONSE, arklet_base_payloads.batch_install_response_data(entries, elapsed=1024))

    def installed_as(self, model: arklet.BizModel) -> arklet.BizModel | None:
        """The biz a jar installs as: the requested name, and the version from the jar's name when
        `version_from_jar` (arklet reads it from the manifest); name and version both from the jar
        when the request leaves them empty. None when nothing says what the jar is."""
        inferred = infer_from_jar(model.biz_url)
        if not model.biz_name:
            if inferred is None:
                return None
            return arklet.BizModel(inferred[0], inferred[1], model.biz_url)
        if self.version_from_jar and inferred is not None and inferred[1] != model.biz_version:
            return arklet.BizModel(model.biz_name, inferred[1], model.biz_url)
        return model

    def _would_repeat(self, base: SimBase, model: arklet.BizModel) -> bool:
        target = self.installed_as(model)
        existing = base.modules.get(target.key) if target else None
        return existing is not None and existing.state == arklet.ACTIVATED

    def _perform_install(self, base: SimBase, model: arklet.BizModel) -> InstallOutcome:
        """Install `model` on `base` now (state changes and counters), saying how it went."""
        target = self.installed_as(model)
        if target is None:
            return InstallOutcome(
                arklet.CODE_FAILED,
                f"install biz failed: bizName and bizVersion are empty and {model.biz_url!r} is not a "
                "<artifact>-<version>-ark-biz.jar name to read them from; send bizName and bizVersion",
            )
        existing = base.modules.get(target.key)
        if existing is not None and existing.state == arklet.ACTIVATED:
            base.repeats += 1
            return InstallOutcome(
                arklet.CODE_FAILED, f"{REPEAT_BIZ}: biz {target.key} has been installed", target, "",
                detail_code=REPEAT_BIZ,
            )
        if target.biz_name in self.fail_biz or (self.fail_rate > 0 and self._random.random() < self.fail_rate):
            return InstallOutcome(
                arklet.CODE_FAILED,
                f"install biz {target.key} failed: java.lang.IllegalStateException: "
                f"simulated failure of {model.biz_url} on base {base.base_id}",
                target,
            )
        now = arklet.now_ms()
        for other in base.modules.values():
            if other.name == target.biz_name and other.state == arklet.ACTIVATED:
                other.state, other.change_time_ms, other.reason = arklet.DEACTIVATED, now, "SWITCHED"
                other.message = f"superseded by {target.key}"
        base.modules[target.key] = SimModule(
            target.biz_name, target.biz_version, model.biz_url, arklet.ACTIVATED, now, "STARTED"
        )
        base.installs += 1
        return InstallOutcome(arklet.CODE_SUCCESS, "", target, arklet.ACTIVATED)

    def _install(self, base: SimBase, model: arklet.BizModel) -> None:
        out = self._perform_install(base, model)
        data = arklet_base_payloads.biz_operation_data(
            arklet.CMD_INSTALL_BIZ, model, out.code, out.message, biz_state=out.biz_state,
            elapsed=1024 if out.code == arklet.CODE_SUCCESS else 0,
            installed=out.installed, detail_code=out.detail_code,
        )
        self._publish_reply(base, data)

    def _uninstall(self, base: SimBase, model: arklet.BizModel) -> None:
        cmd = arklet.CMD_UNINSTALL_BIZ
        if base.modules.pop(model.key, None) is None:
            msg = f"{NOT_FOUND_BIZ}: biz {model.key} not found"
            self._publish_reply(
                base, arklet_base_payloads.biz_operation_data(cmd, model, arklet.CODE_FAILED, msg, detail_code=NOT_FOUND_BIZ),
            )
            return
        self._publish_reply(base, arklet_base_payloads.biz_operation_data(cmd, model, arklet.CODE_SUCCESS))


def base_metadata_wire(base: SimBase) -> dict[str, str]:
    return arklet.BaseMetadata(base.base_id, base.name, base.version, base.cluster_name).to_wire()


def parse_baseline(payload: bytes) -> list[arklet.BizModel]:
    """A baseline command: a JSON array of BizModel, each read as an installBiz payload is."""
    items = arklet.decode_json(payload)
    if not isinstance(items, list):
        raise arklet.ArkletError(
            "wrong_type", "payload", "a baseline must be an array", 'send [{"bizName", "bizVersion", "bizUrl"}, ...]'
        )
    models = []
    for i, item in enumerate(items):
        try:
            models.append(arklet_parse.parse_biz_model(orjson.dumps(item)))
        except arklet.ArkletError as exc:
            raise arklet.ArkletError(exc.kind, f"payload[{i}]", exc.what, exc.fix) from None
    return models
