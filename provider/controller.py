"""The provider: plays kubelet for Koupleless bases. This file only wires the parts together.

- `bases.BaseRegistry`: MQTT in -> what each base reports (no Kubernetes).
- `commands.CommandSender`: commands out over each base's tunnel (MQTT, or `http_commands`).
- `http_tunnel.HttpTunnelServer`: heartbeats of bases on arklet's HTTP tunnel (when on).
- `pods.PodReconciler`: module Pods, desired vs observed -> commands, status, Events, final delete.
- `nodes.NodeReconciler`: Nodes, their status and Leases.
Each reconciler owns one work queue, the only writer of its objects. The background loops here
(liveness, resync, health) only read state and enqueue keys; each is supervised: one that dies is
logged at once and makes /readyz fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Gauge

from koupleless import arklet, keys
from koupleless.kube.client import KubeClient, node_path
from koupleless.kube.events import EventRecorder
from koupleless.kube.informer import Informer
from koupleless.supervise import Supervisor
from provider import vnode
from provider.admission import AdmissionOptions, BaseAdmission
from provider.baseline import baseline_models, claim_baseline
from provider.bases import BaseRegistry, judge_period
from provider.commands import CommandSender
from provider.http_commands import HttpCallOptions, HttpCommands, Stamps
from provider.http_tunnel import HttpTunnelServer, HttpTunnelSettings
from provider.nodes import NodeReconciler, NodeReconcilerOptions
from provider.pods import PodOptions, PodReconciler
from provider.podsource import PodSource
from provider.state import TUNNEL_HTTP, BaseState
from provider.tunnel import BrokerOptions, MqttTunnel

log = logging.getLogger(__name__)

BASES = Gauge("koupleless_provider_bases", "Bases known to this provider, by readiness", ["ready"])

COMPONENT = "koupleless-provider"
#: Commands queued in the MQTT client while the broker is away; past this they are dropped, and
#: sent again by whoever still wants them once the broker is back.
OUTBOX_LIMIT = 20_000
#: A base whose health report lacks JVM or CPU figures is asked again this often, this many times.
HEALTH_RETRY_S = 2.0
HEALTH_RETRIES = 10


@dataclass(frozen=True)
class ProviderOptions:
    env: str = keys.DEFAULT_ENV
    identity: str = "module-controller"
    node: vnode.NodeOptions = field(default_factory=vnode.NodeOptions)
    heartbeat_interval: float = 10.0
    #: NotReady after 2 x 10 s of silence, 4 s more than a healthy base's worst gap with heartbeats
    #: 3 s off their slots (README, "A base that dies": the arithmetic of the 45 s target).
    missed_heartbeats: int = 2
    gone_after: float = 600.0
    #: kubelet's ratio: renew every quarter of the Lease duration (10 s of 40 s).
    lease_renew_interval: float = vnode.LEASE_DURATION_S / 4
    resync_interval: float = 30.0
    health_interval: float = 30.0
    install_timeout: float = 120.0
    orphan_policy: str = "report"
    workers: int = 16
    #: Node syncs at once. Every base's Lease renewal is one (a base every 10 s), so they must cover
    #: bases / 10 s x the API server's write latency: 128 is 5,000 bases at 250 ms a write.
    node_workers: int = 128
    admission: AdmissionOptions = field(default_factory=AdmissionOptions)
    #: arklet's HTTP tunnel beside MQTT (None: off), and its bases' heartbeat period (arklet: 12 s).
    http_tunnel: HttpTunnelSettings | None = None
    http_heartbeat_interval: float = 12.0


class Provider:
    def __init__(self, kube: KubeClient, broker: BrokerOptions, opts: ProviderOptions) -> None:
        self.kube = kube
        self.opts = opts
        env = opts.env
        self.nodes = Informer(
            kube,
            node_path(),
            label_selector=f"{keys.LABEL_COMPONENT_LEGACY}={keys.COMPONENT_VNODE},{keys.LABEL_VNODE_ENV}={env}",
            name="vnodes",
        )
        self.pods = PodSource(kube, is_our_node=lambda name: name.startswith(keys.VNODE_NAME_PREFIX))
        self.events = EventRecorder(kube, COMPONENT)
        self.admission = BaseAdmission(opts.admission, env, self.events,
                                       node_exists=lambda name: self.nodes.get(name) is not None)
        self.registry = BaseRegistry(env, self, heartbeat_interval=opts.heartbeat_interval,
                                     missed_heartbeats=opts.missed_heartbeats, gone_after=opts.gone_after,
                                     admission=self.admission)
        self.tunnel = MqttTunnel(
            broker,
            client_id=f"koupleless@@@{opts.identity}",
            subscriptions=[(arklet.controller_subscription(env), 1)],
            on_message=self.registry.handle,
            on_connection=self._on_connection,
            outbox_limit=OUTBOX_LIMIT,
            name="provider",
        )
        self.registry.http_heartbeat_interval = opts.http_heartbeat_interval
        self.stamps = Stamps()
        self.http_commands = HttpCommands(
            self.registry, self.stamps, self._on_call_failed, HttpCallOptions(operation_timeout=opts.install_timeout)
        ) if opts.http_tunnel else None
        self.commands = CommandSender(self.tunnel, env, self.http_commands)
        self.pod_reconciler = PodReconciler(
            kube, self.registry, self.commands, self.pods, self.events,
            PodOptions(install_timeout=opts.install_timeout, orphan_policy=opts.orphan_policy, workers=opts.workers),
        )
        self.node_reconciler = NodeReconciler(
            kube, self.registry, self.nodes,
            NodeReconcilerOptions(identity=opts.identity, node=opts.node,
                                  lease_renew_interval=opts.lease_renew_interval, workers=opts.node_workers),
            on_owned=self._on_owned,
        )
        self.http_server = HttpTunnelServer(
            opts.http_tunnel, self.registry, self.stamps, identity=opts.identity,
            baseline=self.baseline_answer,
        ) if opts.http_tunnel else None
        self.supervisor = Supervisor("provider")
        self._health_retry: set[str] = set()
        self.started = False

    @property
    def bases(self) -> dict[str, BaseState]:
        return self.registry.bases

    # --- lifecycle --------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Serving: started, connected to the broker, and every background loop alive."""
        return self.started and self.tunnel.connected.is_set() and self.supervisor.healthy()

    def problems(self) -> list[str]:
        """Why /readyz fails, one line each."""
        out = list(self.supervisor.problems())
        if not self.started:
            out.append("starting: waiting for the API server's Nodes and Pods")
        if not self.tunnel.connected.is_set():
            out.append(f"MQTT broker {self.tunnel.broker.host}:{self.tunnel.broker.port} not connected")
        return out

    async def start(self) -> None:
        await self.events.start()
        informers = [self.nodes.start(), *self.pods.start()]
        for task in [*informers, *self.events.tasks]:
            # An informer or Event writer retries every error itself; its task ending at all is a bug to see.
            self.supervisor.spawn(_outlive(task), name=task.get_name())
        await asyncio.gather(self.nodes.wait_synced(), self.pods.wait_synced())
        for node in self.nodes.list():
            self.node_reconciler.adopt(node)
        self.pods.add_handler(self.pod_reconciler.on_pod, self.pod_reconciler.on_pod_gone)
        self.nodes.add_handler(None, self.node_reconciler.on_node_update, self.node_reconciler.on_node_gone)
        self.pod_reconciler.queue.start()
        self.node_reconciler.queue.start()
        await self.tunnel.start()
        if self.http_commands is not None and self.http_server is not None:
            await self.http_commands.start()
            await self.http_server.start()  # OSError (port taken) or ssl.SSLError: the caller says so
        sup = self.supervisor
        sup.spawn(self._liveness_loop, name="liveness")
        sup.spawn(lambda: self._every(self.opts.resync_interval, self._resync_round), name="resync")
        sup.spawn(lambda: self._every(self.opts.health_interval, self._health_round), name="health")
        sup.spawn(self.pod_reconciler.queue.watch, name="pod-queue")
        sup.spawn(self.node_reconciler.queue.watch, name="node-queue")
        for name in list(self.registry.by_node):
            self.node_reconciler.queue.add(name)
        self.started = True
        log.info("provider %s started for env %s: %d known bases", self.opts.identity, self.opts.env,
                 len(self.registry.bases))

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.pod_reconciler.queue.stop()
        await self.node_reconciler.queue.stop()
        await self.tunnel.stop()
        if self.http_server is not None:
            await self.http_server.stop()
        if self.http_commands is not None:
            await self.http_commands.stop()
        await self.nodes.stop()
        await self.pods.stop()
        await self.events.stop()

    # --- the tunnel ---------------------------------------------------------------------------------

    def _on_connection(self, up: bool) -> None:
        self.registry.connection_changed(up)
        if up:
            log.info("MQTT up: asking every base for its modules and health")
            for base in list(self.registry.bases.values()):
                if base.owned and base.tunnel != TUNNEL_HTTP:
                    self.commands.request_inventory(base, force=True)
                    self.commands.request_health(base)
        else:
            log.warning("MQTT down: no base is judged until the broker is back and each had time to heartbeat")

    # --- BaseListener: what the registry reports ----------------------------------------------------

    def base_discovered(self, base: BaseState) -> None:
        self.commands.request_inventory(base, force=True)
        self.commands.request_health(base)
        base.health_retries = HEALTH_RETRIES

    def node_changed(self, base: BaseState) -> None:
        self.node_reconciler.queue.add(base.node_name)

    def modules_changed(self, base: BaseState) -> None:
        self.pod_reconciler.enqueue_node(base.node_name)

    def inventory_received(self, base: BaseState) -> None:
        if base.owned:
            self.pod_reconciler.sweep(base)

    def operation_replied(self, base: BaseState, op: arklet.BizOperation) -> None:
        self.pod_reconciler.on_reply(base, op)

    def base_heard_again(self, base: BaseState) -> None:
        if not base.owned:
            return
        self.commands.request_inventory(base)
        self.pod_reconciler.redrive(base)

    def health_incomplete(self, base: BaseState) -> None:
        if base.health_retries <= 0 or base.base_id in self._health_retry:
            return
        base.health_retries -= 1
        self._health_retry.add(base.base_id)

        def ask() -> None:
            self._health_retry.discard(base.base_id)
            if self.registry.get(base.base_id) is base:
                self.commands.request_health(base)

        asyncio.get_running_loop().call_later(HEALTH_RETRY_S, ask)

    def baseline_answer(self, base: BaseState) -> list[arklet.BizModel]:
        """One answer to a base's queryBaseline, whichever tunnel asked: the holder of its Lease
        claims the modules (in flight until the batch answer or an inventory settles them)."""
        if not base.owned:
            return baseline_models(self.pod_reconciler, base)
        return claim_baseline(self.pod_reconciler, base, self.commands.connection_for(base))

    def baseline_requested(self, base_id: str, base: BaseState | None, metadata: arklet.BaseMetadata) -> None:
        if base is not None and not base.owned:
            return  # the replica holding its Lease answers
        models = self.baseline_answer(base) if base else []
        # Every base asks once per JVM start: worth a line when a known base restarted, not for each
        # of a fleet's new bases (their "new base" line follows).
        log.log(logging.INFO if base else logging.DEBUG, "base %s (%s %s) asked for its baseline: %d modules",
                ascii(base_id), ascii(metadata.name), ascii(metadata.version), len(models))
        self.commands.send_baseline(base_id, models)

    def _on_call_failed(self, base: BaseState, command: str, model: arklet.BizModel | None, why: str) -> None:
        if model is not None:
            self.pod_reconciler.on_call_failed(base, command, model.key, why)

    def _on_owned(self, base: BaseState, new: bool) -> None:
        """This replica now holds the base's Lease. `new`: a base seen for the first time, whose
        modules and health `base_discovered` asked for a moment ago: an inventory that came before
        the Lease is swept now, a later one as it comes (asking again only doubled every new base's
        messages). A base taken over from another replica, or adopted after a restart, is asked
        afresh."""
        self.pod_reconciler.enqueue_node(base.node_name)
        if new:
            if base.inventory_known:
                self.pod_reconciler.sweep(base)
            return
        self.commands.request_inventory(base, force=True)
        self.commands.request_health(base)

    # --- background loops ---------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(judge_period(self.opts.heartbeat_interval))
            for base in self.registry.judge():
                self.node_reconciler.queue.add(base.node_name)
            self.admission.tick()
            ready = sum(1 for b in self.registry.bases.values() if b.ready)
            BASES.labels("true").set(ready)
            BASES.labels("false").set(len(self.registry.bases) - ready)

    async def _every(self, period: float, round_: Callable[[list[BaseState], float], Awaitable[None]]) -> None:
        """Run `round_` once per period, from the period's start, whatever one round takes."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            if loop.time() > next_at:
                next_at = loop.time() + period  # fell behind: do not run rounds back to back
            mqtt_up = self.tunnel.connected.is_set()
            bases = [b for b in self.registry.bases.values()
                     if b.owned and b.ready and (mqtt_up or b.tunnel == TUNNEL_HTTP)]
            if not bases:
                continue
            await round_(bases, period)

    async def _resync_round(self, bases: list[BaseState], period: float) -> None:
        # Spread over half the period: a fleet's answers arrive as a stream, not one burst.
        await _spread(bases, period / 2, lambda b: self.commands.request_inventory(b))

    async def _health_round(self, bases: list[BaseState], period: float) -> None:
        await _spread(bases, period / 2, self.commands.request_health)


async def _outlive(task: asyncio.Task[None]) -> None:
    """Wait for a task someone else owns, without cancelling it when this wait is cancelled."""
    await asyncio.shield(task)


async def _spread(bases: list[BaseState], over: float, act: Callable[[BaseState], None]) -> None:
    step = over / max(len(bases), 1)
    started = time.monotonic()
    for i, base in enumerate(bases):
        wait = started + i * step - time.monotonic()
        if wait > 0.001:
            await asyncio.sleep(wait)
        act(base)
