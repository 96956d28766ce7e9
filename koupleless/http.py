"""HTTP plumbing shared by the webhook and the extender: health, readiness, metrics, and TLS that
picks up rotated certificate files without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], bool]
READY_CHECK: web.AppKey[ReadyCheck] = web.AppKey("ready_check")
#: What is wrong, one line each (empty when nothing is): e.g. `Supervisor.problems`.
ProblemsCheck = Callable[[], Sequence[str]]
PROBLEMS_CHECK: web.AppKey[ProblemsCheck] = web.AppKey("problems_check")


def add_health_routes(
    app: web.Application,
    ready: Callable[[], bool] = lambda: True,
    registry: CollectorRegistry = REGISTRY,
    *,
    problems: ProblemsCheck | None = None,
) -> None:
    """`/healthz` (process alive), `/readyz` (can do its job), `/metrics` (Prometheus text).

    `/readyz` is 503 while `ready()` is False, and while `problems()` (when given, e.g. a
    Supervisor's: a critical background task is down) names anything; the body lists them.
    """
    app[READY_CHECK] = ready
    app[PROBLEMS_CHECK] = problems or (lambda: ())

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        wrong = list(request.app[PROBLEMS_CHECK]())
        if request.app[READY_CHECK]() and not wrong:
            return web.Response(text="ok")
        return web.Response(status=503, text="\n".join(["not ready", *wrong]))

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


class ReloadingTLS:
    """One server SSLContext whose certificate follows the files on disk.

    Reloading into the same context means new handshakes get the new certificate while connections
    already open keep theirs, so a rotation fails no request.
    """

    def __init__(self, cert_file: str, key_file: str, poll_interval: float = 1.0) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.poll_interval = poll_interval
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._file_stamp()
        self.context.load_cert_chain(cert_file, key_file)
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def _file_stamp(self) -> tuple[float, int, float, int]:
        c, k = os.stat(self.cert_file), os.stat(self.key_file)
        return (c.st_mtime, c.st_size, k.st_mtime, k.st_size)

    def check(self) -> bool:
        """Reload when either file changed; keep the old certificate if the new pair is unreadable
        (a half-written rotation), and try again on the next poll."""
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning("certificate reload from %s failed, keeping the current one: %s", self.cert_file, exc)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("reloaded serving certificate from %s", self.cert_file)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.check()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.watch())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def serve(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0: any free port) and return its runner and the port it got; on
    failure (the port taken, say) nothing is left running."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    return runner, int(addresses[0][1]) if addresses else port
