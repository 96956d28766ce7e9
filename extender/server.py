"""Running the extender: the watch cache (when there is a kubeconfig), the HTTP(S) server, and an
orderly stop. `module-controller extender` uses it, and so do the e2e tests and the bench."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl

from aiohttp import web

from extender.app import DEFAULT_MAX_BODY, Extender, Settings, make_app
from extender.cache import KubeBinder, WatchCache
from extender.view import ClusterView
from koupleless import keys
from koupleless.kube import KubeClient, KubeConfig
from koupleless.kube.leaderelection import LeaderElectionConfig, LeaderElector, LeaderPodLabel

log = logging.getLogger("extender")


def freeze_heap() -> None:
    """Move everything alive now (the synced cache) out of the garbage collector's sight.

    The cache is hundreds of thousands of long-lived objects; without this, every full collection
    walks them all in the middle of some request, which is the extender's p99 (~40 ms with 5,000
    bases and 20,000 module Pods, against ~0 once frozen). Objects dropped later are still freed
    by reference counting; only cycles among frozen objects would linger, and the cache makes none.
    Called again now and then, since entries the watch replaces are new objects."""
    gc.collect()
    gc.freeze()


REFREEZE_EVERY = 300.0


class ExtenderServer:
    def __init__(
        self,
        kube: KubeConfig | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        settings: Settings | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        election: LeaderElectionConfig | None = None,
        leader_pod: tuple[str, str] | None = None,
    ) -> None:
        """`leader_pod` (namespace, name): the Pod this process runs in, labelled while it leads."""
        if election is not None and kube is None:
            raise ValueError("leader election needs the API server: give a kubeconfig or drop --leader-elect")
        self.kube = kube
        self.election = election
        self.elector: LeaderElector | None = None
        self.leader_pod = leader_pod
        self.leader_label: LeaderPodLabel | None = None
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.settings = settings or Settings()
        self.max_body = max_body
        self.client: KubeClient | None = None
        self.cache: WatchCache | None = None
        self.extender: Extender | None = None
        self._runner: web.AppRunner | None = None
        self._refreeze: asyncio.Task[None] | None = None

    def _reaches_us(self) -> bool:
        """kube-scheduler is meant to reach this replica: there is no election, or it leads (the
        Service selects the leader's Pod). A standby that is called anyway reserves nothing."""
        return self.elector is None or self.elector.is_leader

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self, *, wait_synced: bool = True) -> ExtenderServer:
        view: ClusterView | None = None
        binder: KubeBinder | None = None
        if self.kube is not None:
            # The extender's own calls are few (bindings); its watches are two or three long streams.
            self.client = KubeClient(self.kube, user_agent="koupleless-extender", qps=200, burst=400)
            view = ClusterView()
            self.cache = WatchCache(self.client, view)
            await self.cache.start()
            binder = KubeBinder(self.client)
        self.extender = Extender(view, binder=binder, settings=self.settings, reserves=self._reaches_us)
        if self.election is not None:
            assert self.client is not None
            if self.leader_pod is not None:
                namespace, pod_name = self.leader_pod
                self.leader_label = LeaderPodLabel(self.client, namespace, pod_name,
                                                   keys.LABEL_EXTENDER_ROLE, keys.EXTENDER_ROLE_LEADER)
            self.elector = LeaderElector(
                self.client, self.election, on_change=self.leader_label.set_leading if self.leader_label else None)
        app = make_app(self.extender, max_body=self.max_body)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context, backlog=1024)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        log.info("extender serving %s (%s mode, %s)", self.url,
                 "watch cache" if view is not None else "full-Node only", self.settings.strategy)
        if self.cache is not None and wait_synced:
            await self.wait_synced()
        return self

    async def wait_synced(self) -> None:
        if self.cache is not None and self.extender is not None and self.extender.view is not None:
            await self.cache.wait_synced()
            view = self.extender.view
            log.info("watch cache synced: %d virtual nodes, %d module pods placed", len(view.bases), len(view.usage))
            freeze_heap()
            if self.leader_label is not None:
                self.leader_label.start()
            if self.elector is not None:
                # Campaign only with a warm cache, so whoever leads can answer at once.
                self.elector.start()
            if self._refreeze is None:
                self._refreeze = asyncio.get_running_loop().create_task(self._refreeze_forever())

    async def _refreeze_forever(self) -> None:
        while True:
            await asyncio.sleep(REFREEZE_EVERY)
            freeze_heap()

    async def stop(self) -> None:
        if self.elector is not None:
            # Stop leading (which starts taking the label off our Pod), then free the Lease: the
            # standby takes over at its next try and labels its own Pod.
            await self.elector.stop()
        if self.leader_label is not None:
            await self.leader_label.stop()
        if self._refreeze is not None:
            self._refreeze.cancel()
            await asyncio.gather(self._refreeze, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.cache is not None:
            await self.cache.stop()
        if self.client is not None:
            await self.client.close()
