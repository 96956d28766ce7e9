"""Simulated bases on arklet's HTTP tunnel (`base-sim --tunnel http`).

Each base serves arklet's HTTP API on 127.0.0.1 at a port of its own (its heartbeat's `port`) and
answers /installBiz, /uninstallBiz, /queryAllBiz and /health synchronously with arklet's
`{code, message, data, errorStackTrace, baseIdentity}`, and POSTs its BaseStatus (no envelope) to
`<endpoint>/heartbeat` every heartbeat interval, as `koupleless.arklet.http.heartbeat.endpoint`
makes a real base do (reference §3). Install semantics are the MQTT simulator's own (the same
install delay, failures, version from the jar, REPEAT_BIZ and NOT_FOUND_BIZ): only the transport
differs. As in arklet's HTTP tunnel, a (re)start sends no queryBaseline, only heartbeats. A killed
base's port stops answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from koupleless import arklet, arklet_base_payloads, arklet_parse
from provider.basesim import NOT_FOUND_BIZ, BaseSimulator, SimBase
from provider.tunnel import BrokerOptions

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class HttpBaseSimulator(BaseSimulator):
    def __init__(self, heartbeat_endpoint: str, *, first_port: int = 0, **kwargs: Any) -> None:
        # The MQTT client the parent makes is never started: these bases speak HTTP only.
        super().__init__(BrokerOptions("127.0.0.1", 1), **kwargs)
        self.heartbeat_endpoint = heartbeat_endpoint.rstrip("/")
        self.first_port = first_port
        self.ports: dict[str, int] = {}
        self._by_port: dict[int, SimBase] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        #: Heartbeats the provider accepted (HTTP 200) and refused, for the snapshot.
        self.heartbeats_ok = 0
        self.heartbeats_failed = 0
        self.last_heartbeat_error = ""
        for base in self.bases.values():
            base.ip = LOOPBACK

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self, subscribe_timeout: float = 10.0) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, sock_connect=5))
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        for i, base in enumerate(self.bases.values()):
            site = web.TCPSite(self._runner, LOOPBACK, self.first_port + i if self.first_port else 0)
            await site.start()
            port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            self.ports[base.base_id] = port
            self._by_port[port] = base
        for base in self.bases.values():
            self._announce(base)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def stop(self, graceful: bool = True) -> None:
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        if graceful and self.goodbye:
            await asyncio.gather(*(self._post_heartbeat(b, arklet.DEACTIVATED) for b in self.bases.values() if b.alive))
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def connected(self) -> bool:
        """Ready once the provider has taken a heartbeat (there is no broker connection)."""
        return self.heartbeats_ok > 0

    def replay(self, base_id: str) -> bool:
        return False  # replies are the answers to calls: there is nothing to publish again

    def snapshot(self) -> dict[str, Any]:
        bases = {}
        for b in self.bases.values():
            bases[b.base_id] = {**b.snapshot(), "tunnel": "http", "port": self.ports.get(b.base_id, 0)}
        return {
            "connected": self.heartbeats_ok > 0,
            "heartbeats": {"ok": self.heartbeats_ok, "failed": self.heartbeats_failed,
                           "last_error": self.last_heartbeat_error},
            "bases": bases,
        }

    # --- heartbeats out ----------------------------------------------------------------------------

    def _announce(self, base: SimBase) -> None:
        self._heartbeat(base)

    def _heartbeat(self, base: SimBase, state: str = arklet.ACTIVATED) -> Any:
        self._spawn(self._post_heartbeat(base, state))
        return None

    def _status(self, base: SimBase, state: str) -> dict[str, Any]:
        return arklet.Heartbeat(
            metadata=arklet.BaseMetadata(base.base_id, base.name, base.version, base.cluster_name),
            local_ip=base.ip, local_hostname=base.hostname, port=self.ports.get(base.base_id, 0), state=state,
        ).to_wire()

    async def _post_heartbeat(self, base: SimBase, state: str) -> None:
        if self._session is None:
            return
        url = self.heartbeat_endpoint + "/heartbeat"
        try:
            async with self._session.post(url, json=self._status(base, state)) as resp:
                text = await resp.text()
                if resp.status == 200:
                    self.heartbeats_ok += 1
                    return
                self.last_heartbeat_error = f"HTTP {resp.status}: {text.strip()[:300]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.last_heartbeat_error = f"{url}: {exc or type(exc).__name__}"
        self.heartbeats_failed += 1
        log.warning("base %s: heartbeat to %s failed: %s", base.base_id, url, self.last_heartbeat_error)

    # --- arklet's HTTP API -----------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        for command in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ, arklet.CMD_QUERY_ALL_BIZ, arklet.CMD_HEALTH):
            app.router.add_post(f"/{command}", self._command)
        return app

    def _answer(self, base: SimBase, code: str, message: str = "", data: Any = None) -> web.Response:
        return web.json_response({"code": code, "message": message, "data": data, "errorStackTrace": None,
                                  "baseIdentity": base.base_id})

    async def _command(self, request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        base = self._by_port.get(int(sockname[1])) if sockname else None
        if base is None or not base.alive:
            return _dead(request)
        command = request.path.lstrip("/")
        generation = base.generation
        body = await request.read()
        if command == arklet.CMD_HEALTH:
            return self._health(base)
        if command == arklet.CMD_QUERY_ALL_BIZ:
            return self._answer(base, arklet.CODE_SUCCESS, "", [_ark_biz_info(m.status()) for m in base.modules.values()])
        try:
            model = arklet_parse.parse_biz_model(body)
        except arklet.ArkletError as exc:
            return self._answer(base, arklet.CODE_FAILED, f"bad {command} request: {exc}")
        if command == arklet.CMD_UNINSTALL_BIZ:
            base.uninstalls += 1
            if base.modules.pop(model.key, None) is None:
                msg = f"{NOT_FOUND_BIZ}: biz {model.key} not found"
                return self._answer(base, arklet.CODE_FAILED, msg,
                                    {"code": NOT_FOUND_BIZ, "message": msg})
            return self._answer(base, arklet.CODE_SUCCESS, "", {"code": arklet.CODE_SUCCESS, "message": ""})
        base.install_commands += 1
        if self.install_delay > 0 and not self._would_repeat(base, model):
            await asyncio.sleep(self.install_delay)  # REPEAT_BIZ answers at once, as arklet checks first
        if not base.alive or base.generation != generation:
            return _dead(request)  # the JVM died during the install: no answer
        out = self._perform_install(base, model)
        reply = arklet_base_payloads.biz_operation_data(
            arklet.CMD_INSTALL_BIZ, model, out.code, out.message, biz_state=out.biz_state,
            elapsed=1024 if out.code == arklet.CODE_SUCCESS else 0, installed=out.installed,
            detail_code=out.detail_code,
        )["response"]
        return self._answer(base, reply["code"], reply["message"], reply["data"])

    def _health(self, base: SimBase) -> web.Response:
        first = base.health_answers == 0
        base.health_answers += 1
        data = arklet_base_payloads.health_data(self.memory_mb, self.cpus, time.monotonic() - base.started_at,
                                  master_name=base.name, metrics=not (self.late_health_metrics and first))
        return self._answer(base, data["code"], data["message"], data["data"])


def _ark_biz_info(status: arklet.BizStatus) -> dict[str, Any]:
    """One queryAllBiz item as arklet's HTTP API lists it (SOFAArk's ArkBizInfo)."""
    return {
        "bizName": status.name,
        "bizVersion": status.version,
        "bizState": status.state.lower(),
        "bizStateRecords": [{"changeTime": status.change_time_ms, "state": status.state,
                             "reason": status.reason or None, "message": status.message or None}],
    }


def _dead(request: web.Request) -> web.StreamResponse:
    """A dead JVM answers nothing: drop the connection."""
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("base is not running")
