"""Commands to bases: installBiz, uninstallBiz, queryAllBiz, health, baseline, over each base's own
tunnel (MQTT, or arklet's HTTP API: provider/http_commands.py).

Commands are hints, never retained (reference §8.4: a retained installBiz would be replayed to a
restarted base) and never trusted to arrive: the Pod reconciler keeps what it sent and sends it
again after a timeout or a reconnect; the base's inventory decides what is true.
"""

from __future__ import annotations

import logging
import time

import orjson
from prometheus_client import Counter

from koupleless import arklet
from provider.http_commands import HttpCommands
from provider.state import TUNNEL_HTTP, BaseState
from provider.tunnel import MqttTunnel

log = logging.getLogger(__name__)

COMMANDS = Counter("koupleless_provider_commands_total", "Commands published to bases", ["command"])
COMMANDS_DROPPED = Counter(
    "koupleless_provider_commands_dropped_total",
    "Commands not queued because the MQTT outbox was full (sent again once the broker is back)", ["command"],
)

#: queryAllBiz to one base at most this often, however many Pods ask.
INVENTORY_MIN_INTERVAL_S = 1.0


class CommandSender:
    def __init__(self, tunnel: MqttTunnel, env: str, http: HttpCommands | None = None) -> None:
        self.tunnel = tunnel
        self.env = env
        self.http = http

    @property
    def connection(self) -> int:
        """Which MQTT connection a command goes out on now (0 while there is none)."""
        return self.tunnel.connect_count if self.tunnel.connected.is_set() else 0

    def connection_for(self, base: BaseState) -> int:
        """`connection` for this base's tunnel: HTTP calls need no connection, so never wait for one."""
        return 1 if base.tunnel == TUNNEL_HTTP else self.connection

    def publish(self, base: BaseState, command: str, model: arklet.BizModel | None = None) -> bool:
        """Hand one command to the base's tunnel; False when it was dropped (outbox or backlog full)."""
        if base.tunnel == TUNNEL_HTTP:
            ok = self.http is not None and self.http.send(base, command, model)
        else:
            qos = 1 if model is not None else 0
            ok = self.tunnel.send(arklet.topic(self.env, base.base_id, command), arklet.encode_command(model), qos=qos)
        if ok:
            COMMANDS.labels(command).inc()
        else:
            COMMANDS_DROPPED.labels(command).inc()
        return ok

    def send_baseline(self, base_id: str, models: list[arklet.BizModel]) -> bool:
        """A base's baseline: a JSON array of BizModel, no envelope, QoS 1 (reference §2.2)."""
        payload = orjson.dumps([m.to_wire() for m in models])
        ok = self.tunnel.send(arklet.topic(self.env, base_id, arklet.CMD_BASELINE), payload, qos=1)
        (COMMANDS if ok else COMMANDS_DROPPED).labels(arklet.CMD_BASELINE).inc()
        return ok

    def request_inventory(self, base: BaseState, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - base.inventory_requested_at < INVENTORY_MIN_INTERVAL_S:
            return
        base.inventory_requested_at = now
        self.publish(base, arklet.CMD_QUERY_ALL_BIZ)

    def request_health(self, base: BaseState) -> None:
        self.publish(base, arklet.CMD_HEALTH)
