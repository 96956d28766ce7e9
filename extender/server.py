"""Running the extender: the watch cache (when there is a kubeconfig), the HTTP(S) server, and an
orderly stop. `module-controller extender` uses it, and so do the e2e tests and the bench."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from extender.app import DEFAULT_MAX_BODY, Extender, Settings, make_app
from extender.cache import KubeBinder, WatchCache
from extender.view import ClusterView
from koupleless.kube import KubeClient, KubeConfig

log = logging.getLogger("extender")


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
    ) -> None:
        self.kube = kube
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.settings = settings or Settings()
        self.max_body = max_body
        self.client: KubeClient | None = None
        self.cache: WatchCache | None = None
        self.extender: Extender | None = None
        self._runner: web.AppRunner | None = None

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
        self.extender = Extender(view, binder=binder, settings=self.settings)
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
            await self.cache.wait_synced()
            assert view is not None
            log.info("watch cache synced: %d virtual nodes, %d module pods placed", len(view.bases), len(view.usage))
        return self

    async def wait_synced(self) -> None:
        if self.cache is not None:
            await self.cache.wait_synced()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.cache is not None:
            await self.cache.stop()
        if self.client is not None:
            await self.client.close()
