"""A loopback TCP proxy that does what manifests/scheduler's Service does for the extender replicas:
each new connection goes to a replica whose Pod, read from the API server, carries the Service's
selector labels (the leader label included) and whose /readyz answers 200. With no such replica the
connection is closed, as with a Service without endpoints. Connections already open stay where
they are, as with kube-proxy. Runs its own event loop in a thread; stops with `close()`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from devcluster.processes import free_port
from koupleless.kube import ApiError, KubeClient, load_config
from koupleless.kube.client import pod_path


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class LabelProxy:
    def __init__(self, kubeconfig: Path, namespace: str, selector: Mapping[str, str],
                 backends: Mapping[str, int]) -> None:
        """`backends`: Pod name -> the loopback port of the process standing for that Pod."""
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.selector = ",".join(f"{k}={v}" for k, v in selector.items())
        self.backends = dict(backends)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: backend port per accepted connection, in order (which replica the scheduler talked to).
        self.routed: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._client: KubeClient | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="label-proxy", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the test proxy did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = KubeClient(load_config(str(self.kubeconfig)))
        server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.run_until_complete(self._client.close())
            self._loop.close()

    async def endpoints(self) -> list[int]:
        """Ports of the selected, ready replicas (a Service's endpoints), in Pod-name order."""
        assert self._client is not None
        found = await self._client.list(pod_path(self.namespace), {"labelSelector": self.selector})
        names = sorted(p["metadata"]["name"] for p in found.get("items") or [])
        ports = [self.backends[n] for n in names if n in self.backends]
        return [p for p in ports if await asyncio.to_thread(_ready, p)]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            endpoints = await self.endpoints()
        except ApiError:
            endpoints = []
        if not endpoints:
            writer.close()
            return
        backend = endpoints[0]
        self.routed.append(backend)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
