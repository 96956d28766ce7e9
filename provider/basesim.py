"""Simulated Koupleless bases: N arklets in one process, speaking the MQTT protocol exactly.

Each base has its own baseID, IP and module table, subscribes to its own command topics, heartbeats,
answers installBiz / uninstallBiz / queryAllBiz / health with the payloads arklet publishes, and
announces itself with queryBaseline on start, as arklet does. All bases share one MQTT connection so
a thousand of them fit in a process; on the wire each message is what a real base would send.

Install semantics follow a base configured for rolling upgrades (activate.new.module=true): a new
version of a module becomes ACTIVATED and the old one DEACTIVATED; installing a name:version that is
already there fails with REPEAT_BIZ; uninstalling one that is not there fails with NOT_FOUND_BIZ.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import MQTTMessageInfo

from koupleless import arklet
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


@dataclass
class SimBase:
    base_id: str
    name: str
    version: str
    cluster_name: str
    ip: str
    hostname: str
    alive: bool = True
    started_at: float = field(default_factory=time.monotonic)
    modules: dict[str, SimModule] = field(default_factory=dict)
    installs: int = 0
    uninstalls: int = 0
    last_ts: int = 0

    def next_ts(self) -> int:
        # Strictly increasing per base: the provider orders a base's messages by these.
        self.last_ts = max(arklet.now_ms(), self.last_ts + 1)
        return self.last_ts

    def snapshot(self) -> dict[str, Any]:
        return {
            "baseID": self.base_id,
            "name": self.name,
            "version": self.version,
            "clusterName": self.cluster_name,
            "ip": self.ip,
            "alive": self.alive,
            "installs": self.installs,
            "uninstalls": self.uninstalls,
            "modules": [
                {"name": m.name, "version": m.version, "url": m.url, "state": m.state, "message": m.message}
                for m in self.modules.values()
            ],
        }


def sim_ip(base_id: str) -> str:
    """A stable, unlikely-to-collide 10.x.y.z address per base ID, so several simulator processes
    never hand out the same IP."""
    digest = hashlib.sha256(base_id.encode()).digest()
    return f"10.{digest[0]}.{digest[1]}.{digest[2] % 254 + 1}"


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
        heartbeat_interval: float = 10.0,
        memory_mb: int = 4096,
        cpus: int = 4,
        seed: int | None = None,
    ) -> None:
        self.env = env
        self.install_delay = install_delay
        self.fail_rate = fail_rate
        self.fail_biz = fail_biz
        self.heartbeat_interval = heartbeat_interval
        self.memory_mb = memory_mb
        self.cpus = cpus
        self._random = random.Random(seed)
        prefix = id_prefix if id_prefix is not None else f"{name}-{version.replace('.', '-')}-"
        self.bases: dict[str, SimBase] = {}
        for i in range(count):
            base_id = f"{prefix}{i}"
            self.bases[base_id] = SimBase(
                base_id=base_id,
                name=name,
                version=version,
                cluster_name=cluster_name or name,
                ip=sim_ip(base_id),
                hostname=base_id,
            )
        subs = [(s, 1) for b in self.bases for s in arklet.base_subscriptions(env, b)]
        self.tunnel = MqttTunnel(
            broker,
            client_id=f"koupleless@@@basesim-{prefix}{random.randrange(1 << 30):x}",
            subscriptions=subs,
            on_message=self._on_message,
            persistent_session=False,
            name="basesim",
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.tunnel.start()
        await self.tunnel.connected.wait()
        for base in self.bases.values():
            self._announce(base)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def stop(self, graceful: bool = True) -> None:
        """Graceful: every live base says DEACTIVATED, as arklet does when its JVM shuts down."""
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if graceful:
            goodbyes = [self._heartbeat(b, arklet.DEACTIVATED) for b in self.bases.values() if b.alive]
            await self.tunnel.flush(goodbyes)
        await self.tunnel.stop()

    def kill(self, base_id: str) -> None:
        """The base's JVM died: no more heartbeats, no answers, no goodbye."""
        self.bases[base_id].alive = False

    def shutdown(self, base_id: str) -> None:
        """The base stopped cleanly: one DEACTIVATED heartbeat, then silence."""
        base = self.bases[base_id]
        if base.alive:
            self._heartbeat(base, arklet.DEACTIVATED)
        base.alive = False

    def restart(self, base_id: str) -> None:
        """A fresh JVM with the same identity: no modules, announces itself again."""
        base = self.bases[base_id]
        base.modules.clear()
        base.alive = True
        base.started_at = time.monotonic()
        self._announce(base)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.tunnel.connected.is_set(),
            "bases": {b.base_id: b.snapshot() for b in self.bases.values()},
        }

    # --- outgoing ---------------------------------------------------------------------------------------

    def _publish(self, base: SimBase, kind: str, data: Any) -> MQTTMessageInfo:
        return self.tunnel.publish(
            arklet.topic(self.env, base.base_id, kind), arklet.encode_envelope(data, base.next_ts()), qos=1
        )

    def _heartbeat(self, base: SimBase, state: str = arklet.ACTIVATED) -> MQTTMessageInfo:
        hb = arklet.Heartbeat(
            metadata=arklet.BaseMetadata(base.base_id, base.name, base.version, base.cluster_name),
            local_ip=base.ip,
            local_hostname=base.hostname,
            port=0,
            state=state,
        )
        return self._publish(base, arklet.HEART, hb.to_wire())

    def _announce(self, base: SimBase) -> None:
        self._heartbeat(base)
        self._publish(base, arklet.QUERY_BASELINE, base_metadata_wire(base))

    async def _heartbeats(self) -> None:
        while True:
            # Spread a big fleet's heartbeats over the interval instead of one burst.
            bases = list(self.bases.values())
            step = self.heartbeat_interval / max(len(bases), 1)
            started = time.monotonic()
            for i, base in enumerate(bases):
                delay = started + i * step - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if base.alive:
                    self._heartbeat(base)
            rest = started + self.heartbeat_interval - time.monotonic()
            await asyncio.sleep(max(rest, 0.01))

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
            run_time = time.monotonic() - base.started_at
            self._publish(base, arklet.BASE_HEALTH, arklet.health_data(self.memory_mb, self.cpus, run_time, master_name=base.name))
        elif command == arklet.CMD_QUERY_ALL_BIZ:
            self._publish(base, arklet.SIMPLE_BIZ, [arklet.simple_biz_item(m.status()) for m in base.modules.values()])
        elif command in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ):
            try:
                model = arklet.parse_biz_model(payload)
            except arklet.ArkletError as exc:
                log.warning("base %s: bad %s command: %s", base_id, command, exc)
                return
            task = asyncio.get_running_loop().create_task(self._operate(base, command, model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _operate(self, base: SimBase, command: str, model: arklet.BizModel) -> None:
        if command == arklet.CMD_INSTALL_BIZ:
            base.installs += 1
            if self.install_delay > 0:
                await asyncio.sleep(self.install_delay)
            if not base.alive:
                return
            self._install(base, model)
        else:
            base.uninstalls += 1
            if not base.alive:
                return
            self._uninstall(base, model)

    def _install(self, base: SimBase, model: arklet.BizModel) -> None:
        now = arklet.now_ms()
        cmd = arklet.CMD_INSTALL_BIZ
        if model.key in base.modules and base.modules[model.key].state == arklet.ACTIVATED:
            msg = f"REPEAT_BIZ: biz {model.key} has been installed"
            self._publish(base, arklet.BIZ_OPERATION, arklet.biz_operation_data(cmd, model, arklet.CODE_FAILED, msg))
            return
        if model.biz_name in self.fail_biz or (self.fail_rate > 0 and self._random.random() < self.fail_rate):
            msg = (
                f"install biz {model.key} failed: java.lang.IllegalStateException: "
                f"simulated failure of {model.biz_url} on base {base.base_id}"
            )
            self._publish(base, arklet.BIZ_OPERATION, arklet.biz_operation_data(cmd, model, arklet.CODE_FAILED, msg))
            return
        for other in base.modules.values():
            if other.name == model.biz_name and other.state == arklet.ACTIVATED:
                other.state, other.change_time_ms, other.reason = arklet.DEACTIVATED, now, "SWITCHED"
                other.message = f"superseded by {model.key}"
        base.modules[model.key] = SimModule(
            model.biz_name, model.biz_version, model.biz_url, arklet.ACTIVATED, now, "STARTED"
        )
        self._publish(
            base,
            arklet.BIZ_OPERATION,
            arklet.biz_operation_data(cmd, model, arklet.CODE_SUCCESS, biz_state=arklet.ACTIVATED, elapsed=1024),
        )

    def _uninstall(self, base: SimBase, model: arklet.BizModel) -> None:
        cmd = arklet.CMD_UNINSTALL_BIZ
        if base.modules.pop(model.key, None) is None:
            msg = f"NOT_FOUND_BIZ: biz {model.key} not found"
            self._publish(base, arklet.BIZ_OPERATION, arklet.biz_operation_data(cmd, model, arklet.CODE_FAILED, msg))
            return
        self._publish(base, arklet.BIZ_OPERATION, arklet.biz_operation_data(cmd, model, arklet.CODE_SUCCESS))


def base_metadata_wire(base: SimBase) -> dict[str, str]:
    return arklet.BaseMetadata(base.base_id, base.name, base.version, base.cluster_name).to_wire()
